"""Where does the `cuda` data plane lose time? Copies into a peer process's CUDA IPC memory, timed
piece by piece next to a plain in-process peer-to-peer copy. Needs two GPUs.
Usage: python3 examples/cuda_ipc_profile.py"""

import asyncio
import multiprocessing as mp
import time

import torch

from dualpath.transport import make_dataplane

N = 64 << 20


def receiver(q, done):
    async def main():
        dp = make_dataplane("cuda", "rx", "t")
        await dp.start("127.0.0.1")
        q.put(dp.register(torch.zeros(N, dtype=torch.uint8, device="cuda:1")))
        while not done.is_set():
            await asyncio.sleep(0.1)

    asyncio.run(main())


def rate(fn, sync, n=20) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return n * N / (time.perf_counter() - t0) / 1e9


def main():
    ctx = mp.get_context("spawn")
    q, done = ctx.Queue(), ctx.Event()
    p = ctx.Process(target=receiver, args=(q, done))
    p.start()
    handle = q.get(timeout=120)
    src = torch.ones(N, dtype=torch.uint8, device="cuda:0")
    local_dst = torch.empty(N, dtype=torch.uint8, device="cuda:1")

    def sync():
        torch.cuda.synchronize("cuda:0")
        torch.cuda.synchronize("cuda:1")

    print(f"in-process p2p copy          {rate(lambda: local_dst.copy_(src), sync):7.1f} GB/s")
    dp = make_dataplane("cuda", "tx", "t")
    ipc = dp._open(handle)
    print(f"copy into IPC memory, cur=0  {rate(lambda: ipc.copy_(src), sync):7.1f} GB/s")
    with torch.cuda.device(1):
        print(f"copy into IPC memory, cur=1  {rate(lambda: ipc.copy_(src), sync):7.1f} GB/s")
    s1 = torch.cuda.Stream(device=1)

    def on_stream():
        with torch.cuda.device(1), torch.cuda.stream(s1):
            ipc.copy_(src, non_blocking=True)

    print(f"copy into IPC, side stream   {rate(on_stream, sync):7.1f} GB/s")
    tmp = torch.empty(N, dtype=torch.uint8, device="cuda:1")
    print(f"same-device copy into IPC    {rate(lambda: ipc.copy_(tmp), sync):7.1f} GB/s")
    print(f"same-device copy from IPC    {rate(lambda: tmp.copy_(ipc), sync):7.1f} GB/s")
    print(f"IPC -> other device          {rate(lambda: src.copy_(ipc), sync):7.1f} GB/s")

    def staged():
        tmp.copy_(src)
        ipc.copy_(tmp)

    print(f"p2p to a local temp, then D2D into IPC {N * 2 / 1e9 / (2 * N / 1e9 / rate(staged, sync)):7.1f} GB/s")
    cudart = torch.cuda.cudart()

    def memcpy_peer():
        cudart.cudaMemcpyPeerAsync(ipc.data_ptr(), 1, src.data_ptr(), 0, N, 0) if hasattr(
            cudart, "cudaMemcpyPeerAsync") else ipc.copy_(src)

    print(f"cudaMemcpyPeerAsync          {rate(memcpy_peer, sync):7.1f} GB/s  "
          f"(available: {hasattr(cudart, 'cudaMemcpyPeerAsync')})")

    async def writes():
        await dp.start("127.0.0.1")
        await dp.write(src, handle, 0, N)
        t0, n = time.perf_counter(), 20
        for _ in range(n):
            await dp.write(src, handle, 0, N)
        w = n * N / (time.perf_counter() - t0) / 1e9
        t0 = time.perf_counter()
        for _ in range(n):
            await dp._send(memoryview(b""), handle, 0, "bulk", None, "n", 10)
        notify_ms = (time.perf_counter() - t0) / n * 1e3
        await dp.close()
        return w, notify_ms

    w, notify_ms = asyncio.run(writes())
    print(f"dataplane.write (64 MiB)     {w:7.1f} GB/s; notify round trip {notify_ms:.3f} ms")
    print("peer access 0->1:", torch.cuda.can_device_access_peer(0, 1), " 1->0:", torch.cuda.can_device_access_peer(1, 0))
    done.set()
    p.join(10)


if __name__ == "__main__":
    main()
