"""`dualpath bench transport`: one-sided write GB/s between two processes, next to iperf3.

The receiver runs in its own process (as a peer engine would); iperf3's single-stream loopback
rate is measured in the same run as the reference. With --backend cuda on a host with two GPUs,
the reference is a plain peer-to-peer tensor copy between the two GPUs; with --backend shm the
receiver's region is a shared DRAM buffer (as an engine's is) and the reference is one host memory
copy of the same size.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import shutil
import statistics
import subprocess
import time

import torch

from dualpath.bench.common import write_json
from dualpath.transport import make_dataplane

TOKEN = "bench"
SIZES_MIB = (1, 4, 16, 64)


def _receiver(backend: str, device: str, q) -> None:
    async def main():
        dp = make_dataplane(backend, "rx", TOKEN)
        await dp.start("127.0.0.1")
        if backend == "shm":  # an engine's DRAM buffer: shared memory the writer maps
            from dualpath.engine.buffers import BufferPool

            buf = BufferPool(n_blocks=64, n_layers=1, bytes_per_layer=1 << 20, pin=False, shared=True)
            handle = dp.register(buf.host, share_path=buf.share_path)
        else:
            handle = dp.register(torch.zeros(64 << 20, dtype=torch.uint8, device=device))
        q.put(handle)
        q.put(dp.register(torch.zeros(4096, dtype=torch.uint8)))  # for latency-class writes
        await asyncio.Event().wait()

    asyncio.run(main())


async def _latency_under_bulk(dp, src: torch.Tensor, bulk_dst: dict, lat_dst: dict, n: int = 200) -> dict:
    """512-byte latency-class writes, idle and while two bulk writers fill the link: their p50 / p99
    (seconds). A figure of the host as much as of the code: tests assert the order, this measures."""
    msg = torch.ones(512, dtype=torch.uint8)

    async def write_times() -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            await dp.write(msg, lat_dst, 0, 512, "latency")
            out.append(time.perf_counter() - t0)
            await asyncio.sleep(0.002)
        return out

    def summary(xs: list[float]) -> dict:
        q = statistics.quantiles(xs, n=100)
        return {"p50_s": q[49], "p99_s": q[98]}

    await write_times()  # warm both links
    idle = summary(await write_times())
    stop = asyncio.Event()

    async def bulk() -> None:
        while not stop.is_set():
            await dp.write(src, bulk_dst, 0, src.numel(), "bulk")

    tasks = [asyncio.create_task(bulk()) for _ in range(2)]
    await asyncio.sleep(0.2)
    busy = summary(await write_times())
    stop.set()
    await asyncio.gather(*tasks)
    return {"idle": idle, "under_bulk": busy, "p99_ratio": busy["p99_s"] / idle["p99_s"]}


async def _sender(backend: str, device: str, handle: dict, seconds: float,
                  lat_handle: dict | None = None) -> tuple[dict[int, float], dict | None]:
    dp = make_dataplane(backend, "tx", TOKEN)
    await dp.start("127.0.0.1")
    src = torch.ones(64 << 20, dtype=torch.uint8, device=device)
    rates = {}
    for mib in SIZES_MIB:
        n = mib << 20
        await dp.write(src, handle, 0, n, "bulk")  # warm
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            await dp.write(src, handle, 0, n, "bulk")
            count += 1
        rates[mib] = count * n / (time.perf_counter() - t0) / 1e9
    latency = await _latency_under_bulk(dp, src, handle, lat_handle) if lat_handle is not None else None
    await dp.close()
    return rates, latency


def _iperf3(seconds: float) -> float | None:
    if shutil.which("iperf3") is None:
        return None
    server = subprocess.Popen(["iperf3", "-s", "-1", "-p", "5299"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", "5299", "-t", str(seconds), "-J"],
                             capture_output=True, text=True, timeout=seconds + 20)
        return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 8 / 1e9
    finally:
        server.kill()
        server.wait()


def _memcpy_gbps(n: int = 64 << 20, reps: int = 20) -> float:
    a, b = torch.ones(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
    b.copy_(a)
    t0 = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    return reps * n / (time.perf_counter() - t0) / 1e9


def _p2p_copy_gbps() -> float | None:
    if torch.cuda.device_count() < 2:
        return None
    a = torch.ones(64 << 20, dtype=torch.uint8, device="cuda:0")
    b = torch.empty(64 << 20, dtype=torch.uint8, device="cuda:1")
    b.copy_(a)
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 50
    for _ in range(n):
        b.copy_(a)
    torch.cuda.synchronize("cuda:0")
    torch.cuda.synchronize("cuda:1")
    return n * (64 << 20) / (time.perf_counter() - t0) / 1e9


def run(backend: str, seconds: float, out: str) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    # receiver on the second GPU where there is one (on one GPU both share it)
    rx_dev, tx_dev = ("cpu", "cpu")
    if backend == "cuda":
        rx_dev, tx_dev = f"cuda:{min(1, torch.cuda.device_count() - 1)}", "cuda:0"
    proc = ctx.Process(target=_receiver, args=(backend, rx_dev, q), daemon=True)
    proc.start()
    try:
        handle, lat_handle = q.get(timeout=60), q.get(timeout=60)
        # the link-sharing figure is tcp's: the other backends move bulk bytes outside the socket
        rates, latency = asyncio.run(_sender(backend, tx_dev, handle, seconds,
                                             lat_handle if backend == "tcp" else None))
    finally:
        proc.kill()
        proc.join()
    measure, ref_name = {"cuda": (_p2p_copy_gbps, "p2p_tensor_copy_GBps"),
                         "shm": (_memcpy_gbps, "host_memory_copy_GBps")}.get(
        backend, (lambda: _iperf3(max(2.0, seconds)), "iperf3_single_stream_GBps"))
    reference = measure()
    best = max(rates.values())
    result = {"bench": "transport", "backend": backend, "write_GBps_by_MiB": rates, ref_name: reference,
              "best_ratio": best / reference if reference else None, "latency_write_under_bulk": latency}
    write_json(out, result)
    return result
