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

Shapes, side by side (issue #34): one 64 MiB write, 24 x 2 MiB (one write per layer), 1536 x 32 KB
pieces (the per-block pieces of a request; each group all in flight at once, as the engines send
them) in GB/s, and the p50 of one 4 KB and one 32 KB write at a time (µs). Where the Mooncake
Transfer Engine is installed (``pip install 'dualpath[mooncake]'``) its TCP transport runs the same
shapes into a receiver process of its own (dualpath/bench/mooncake_peer.py), rounds alternating
dualpath and Mooncake, min / median / max over the rounds: ``shapes`` of the JSON, ``format_shapes``.
Without it the bench says so in one line and runs dualpath's rounds alone.

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
from dataclasses import dataclass, replace

import torch

from dualpath.bench import mooncake_peer
from dualpath.bench.common import write_json
from dualpath.process import use_engine_event_loop
from dualpath.transport import make_dataplane

TOKEN = os.environ.get("DUALPATH_BENCH_TOKEN", "bench")
SIZES_MIB = (1, 4, 16, 64)
SMALL_SIZES_KIB = (4, 16, 64, 256)
SMALL_N = 1000  # writes per size, one at a time (latency) and again K in flight (throughput)
INFLIGHT = 16  # K
REGION_BYTES = 64 << 20
PIECES_N = 1536  # the pieces shape: per-block pieces of one request, all in flight (issue #34)
PIECE_KIB = 32
ROUNDS = 3  # side-by-side rounds per system, alternating
LATENCY_N = 200  # one-at-a-time writes per latency shape and round (their p50)

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
    use_engine_event_loop()

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


# -- shapes side by side: dualpath and, where installed, the Mooncake Transfer Engine (issue #34) --

def _size(nbytes: int) -> str:
    return f"{nbytes >> 20} MiB" if nbytes >= 1 << 20 and nbytes % (1 << 20) == 0 else f"{nbytes >> 10} KB"


@dataclass(frozen=True)
class Shapes:
    """What each side-by-side round writes: one big write, one write per layer, per-block pieces
    (each group all in flight at once, as the engines send them: GB/s), then writes of each
    latency size one at a time (p50 µs). Offsets past the region wrap round-robin."""
    big_bytes: int = 64 << 20
    layers: int = 24
    layer_bytes: int = 2 << 20
    pieces: int = PIECES_N
    piece_bytes: int = PIECE_KIB << 10
    latency_bytes: tuple[int, ...] = (4 << 10, 32 << 10)
    latency_n: int = LATENCY_N
    rounds: int = ROUNDS

    def groups(self) -> list[tuple[str, str, int, int]]:
        """(key, label, writes, bytes each) of the GB/s shapes."""
        return [(f"write_{self.big_bytes}", f"one {_size(self.big_bytes)} write", 1, self.big_bytes),
                (f"layers_{self.layers}x{self.layer_bytes}", f"{self.layers} x {_size(self.layer_bytes)}",
                 self.layers, self.layer_bytes),
                (f"pieces_{self.pieces}x{self.piece_bytes}", f"{self.pieces} x {_size(self.piece_bytes)} pieces",
                 self.pieces, self.piece_bytes)]

    def latencies(self) -> list[tuple[str, str, int]]:
        """(key, label, bytes) of the p50 shapes."""
        return [(f"latency_{n}", f"one {_size(n)} write p50", n) for n in self.latency_bytes]


def _spread(n: int, nbytes: int, room: int) -> list[tuple[int, int, int]]:
    """(source offset, destination offset, bytes) of n pieces: piece i from and to slot i, slots
    reused round-robin past room (the same layout both sides, as an engine's buffer and its peer's)."""
    slots = max(1, room // nbytes)
    return [((i % slots) * nbytes, (i % slots) * nbytes, nbytes) for i in range(n)]


class DualpathSide:
    """dualpath's writer for the shapes: one write, or many all in flight (asyncio.gather, as the
    engines' handoff and path B send theirs); src[off:] views, so each piece has its own bytes."""
    name = "dualpath"

    def __init__(self, dp, src: torch.Tensor, dst: dict, traffic_class: str = "bulk"):
        self.dp, self.src, self.dst, self.tc = dp, src, dst, traffic_class

    async def one(self, src_off: int, dst_off: int, nbytes: int) -> None:
        await self.dp.write(self.src[src_off:], self.dst, dst_off, nbytes, self.tc)

    async def many(self, pieces: list[tuple[int, int, int]]) -> None:
        await asyncio.gather(*(self.one(s, d, n) for s, d, n in pieces))


class MooncakeSide:
    """Mooncake's writer for the shapes: transfer_sync_write, or one batch_transfer_sync_write (how
    SGLang's and vLLM's connectors send a request's pieces). Its calls block the event loop, which
    has nothing else to do meanwhile: dualpath's round is over before Mooncake's starts."""
    name = "mooncake"

    def __init__(self, writer: mooncake_peer.MooncakeWriter):
        self.w = writer

    async def one(self, src_off: int, dst_off: int, nbytes: int) -> None:
        self.w.write(src_off, dst_off, nbytes)

    async def many(self, pieces: list[tuple[int, int, int]]) -> None:
        self.w.write_batch(pieces)


async def _group_gbps(side, pieces: list[tuple[int, int, int]]) -> float:
    t0 = time.perf_counter()
    await (side.one(*pieces[0]) if len(pieces) == 1 else side.many(pieces))
    return sum(n for _, _, n in pieces) / (time.perf_counter() - t0) / 1e9


async def _p50_us(side, nbytes: int, n: int, room: int) -> float:
    us = []
    for s, d, k in _spread(n, nbytes, room):
        t0 = time.perf_counter()
        await side.one(s, d, k)
        us.append((time.perf_counter() - t0) * 1e6)
    return _pct(us, 50)


async def shape_round(side, shapes: Shapes, room: int) -> dict[str, float]:
    """One round of every shape on one side: {key: GB/s or p50 µs}."""
    out = {}
    for key, _, n, nbytes in shapes.groups():
        out[key] = await _group_gbps(side, _spread(n, min(nbytes, room), room))
    for key, _, nbytes in shapes.latencies():
        out[key] = await _p50_us(side, nbytes, shapes.latency_n, room)
    return out


def _stats(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "rounds": xs}


async def side_by_side(sides: list, shapes: Shapes, room: int) -> list[dict]:
    """An untimed round per side (links, segments, allocators), then shapes.rounds rounds, each
    side's in turn (dualpath, Mooncake, dualpath, ...: a drift of the host weighs on both); a row
    per shape with each side's min / median / max over the rounds."""
    for side in sides:
        await shape_round(side, replace(shapes, latency_n=min(20, shapes.latency_n)), room)
    got: dict[str, list[dict[str, float]]] = {side.name: [] for side in sides}
    for _ in range(shapes.rounds):
        for side in sides:
            got[side.name].append(await shape_round(side, shapes, room))
    rows = [(key, label, "GBps", n * min(nbytes, room)) for key, label, n, nbytes in shapes.groups()]
    rows += [(key, label, "p50_us", nbytes) for key, label, nbytes in shapes.latencies()]
    return [{"shape": key, "label": label, "unit": unit, "bytes": nbytes,
             **{name: _stats([r[key] for r in rounds]) for name, rounds in got.items()}}
            for key, label, unit, nbytes in rows]


def _start_mooncake(ctx, stop) -> tuple[object | None, object | None, dict]:
    """Mooncake's receiver process, where Mooncake is installed: (process, its queue, its published
    dict); else (None, None, {"error": why})."""
    if (ver := mooncake_peer.version()) is None:
        return None, None, {"error": f"not installed (pip install 'dualpath[mooncake]': {mooncake_peer.PACKAGE})"}
    mq = ctx.Queue()
    proc = ctx.Process(target=mooncake_peer.serve, args=(mq, stop, REGION_BYTES), daemon=True)
    proc.start()
    try:
        info = mq.get(timeout=60)
    except queue_mod.Empty:
        info = {"error": "its receiver did not start within 60 s"}
    if "error" in info:
        proc.kill()
        proc.join()
        return None, None, {**info, "version": ver}
    return proc, mq, info


def _mooncake_line(mc: dict) -> str:
    """The one line that says why Mooncake is not beside dualpath."""
    return f"Mooncake Transfer Engine {mc['error']}: the shapes ran for dualpath alone"


def format_shapes(result: dict) -> str:
    """The side-by-side shapes as a table: min / median / max over the rounds per system."""
    sb = result.get("shapes") or {}
    if not sb.get("rows"):
        return ""
    names = [n for n in ("dualpath", "mooncake") if n in sb["rows"][0]]
    heads = {"dualpath": f"dualpath {sb['dualpath']}", "mooncake": f"Mooncake TE {sb['mooncake'].get('version')} tcp"}
    w = max(24, *(len(heads[n]) for n in names))
    order = f" ({' and '.join(names)} alternating)" if len(names) > 1 else ""
    lines = [f"shapes, {sb['rounds']} rounds{order}, min / median / max; "
             f"figures of the host that ran it:",
             f"{'shape':<24} {'unit':<4}" + "".join(f"  {heads[n]:>{w}}" for n in names)]
    for r in sb["rows"]:
        fmt = "{:.3f}" if r["unit"] == "GBps" else "{:.0f}"
        cells = [" / ".join(fmt.format(r[n][k]) for k in ("min", "median", "max")) for n in names]
        unit = "GB/s" if r["unit"] == "GBps" else "us"
        lines.append(f"{r['label']:<24} {unit:<4}" + "".join(f"  {c:>{w}}" for c in cells))
    if "error" in sb["mooncake"]:
        lines.append(_mooncake_line(sb["mooncake"]))
    return "\n".join(lines)


async def _shapes(dp, src: torch.Tensor, handle: dict, shapes: Shapes, mooncake: dict | None,
                  traffic_class: str) -> tuple[list[dict], dict]:
    """The side-by-side rows, with Mooncake's side where its receiver published a region (mooncake),
    and what became of Mooncake: mooncake itself, or {"error"} if its writer did not start."""
    sides, mc = [DualpathSide(dp, src, handle, traffic_class)], dict(mooncake or {})
    room = min(handle.get("nbytes", REGION_BYTES), src.numel())
    writer = None
    if mooncake and "error" not in mooncake:
        try:
            writer = mooncake_peer.MooncakeWriter(mooncake, REGION_BYTES)
            sides.append(MooncakeSide(writer))
            room = min(room, mooncake["nbytes"])
        except Exception as e:  # say so, and go on with dualpath alone
            mc = {**mc, "error": f"writer did not start ({e})"}
    try:
        return await side_by_side(sides, shapes, room), mc
    finally:
        if writer is not None:
            writer.close()


async def _sender(backend: str, device: str, handle: dict, seconds: float, lat_handle: dict | None = None,
                  small: dict | None = None, large: bool = True, shapes: Shapes | None = None,
                  mooncake: dict | None = None) -> dict:
    """The writing end: large-write GB/s (1-64 MiB, `seconds` each), small-write rows (small: the
    keyword arguments of small_writes, or None to skip), the side-by-side shapes (shapes, or None to
    skip; with Mooncake's side where mooncake is its receiver's published dict), the
    latency-under-bulk figure (lat_handle); and what this end used: {"backend", "links"}."""
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
    tc = (small or {}).get("traffic_class", "bulk")
    shape_rows, mc = await _shapes(dp, src, handle, shapes, mooncake, tc) if shapes else ([], dict(mooncake or {}))
    latency = await _latency_under_bulk(dp, src, handle, lat_handle) if lat_handle is not None else None
    used = _used(dp)
    await dp.close()
    return {"rates": rates, "small": rows, "shapes": shape_rows, "mooncake": mc, "latency": latency, "used": used}


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


def _shapes_of(pieces_n: int, piece_kib: int, rounds: int, shapes: Shapes | None) -> Shapes | None:
    """The side-by-side shapes run() asks for: shapes as given, else the defaults with pieces_n x
    piece_kib pieces and `rounds` rounds; None (no shape rows) for 0 rounds or 0 pieces."""
    shapes = shapes or Shapes(pieces=pieces_n, piece_bytes=piece_kib << 10, rounds=rounds)
    return shapes if shapes.rounds > 0 and shapes.pieces > 0 else None


def _stop_mooncake(proc, mq, mc: dict) -> dict:
    """End Mooncake's receiver (its stop event is set): what it saw (landed_bytes) joins mc."""
    if proc is None:
        return mc
    try:
        mc = {**mc, **mq.get(timeout=30)}
    except queue_mod.Empty:
        pass
    finally:
        proc.kill()
        proc.join()
    return mc


SHAPES_NOTE = ("rows: GB/s of one write, of one write per layer and of the pieces (each group all in flight: "
               "dualpath asyncio.gather, Mooncake one batch_transfer_sync_write), and the p50 of writes one at "
               "a time (µs); per system min / median / max over the rounds, rounds alternating systems after "
               "an untimed one each; Mooncake: its TCP transport, host memory, P2PHANDSHAKE, loopback")


def _shapes_result(got: dict, shapes: Shapes | None, mc: dict, backend: str) -> dict | None:
    """The JSON's ``shapes``: the rows, the rounds, and each system as it ran (Mooncake: its version,
    the bytes its receiver found written, or the error that kept it out)."""
    if shapes is None:
        return None
    return {"rounds": shapes.rounds, "shapes": {k: v for k, v in vars(shapes).items() if k != "rounds"},
            "dualpath": f"{backend} (writer ran {got['used']['backend']})",
            "mooncake": {k: v for k, v in mc.items() if k in ("version", "session", "landed_bytes", "error")},
            "rows": got["shapes"]}


def run(backend: str, seconds: float, out: str, small_n: int = SMALL_N, inflight: int = INFLIGHT,
        small_sizes_kib=SMALL_SIZES_KIB, small_class: str = "bulk", small: bool = True, large: bool = True,
        pieces_n: int = PIECES_N, piece_kib: int = PIECE_KIB, rounds: int = ROUNDS, mooncake: bool = True,
        shapes: Shapes | None = None, echo: bool = True) -> dict:
    """The bench between this process and a receiver process of this host. small_n=0 or small=False
    skips the small-write rows; large=False the 1-64 MiB ones (and the reference); rounds=0 the
    side-by-side shapes (pieces_n x piece_kib pieces; `shapes` replaces them all), mooncake=False
    Mooncake's side of them. echo prints the small-write and shape tables and what each end used
    (the CLI prints the large-write rows)."""
    use_engine_event_loop()  # both ends run the loop the engines run
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    shapes = _shapes_of(pieces_n, piece_kib, rounds, shapes)
    # receiver on the second GPU where there is one (on one GPU both share it)
    rx_dev, tx_dev = ("cpu", "cpu")
    if backend == "cuda":
        rx_dev, tx_dev = f"cuda:{min(1, torch.cuda.device_count() - 1)}", "cuda:0"
    proc = ctx.Process(target=_receiver, args=(backend, rx_dev, q, stop), daemon=True)
    proc.start()
    mc_proc, mq, mc = None, None, {"error": "not asked for (mooncake=False)"}
    rx_used = None
    try:
        if shapes and mooncake:
            mc_proc, mq, mc = _start_mooncake(ctx, stop)
        info = q.get(timeout=60)
        small_kw = ({"sizes_kib": tuple(small_sizes_kib), "n": small_n, "inflight": inflight,
                     "traffic_class": small_class} if small and small_n > 0 else None)
        # the link-sharing figure is tcp's: the other backends move bulk bytes outside the socket
        got = asyncio.run(_sender(backend, tx_dev, info["handle"], seconds,
                                  info["lat_handle"] if backend == "tcp" and large else None, small_kw, large,
                                  shapes, mc))
        mc = got["mooncake"]
        stop.set()
        try:
            rx_used = q.get(timeout=30)
        except queue_mod.Empty:
            rx_used = None
    finally:
        stop.set()
        mc = _stop_mooncake(mc_proc, mq, mc)
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
        "shapes": _shapes_result(got, shapes, mc, backend),
        "backend_used": {"writer": got["used"], "receiver": rx_used},
        "all_links_requested": _all_links(backend, got["used"], rx_used),
        "notes": {"host": "CPU figures of the host that ran it (a shared VM here: noisy, few cores)",
                  "small_writes": "one_at_a_time: each write awaited before the next; in_flight: k writes "
                                  "outstanding at once, n in all",
                  "shapes": SHAPES_NOTE,
                  "mooncake_reference": MOONCAKE_NOTES},
    })
    write_json(out, result)
    if echo:
        for table in (format_small(result), format_shapes(result)):
            if table:
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


async def _verify_pieces(dp, dst: dict, region_bytes: int, n: int, nbytes: int, seed: int) -> dict:
    """The pieces shape as the bench sends it (DualpathSide.many: n writes of nbytes, all in flight,
    piece i from and to slot i) from a random source, and the region it must leave: its sha256."""
    src = torch.randint(0, 256, (region_bytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    if hasattr(dp, "mrs"):  # verbs: the source is a registered region
        dp.register(src)
    pieces = _spread(n, nbytes, region_bytes)
    await DualpathSide(dp, src, dst).many(pieces)
    expected = torch.zeros(region_bytes, dtype=torch.uint8)
    for s, d, k in pieces:
        expected[d:d + k] = src[s:s + k]
    return {"writes": n, "bytes": n * nbytes, "largest_write": nbytes, "zero_byte_writes": 0,
            "odd_sized_writes": n * (nbytes % 2), "pieces": [n, nbytes], "seed": seed,
            "expected_sha256": _sha256(expected)}


def run_verify(backend: str, out: str | None = None, big: bool = False, n_random: int = 64, seed: int = 0,
               echo: bool = True, pieces: tuple[int, int] | None = None) -> dict:
    """Writes of verify_cases (or, with pieces=(n, bytes), the pieces shape) into a receiver
    process of this host, then the receiver's region hashed there and compared with what the
    writes must have left: every byte checked."""
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
            if pieces:
                got = await _verify_pieces(dp, info["handle"], region_bytes, *pieces, seed)
            else:
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
    shapes = _shapes_of(args.pieces, args.piece_kib, args.rounds, None)  # dualpath alone: Mooncake is local only
    got = asyncio.run(_sender(args.backend, "cpu", info["handle"], args.seconds, None, small_kw, not args.no_large,
                              shapes))
    rx = {"backend": info["backend"], "links": None}  # the receiver prints its own as it sees them
    result = {"bench": "transport", "backend": args.backend, "two_hosts": True, "write_GBps_by_MiB": got["rates"],
              "small_writes": got["small"],
              "shapes": _shapes_result(got, shapes, {"error": "not run across hosts"}, args.backend),
              "backend_used": {"writer": got["used"], "receiver": rx},
              "all_links_requested": (got["used"]["backend"] == args.backend == info["backend"]
                                      and bool(got["used"]["links"])
                                      and all(v == args.backend for v in got["used"]["links"].values())),
              "notes": {"receiver_links": "printed by the receiver (--role rx) as it sees them",
                        "mooncake_reference": MOONCAKE_NOTES}}
    write_json(args.out, result)
    for mib, gbps in got["rates"].items():
        print(f"{args.backend} write {mib:>3} MiB: {gbps:.2f} GB/s")
    for table in (format_small(result), format_shapes(result)):
        if table:
            print(table)
    print(f"backend asked {args.backend}: writer {got['used']['backend']} links {got['used']['links']}; "
          f"receiver {info['backend']} (its links: its own output); all writer links {args.backend}: "
          f"{'yes' if result['all_links_requested'] else 'NO'}")
    print(f"wrote {args.out}")


def _main_local(args) -> None:
    if args.verify or args.verify_big or args.verify_pieces:
        pieces = (args.pieces, args.piece_kib << 10) if args.verify_pieces else None
        r = run_verify(args.backend, args.out, big=args.verify_big, seed=args.seed, pieces=pieces)
        print(f"wrote {args.out}")
        sys.exit(0 if r["verify"]["match"] else 1)
    r = run(args.backend, args.seconds, args.out, small_n=args.small_n, inflight=args.inflight,
            small_sizes_kib=args.small_kib, small_class=args.small_class, large=not args.no_large,
            pieces_n=args.pieces, piece_kib=args.piece_kib, rounds=args.rounds, mooncake=not args.no_mooncake)
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
    ap.add_argument("--pieces", type=int, default=PIECES_N, help="pieces per round of the pieces shape")
    ap.add_argument("--piece-kib", type=int, default=PIECE_KIB, help="KiB per piece")
    ap.add_argument("--rounds", type=int, default=ROUNDS, help="side-by-side rounds per system (0: no shapes)")
    ap.add_argument("--no-mooncake", action="store_true", help="shapes for dualpath alone, even where Mooncake "
                    "is installed")
    ap.add_argument("--host", help="rx: the address to listen on, as the writer reaches it (named in the handles)")
    ap.add_argument("--port", type=int, default=0, help="rx: the data plane's port (0: any)")
    ap.add_argument("--handles", default="/tmp/dualpath_bench_handles.json")
    ap.add_argument("--out", default="runs/bench_transport.json")
    ap.add_argument("--verify", action="store_true", help="local: check every byte of odd-sized, random-offset, "
                    "empty and 64 MiB writes instead of timing (exit 1 if any differs)")
    ap.add_argument("--verify-big", action="store_true", help="as --verify, on a region over 1 GiB (one write "
                    "of more than 1 GiB; needs ~4 GiB of memory and that much locked memory on verbs)")
    ap.add_argument("--verify-pieces", action="store_true", help="as --verify, for the pieces shape "
                    "(--pieces x --piece-kib, all in flight)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.role == "rx" and not args.host:
        ap.error("--role rx needs --host: the address the writer's host reaches this one at")
    {"local": _main_local, "rx": _main_rx, "tx": _main_tx}[args.role](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
