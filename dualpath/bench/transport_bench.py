"""`dualpath bench transport`: one-sided write GB/s between two processes, next to iperf3.

The receiver runs in its own process (as a peer engine would); iperf3's single-stream loopback
rate is measured in the same run as the reference. With --backend cuda on a host with two GPUs,
the reference is a plain peer-to-peer tensor copy between the two GPUs; with --backend shm the
receiver's region is a shared DRAM buffer (as an engine's is) and the reference is one host memory
copy of the same size.

Small writes (4, 16, 64, 256 KiB: handoffs of short appends, per-layer pieces, notifies) are the
other half (issue #34): per size, the latency of one write at a time (p50 / p99 over N writes, each
awaited before the next) and the throughput with K writes in flight (K tasks, distinct destination
offsets). Rows in ``small_writes`` of the JSON and a table printed by ``run`` (``format_small``).
Mooncake Transfer Engine figures sit beside them in ``notes`` as a cited reference only: no
threshold is checked here.

What each end actually used: ``backend_used`` (writer and receiver: make_dataplane falls back to tcp
with a warning when the asked-for backend cannot start) and ``links`` (each end's ``links()`` after
the writes: the backend per peer link). ``all_links_requested`` is true only when both ends run the
asked-for backend and every link of both says so; examples/rdma_check.sh checks it for verbs.

Two hosts (verbs between real NICs): ``python -m dualpath.bench.transport_bench --role rx ...`` on
one, ``--role tx --handles FILE`` on the other; ``--help`` says how. The verbs plane takes its device,
port and GID index from DUALPATH_RDMA_DEVICE / DUALPATH_RDMA_PORT / DUALPATH_RDMA_GID_INDEX.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import multiprocessing as mp
import os
import queue as queue_mod
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time

import torch

from dualpath.bench.common import write_json
from dualpath.transport import make_dataplane

TOKEN = os.environ.get("DUALPATH_BENCH_TOKEN", "bench")
SIZES_MIB = (1, 4, 16, 64)
SMALL_SIZES_KIB = (4, 16, 64, 256)
SMALL_N = 1000  # writes per size, one at a time (latency) and again K in flight (throughput)
INFLIGHT = 16  # K
REGION_BYTES = 64 << 20

# Cited references for the small-write rows, never thresholds. Mooncake publishes bandwidth for
# large transfers and a benchmark's columns, not per-write latency of a 4-256 KiB write; the only
# small-write figures beside ours are issue #34's own run of Mooncake's TCP transport on this
# project's 2-core host (a measurement of this project, not Mooncake's publication).
MOONCAKE_NOTES = {
    "what": "reference only (no pass/fail): Mooncake Transfer Engine figures, with their sources",
    "published_large_transfer_GBps": {
        "figures": {"4x200Gbps_RoCE_rdma": 87, "8x400Gbps_RoCE_rdma": 190,
                    "vs_tcp": "about 2.4x and 4.6x faster than the TCP protocol (their words)"},
        "shape": "40 GB of data (the KVCache of 128k LLaMA3-70B tokens), 'up to', RDMA over all NICs",
        "source": "kvcache-ai/Mooncake README.md, Transfer Engine 'Performance' paragraph "
                  "(https://github.com/kvcache-ai/Mooncake)",
    },
    "published_bench_shapes": {
        "transfer_engine_bench": "reports GB/s only; defaults --block_size=65536 --batch_size=128 "
                                 "--threads=12 (1536 requests of 64 KiB in flight), 1 GiB buffer per NUMA node",
        "tebench": "reports per (block_size, batch_size, concurrency) row: BW GB/s, Avg Lat, P99, P999 (us)",
        "sources": ["https://kvcache-ai.github.io/Mooncake/design/transfer-engine/transfer-engine-bench-tuning.html",
                    "https://kvcache-ai.github.io/Mooncake/design/tent/tebench.html"],
        "note": "no published per-write latency for 4-256 KiB writes was found in these pages",
    },
    "measured_here_by_issue_34": {
        "figures": {"one_4KB_write_us": 53, "one_32KB_write_us": 65, "pieces_1536x32KB_GBps": 0.86},
        "setup": "mooncake-transfer-engine-non-cuda 0.3.13.post1, TCP transport, loopback, 2-core CPU "
                 "host, median of 3 alternating rounds (issue #34, read at commit 997d14d)",
        "source": "issue #34 (`issues show 34`): a measurement of this project, not Mooncake's publication",
    },
}


def rdma_options():
    """The verbs plane's options from DUALPATH_RDMA_DEVICE / _PORT / _GID_INDEX (unset: automatic)."""
    from dualpath.transport.rdma import RdmaOptions

    env = os.environ
    return RdmaOptions(device=env.get("DUALPATH_RDMA_DEVICE", ""), port=int(env.get("DUALPATH_RDMA_PORT", "0")),
                       gid_index=int(env.get("DUALPATH_RDMA_GID_INDEX", "-1")))


def _plane(backend: str, name: str):
    return make_dataplane(backend, name, TOKEN, rdma=rdma_options() if backend == "verbs" else None)


async def _serve(backend: str, device: str, host: str, port: int, publish, done,
                 region_bytes: int = REGION_BYTES, digest: bool = False) -> dict:
    """The receiving end: register a region of region_bytes (an engine's shared DRAM buffer for shm;
    a multiple of 1 MiB) and a 4 KiB one for latency-class writes, publish({"handle", "lat_handle",
    "backend"}), then wait until done(dp) (an awaitable) returns; gives back what it used:
    {"backend", "links"} (+ the region's "sha256" with digest)."""
    dp = _plane(backend, "rx")
    await dp.start(host, port)
    if dp.backend == "shm":  # an engine's DRAM buffer: shared memory the writer maps
        from dualpath.engine.buffers import BufferPool

        buf = BufferPool(n_blocks=region_bytes >> 20, n_layers=1, bytes_per_layer=1 << 20, pin=False, shared=True)
        region = buf.host
        handle = dp.register(region, share_path=buf.share_path)
    else:
        region = torch.zeros(region_bytes, dtype=torch.uint8, device=device)
        handle = dp.register(region)
    lat_handle = dp.register(torch.zeros(4096, dtype=torch.uint8))
    publish({"handle": handle, "lat_handle": lat_handle, "backend": dp.backend})
    await done(dp)
    used = _used(dp)
    if digest:
        used["sha256"] = _sha256(region)
    await dp.close()
    return used


def _sha256(t: torch.Tensor) -> str:
    from dualpath.transport.dataplane import as_bytes

    return hashlib.sha256(memoryview(as_bytes(t).cpu().numpy())).hexdigest()


def _used(dp) -> dict:
    """What a plane ran: its backend, its links() (a writer's: the backend per peer link), and for
    verbs the queue pairs it made (writing) and accepted (written into)."""
    out = {"backend": dp.backend, "links": dp.links()}
    if dp.backend == "verbs":
        out.update(qps=len(getattr(dp, "qps", {})), accepted_qps=len(getattr(dp, "accepted", {})))
    return out


def _receiver(backend: str, device: str, q, stop, region_bytes: int = REGION_BYTES, digest: bool = False) -> None:
    async def done(dp):
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)

    used = asyncio.run(_serve(backend, device, "127.0.0.1", 0, q.put, done, region_bytes, digest))
    q.put(used)


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


def _pct(xs: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of xs; any count >= 1."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


async def _lane(dp, src, dst: dict, lane: int, k: int, slots: int, nbytes: int, tc: str, counter) -> None:
    """One of k writers in flight: writes slots lane, lane + k, lane + 2k, ... (never another lane's
    while k divides the slot count) until the shared counter runs out."""
    for j, _ in enumerate(counter):
        await dp.write(src, dst, ((lane + j * k) % slots) * nbytes, nbytes, tc)


async def small_writes(dp, src: torch.Tensor, dst: dict, sizes_kib=SMALL_SIZES_KIB, n: int = SMALL_N,
                       inflight: int = INFLIGHT, traffic_class: str = "bulk") -> list[dict]:
    """Per size: n writes one at a time (each awaited before the next; p50/p99/min/mean/max in µs),
    then n writes with `inflight` of them in flight at once (GB/s, writes/s). Each write goes to its
    own slot of the destination, slots reused round-robin; in flight, no two writes share a slot."""
    rows = []
    room = dst.get("nbytes", REGION_BYTES)
    for kib in sizes_kib:
        nbytes = kib << 10
        slots = max(1, room // nbytes)
        k = max(1, min(inflight, slots, n))
        for i in range(min(20, n)):  # warm: links, QPs, mappings, allocator
            await dp.write(src, dst, (i % slots) * nbytes, nbytes, traffic_class)
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            await dp.write(src, dst, (i % slots) * nbytes, nbytes, traffic_class)
            times.append(time.perf_counter() - t0)
        counter = iter(range(n))  # shared: the k lanes take the n writes between them
        t0 = time.perf_counter()
        await asyncio.gather(*(_lane(dp, src, dst, w, k, slots, nbytes, traffic_class, counter) for w in range(k)))
        dt = time.perf_counter() - t0
        us = [t * 1e6 for t in times]
        rows.append({"size_bytes": nbytes, "traffic_class": traffic_class,
                     "one_at_a_time": {"n": n, "p50_us": _pct(us, 50), "p99_us": _pct(us, 99), "min_us": min(us),
                                       "mean_us": statistics.fmean(us), "max_us": max(us)},
                     "in_flight": {"k": k, "n": n, "seconds": dt, "GBps": n * nbytes / dt / 1e9,
                                   "writes_per_s": n / dt}})
    return rows


async def _sender(backend: str, device: str, handle: dict, seconds: float, lat_handle: dict | None = None,
                  small: dict | None = None, large: bool = True) -> dict:
    """The writing end: large-write GB/s (1-64 MiB, `seconds` each), small-write rows (small: the
    keyword arguments of small_writes, or None to skip), the latency-under-bulk figure (lat_handle);
    and what this end used: {"backend", "links"}."""
    dp = _plane(backend, "tx")
    await dp.start("127.0.0.1")  # a writer opens links; nothing connects to it
    src = torch.ones(REGION_BYTES, dtype=torch.uint8, device=device)
    if hasattr(dp, "mrs"):  # verbs: the source is a registered region, as an engine's DRAM buffer is
        dp.register(src)
    rates = {}
    for mib in SIZES_MIB if large else ():
        n = mib << 20
        await dp.write(src, handle, 0, n, "bulk")  # warm
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            await dp.write(src, handle, 0, n, "bulk")
            count += 1
        rates[mib] = count * n / (time.perf_counter() - t0) / 1e9
    rows = await small_writes(dp, src, handle, **small) if small is not None else []
    latency = await _latency_under_bulk(dp, src, handle, lat_handle) if lat_handle is not None else None
    used = _used(dp)
    await dp.close()
    return {"rates": rates, "small": rows, "latency": latency, "used": used}


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


def _all_links(backend: str, writer: dict, receiver: dict | None) -> bool:
    """Both ends run `backend`, the writer has a link, and every link either end reports says
    `backend` (a receiver's links() lists the links it opened: usually none)."""
    ends = [writer] + ([receiver] if receiver else [])
    return (receiver is not None and all(e["backend"] == backend for e in ends) and bool(writer["links"])
            and all(v == backend for e in ends for v in (e["links"] or {}).values()))


def format_small(result: dict) -> str:
    """The small-write rows as a table (µs one at a time; GB/s and writes/s with K in flight)."""
    rows = result.get("small_writes") or []
    if not rows:
        return ""
    ran = result["backend_used"]["writer"]["backend"]
    title = (f"small writes, backend {result['backend']} (writer ran {ran}), {rows[0]['traffic_class']} class; "
             f"figures of the host that ran it:")
    lines = [title,
             f"{'size':>7} {'n':>6} {'p50 us':>9} {'p99 us':>9}   {'K':>3} {'GB/s':>7} {'writes/s':>9}"]
    for r in rows:
        one, fl = r["one_at_a_time"], r["in_flight"]
        lines.append(f"{r['size_bytes'] >> 10:>5} KB {one['n']:>6} {one['p50_us']:>9.1f} {one['p99_us']:>9.1f}   "
                     f"{fl['k']:>3} {fl['GBps']:>7.3f} {fl['writes_per_s']:>9.0f}")
    return "\n".join(lines)


def format_used(result: dict) -> str:
    used = result["backend_used"]
    rx = used.get("receiver") or {}
    return (f"backend asked {result['backend']}: writer {used['writer']['backend']} links {used['writer']['links']}; "
            f"receiver {rx.get('backend', '?')} links {rx.get('links', '?')}; "
            f"all links {result['backend']}: {'yes' if result['all_links_requested'] else 'NO'}")


def run(backend: str, seconds: float, out: str, small_n: int = SMALL_N, inflight: int = INFLIGHT,
        small_sizes_kib=SMALL_SIZES_KIB, small_class: str = "bulk", small: bool = True, large: bool = True,
        echo: bool = True) -> dict:
    """The bench between this process and a receiver process of this host. small_n=0 or small=False
    skips the small-write rows; large=False the 1-64 MiB ones (and the reference). echo prints the
    small-write table and what each end used (the CLI prints the large-write rows)."""
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    # receiver on the second GPU where there is one (on one GPU both share it)
    rx_dev, tx_dev = ("cpu", "cpu")
    if backend == "cuda":
        rx_dev, tx_dev = f"cuda:{min(1, torch.cuda.device_count() - 1)}", "cuda:0"
    proc = ctx.Process(target=_receiver, args=(backend, rx_dev, q, stop), daemon=True)
    proc.start()
    rx_used = None
    try:
        info = q.get(timeout=60)
        small_kw = ({"sizes_kib": tuple(small_sizes_kib), "n": small_n, "inflight": inflight,
                     "traffic_class": small_class} if small and small_n > 0 else None)
        # the link-sharing figure is tcp's: the other backends move bulk bytes outside the socket
        got = asyncio.run(_sender(backend, tx_dev, info["handle"], seconds,
                                  info["lat_handle"] if backend == "tcp" and large else None, small_kw, large))
        stop.set()
        try:
            rx_used = q.get(timeout=30)
        except queue_mod.Empty:
            rx_used = None
    finally:
        proc.kill()
        proc.join()
    reference, ref_name = None, None
    if large:
        measure, ref_name = {"cuda": (_p2p_copy_gbps, "p2p_tensor_copy_GBps"),
                             "shm": (_memcpy_gbps, "host_memory_copy_GBps")}.get(
            backend, (lambda: _iperf3(max(2.0, seconds)), "iperf3_single_stream_GBps"))
        reference = measure()
    rates = got["rates"]
    best = max(rates.values()) if rates else None
    result = {"bench": "transport", "backend": backend, "write_GBps_by_MiB": rates}
    if ref_name:
        result[ref_name] = reference
    result.update({
        "best_ratio": best / reference if best and reference else None,
        "latency_write_under_bulk": got["latency"],
        "small_writes": got["small"],
        "backend_used": {"writer": got["used"], "receiver": rx_used},
        "all_links_requested": _all_links(backend, got["used"], rx_used),
        "notes": {"host": "CPU figures of the host that ran it (a shared VM here: noisy, few cores)",
                  "small_writes": "one_at_a_time: each write awaited before the next; in_flight: k writes "
                                  "outstanding at once, n in all",
                  "mooncake_reference": MOONCAKE_NOTES},
    })
    write_json(out, result)
    if echo:
        if table := format_small(result):
            print(table)
        print(format_used(result))
    return result


# -- byte checks: every byte of odd-sized, random-offset, empty and region-sized writes --

BIG_REGION_BYTES = (1 << 30) + (2 << 20)  # --verify-big: one write of more than 1 GiB (verbs splits it into WRs)


def verify_cases(region_bytes: int, src_bytes: int, n_random: int, seed: int) -> list[tuple[int, int, int]]:
    """(destination offset, bytes, source offset) of each write, in order: the whole region first
    (on a big region a write over 1 GiB), then 0 bytes, single bytes at both ends, odd sizes
    across 4 KiB and 1 MiB boundaries, and n_random odd-sized writes at random offsets."""
    rng = random.Random(seed)
    cases = [(0, region_bytes, 0), (0, 0, 0), (region_bytes // 2, 0, 7), (0, 1, 3), (region_bytes - 1, 1, 5),
             (1, 4095, 11), (4095, 4097, 13), ((1 << 20) - 3, 65537, 17), (region_bytes - 65537, 65537, 19)]
    cases = [(off, n, soff) for off, n, soff in cases if off >= 0 and off + n <= region_bytes and soff + n <= src_bytes]
    for _ in range(n_random):
        n = rng.randrange(1, min(4 << 20, region_bytes) // 2) * 2 + 1
        n = min(n, region_bytes)
        cases.append((rng.randrange(0, region_bytes - n + 1), n, rng.randrange(0, src_bytes - n + 1)))
    return cases


async def _verify_writes(dp, dst: dict, region_bytes: int, n_random: int, seed: int) -> dict:
    """The writes of verify_cases from a random source, and the region they must leave: its sha256."""
    src_bytes = region_bytes + (1 << 20)
    src = torch.randint(0, 256, (src_bytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    if hasattr(dp, "mrs"):  # verbs: the source is a registered region
        dp.register(src)
    expected = torch.zeros(region_bytes, dtype=torch.uint8)
    cases = verify_cases(region_bytes, src_bytes, n_random, seed)
    for off, n, soff in cases:
        await dp.write(src[soff:], dst, off, n, "bulk")
        expected[off:off + n] = src[soff:soff + n]
    sizes = [n for _, n, _ in cases]
    return {"writes": len(cases), "bytes": sum(sizes), "largest_write": max(sizes), "zero_byte_writes": sizes.count(0),
            "odd_sized_writes": sum(n % 2 for n in sizes), "seed": seed, "expected_sha256": _sha256(expected)}


def run_verify(backend: str, out: str | None = None, big: bool = False, n_random: int = 64, seed: int = 0,
               echo: bool = True) -> dict:
    """Writes of verify_cases into a receiver process of this host, then the receiver's region
    hashed there and compared with what the writes must have left: every byte checked."""
    region_bytes = BIG_REGION_BYTES if big else REGION_BYTES
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_receiver, args=(backend, "cpu", q, stop, region_bytes, True), daemon=True)
    proc.start()
    try:
        info = q.get(timeout=120)

        async def write_all() -> tuple[dict, dict]:
            dp = _plane(backend, "tx")
            await dp.start("127.0.0.1")
            got = await _verify_writes(dp, info["handle"], region_bytes, n_random, seed)
            used = _used(dp)
            await dp.close()
            return got, used

        got, used = asyncio.run(write_all())
        stop.set()
        rx_used = q.get(timeout=300)  # hashing a region of more than 1 GiB takes a while
    finally:
        proc.kill()
        proc.join()
    got["receiver_sha256"] = rx_used.pop("sha256")
    got["match"] = got["receiver_sha256"] == got["expected_sha256"]
    result = {"bench": "transport_verify", "backend": backend, "verify": got,
              "backend_used": {"writer": used, "receiver": rx_used},
              "all_links_requested": _all_links(backend, used, rx_used)}
    if out:
        write_json(out, result)
    if echo:
        print(f"verify {backend}: {got['writes']} writes ({got['zero_byte_writes']} of 0 bytes, "
              f"{got['odd_sized_writes']} odd-sized, largest {got['largest_write']} bytes), "
              f"every byte of the {region_bytes}-byte region {'MATCHES' if got['match'] else 'DIFFERS'}")
        print(format_used(result))
    return result


# -- two hosts: `python -m dualpath.bench.transport_bench --role rx|tx` --

def _main_rx(args) -> None:
    async def done(dp):
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        seen = None
        while not stopping.is_set():
            if _used(dp) != seen:  # verbs: the QPs it accepted from the writer (a receiver opens no links)
                seen = _used(dp)
                print(f"receiver {dp.backend}: {seen}", flush=True)
            try:
                await asyncio.wait_for(stopping.wait(), 1.0)
            except TimeoutError:
                pass

    def publish(info):
        tmp = args.handles + ".tmp"
        with open(tmp, "w") as f:
            json.dump(info, f)
        os.replace(tmp, args.handles)
        print(f"receiver backend {info['backend']} on {info['handle']['addr']}; handles in {args.handles} "
              f"(copy it to the writer's host); Ctrl-C ends", flush=True)

    verify = args.verify or args.verify_big
    region = BIG_REGION_BYTES if args.verify_big else REGION_BYTES
    used = asyncio.run(_serve(args.backend, "cpu", args.host, args.port, publish, done, region, verify))
    print(json.dumps({"receiver": used}), flush=True)
    if verify:
        print(f"receiver region sha256 {used['sha256']} (the writer's --verify run prints the one it must be)")


def _main_tx(args) -> None:
    with open(args.handles) as f:
        info = json.load(f)
    if args.verify or args.verify_big:
        region = BIG_REGION_BYTES if args.verify_big else REGION_BYTES

        async def write_all() -> tuple[dict, dict]:
            dp = _plane(args.backend, "tx")
            await dp.start("127.0.0.1")
            got = await _verify_writes(dp, info["handle"], region, 64, args.seed)
            used = _used(dp)
            await dp.close()
            return got, used

        got, used = asyncio.run(write_all())
        print(f"verify {args.backend}: {got['writes']} writes done; writer {used['backend']} links {used['links']}")
        print(f"expected region sha256 {got['expected_sha256']}: end the receiver (Ctrl-C) and compare its line")
        return
    small_kw = {"sizes_kib": tuple(args.small_kib), "n": args.small_n, "inflight": args.inflight,
                "traffic_class": args.small_class} if args.small_n > 0 else None
    got = asyncio.run(_sender(args.backend, "cpu", info["handle"], args.seconds, None, small_kw, not args.no_large))
    rx = {"backend": info["backend"], "links": None}  # the receiver prints its own as it sees them
    result = {"bench": "transport", "backend": args.backend, "two_hosts": True, "write_GBps_by_MiB": got["rates"],
              "small_writes": got["small"], "backend_used": {"writer": got["used"], "receiver": rx},
              "all_links_requested": (got["used"]["backend"] == args.backend == info["backend"]
                                      and bool(got["used"]["links"])
                                      and all(v == args.backend for v in got["used"]["links"].values())),
              "notes": {"receiver_links": "printed by the receiver (--role rx) as it sees them",
                        "mooncake_reference": MOONCAKE_NOTES}}
    write_json(args.out, result)
    for mib, gbps in got["rates"].items():
        print(f"{args.backend} write {mib:>3} MiB: {gbps:.2f} GB/s")
    if table := format_small(result):
        print(table)
    print(f"backend asked {args.backend}: writer {got['used']['backend']} links {got['used']['links']}; "
          f"receiver {info['backend']} (its links: its own output); all writer links {args.backend}: "
          f"{'yes' if result['all_links_requested'] else 'NO'}")
    print(f"wrote {args.out}")


def _main_local(args) -> None:
    if args.verify or args.verify_big:
        r = run_verify(args.backend, args.out, big=args.verify_big, seed=args.seed)
        print(f"wrote {args.out}")
        sys.exit(0 if r["verify"]["match"] else 1)
    r = run(args.backend, args.seconds, args.out, small_n=args.small_n, inflight=args.inflight,
            small_sizes_kib=args.small_kib, small_class=args.small_class, large=not args.no_large)
    for mib, gbps in r["write_GBps_by_MiB"].items():
        print(f"{r['backend']} write {mib:>3} MiB: {gbps:.2f} GB/s")
    print(f"wrote {args.out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dualpath.bench.transport_bench", description=(
        "dualpath bench transport with every knob. --role local (default): receiver in a child process of "
        "this host. Two hosts: on host A `--role rx --host A_IP --handles /tmp/h.json`, copy /tmp/h.json to "
        "host B, then on B `--role tx --handles /tmp/h.json`. Both ends need the same DUALPATH_BENCH_TOKEN."))
    ap.add_argument("--role", choices=["local", "rx", "tx"], default="local")
    ap.add_argument("--backend", choices=["tcp", "shm", "cuda", "verbs"], default="tcp")
    ap.add_argument("--seconds", type=float, default=1.0, help="per large-write size")
    ap.add_argument("--no-large", action="store_true", help="skip the 1-64 MiB rows")
    ap.add_argument("--small-n", type=int, default=SMALL_N, help="writes per small size (0: none)")
    ap.add_argument("--small-kib", type=int, nargs="+", default=list(SMALL_SIZES_KIB))
    ap.add_argument("--inflight", type=int, default=INFLIGHT, help="K writes in flight for throughput")
    ap.add_argument("--small-class", choices=["bulk", "latency"], default="bulk")
    ap.add_argument("--host", help="rx: the address to listen on, as the writer reaches it (named in the handles)")
    ap.add_argument("--port", type=int, default=0, help="rx: the data plane's port (0: any)")
    ap.add_argument("--handles", default="/tmp/dualpath_bench_handles.json")
    ap.add_argument("--out", default="runs/bench_transport.json")
    ap.add_argument("--verify", action="store_true", help="local: check every byte of odd-sized, random-offset, "
                    "empty and 64 MiB writes instead of timing (exit 1 if any differs)")
    ap.add_argument("--verify-big", action="store_true", help="as --verify, on a region over 1 GiB (one write "
                    "of more than 1 GiB; needs ~4 GiB of memory and that much locked memory on verbs)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.role == "rx" and not args.host:
        ap.error("--role rx needs --host: the address the writer's host reaches this one at")
    {"local": _main_local, "rx": _main_rx, "tx": _main_tx}[args.role](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
