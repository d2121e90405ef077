"""The cuda data plane between two processes: the write is a CUDA IPC copy, and the receiver's
completion waits on the writer's interprocess event named in the Notify (in one process the
writer waits itself, which the conformance suite in test_transport.py covers). Needs a GPU."""

import asyncio
import multiprocessing as mp

import pytest
import torch

from dualpath.transport import make_dataplane

pytestmark = [pytest.mark.cluster,  # a receiver process (spawned)
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this host")]
TOKEN = "test-token"
N = 4 << 20


def _receiver(handles: "mp.Queue", results: "mp.Queue") -> None:
    """Registers a GPU region, then reports what each completion found in it (a checksum)."""
    async def main() -> None:
        dst = torch.zeros(N, dtype=torch.uint8, device="cuda")
        landed = asyncio.Queue()
        dp = make_dataplane("cuda", "rx", TOKEN, on_complete=landed.put_nowait)
        await dp.start("127.0.0.1")
        handles.put(dp.register(dst))
        for _ in range(2):
            note = await landed.get()
            results.put((note, int(dst.to(torch.int64).sum())))  # read at completion: the copy must be done
        await dp.close()

    asyncio.run(main())


async def test_a_write_from_another_process_completes_once_its_ipc_copy_has_landed():
    ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    handles, results = ctx.Queue(), ctx.Queue()
    rx = ctx.Process(target=_receiver, args=(handles, results), daemon=True)
    rx.start()
    loop = asyncio.get_running_loop()
    dp = make_dataplane("cuda", "tx", TOKEN)
    await dp.start("127.0.0.1")
    try:
        handle = await loop.run_in_executor(None, handles.get, True, 60)
        assert dp.backend == "cuda" and "ipc" in handle
        src = torch.full((N,), 3, dtype=torch.uint8, device="cuda")
        await dp.write(src, handle, 0, N, "bulk", notify="whole")
        assert await loop.run_in_executor(None, results.get, True, 60) == ("whole", 3 * N)
        await dp.write(src[: N // 2].fill_(5), handle, N // 2, N // 2, "latency", notify="half")
        assert await loop.run_in_executor(None, results.get, True, 60) == ("half", 3 * (N // 2) + 5 * (N // 2))
        assert dp.links() == {f"127.0.0.1:{handle['addr'][1]}": "cuda"}
    finally:
        await dp.close()
        rx.join(30)
        if rx.is_alive():
            rx.kill()
