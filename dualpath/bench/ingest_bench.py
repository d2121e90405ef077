"""`dualpath bench ingest`: how fast the engines' load path moves stored KV into HBM, storage unthrottled.

On a 1P1D cluster whose storage NICs are not emulated (reads come from the page cache), `requests`
conversations each store `context` tokens of KV (turn 1). Then every turn 2 is sent at once, so
the requests queue behind each other, once through path A (`pe-read`: the PE reads) and once
through path B (`de-read`: the DE reads and writes to the PE); each turn 2 hits every stored block
and computes only a few new tokens. Ingest is the hit bytes of the whole batch over its wall time.
Each batch is sent twice and the second is timed (the first compiles the GPU kernels of its
shapes); both engines have room for every request at once, so admission does not pace the loads.

Measured in the same run and printed beside it:
- compute only: the same stream with the hits replaced by nothing to load (prompts of the new tokens
  alone), i.e. everything but the loading;
- raw page-cache read of the same block files (one thread per file set, as large reads);
- the host-to-device copy peak (pinned memory -> HBM on CUDA; a memory copy on the CPU).

The profile: each engine's seconds per stage of its load and compute path during each run (the
``stage_seconds`` its heartbeats report: reader processes busy, waits for KV, compute, handoff
copies and sends, merges), so a slow path says where its time went.
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import torch

from dualpath.bench.common import bench_cluster, write_json
from dualpath.launcher import LocalCluster, complete

NEW_TOKENS = 16  # turn 2 appends this many tokens: almost all of it is a hit


async def _batch(url: str, bodies: list[dict]) -> tuple[float, list[dict]]:
    """Send every request at once; wall time until the last answer, and the answers."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as http:
        async def one(body):
            async with http.post(url + "/v1/completions", json=body) as r:
                reply = await r.json()
                if r.status != 200:
                    raise RuntimeError(f"request failed ({r.status}): {reply}")
                return reply

        t0 = time.perf_counter()
        replies = await asyncio.gather(*(one(b) for b in bodies))
        return time.perf_counter() - t0, replies


def _raw_read_gbps(root: str, threads: int = 8) -> float:
    files = [p for p in Path(root).rglob("*") if p.is_file()]
    nbytes = sum(p.stat().st_size for p in files)

    def read(paths):
        buf = bytearray(4 << 20)
        for p in paths:
            with open(p, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass

    parts = [files[i::threads] for i in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read, parts))  # into the page cache
        t0 = time.perf_counter()
        list(pool.map(read, parts))
        return nbytes / (time.perf_counter() - t0) / 1e9


def _copy_peak_gbps(device: str, nbytes: int = 256 << 20) -> float:
    """Pinned host -> device on CUDA, else one host memory copy: the ceiling of the last hop."""
    on_cuda = device.startswith("cuda")
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=on_cuda)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0" if on_cuda else "cpu")
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=on_cuda)
        if on_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def _stage_seconds(url: str) -> dict[str, dict[str, float]]:
    engines = _get_json(url + "/v1/cluster")["engines"]
    return {name: e.get("stage_seconds", {}) for name, e in engines.items()}


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def _profiled(c: LocalCluster, fn):
    """Run fn(); return its result and each engine's stage seconds spent meanwhile (heartbeat-fresh)."""
    settle = 3 * c.cfg.scheduler.heartbeat_s + 0.1
    time.sleep(settle)
    before = _stage_seconds(c.url)
    out = fn()
    time.sleep(settle)
    after = _stage_seconds(c.url)
    return out, {name: {k: round(v - before.get(name, {}).get(k, 0.0), 4) for k, v in stages.items()
                        if v - before.get(name, {}).get(k, 0.0) > 1e-4}
                 for name, stages in after.items()}


def run(preset: str, dtype: str, device: str, requests: int, context: int, port: int, out: str,
        readers: int = 8, read_spans: int = 8) -> dict:
    rng = random.Random(3)
    prompts = [[rng.randrange(256) for _ in range(context)] for _ in range(requests)]
    with tempfile.TemporaryDirectory(prefix="dualpath-ingest-") as work:
        cfg = bench_cluster(1, 1, preset, dtype, device, port, f"{work}/store")
        cfg.store.readers, cfg.store.read_spans = readers, read_spans
        per_request = -(-(context + 64) // cfg.store.block_tokens)  # blocks of a turn 2
        # room for every request at once on each engine (+1: a DE's scratch block), so that what is
        # measured is the load path, not admission; and a write-behind queue for all of turn 1
        cfg.engine.buffer_blocks = cfg.engine.hbm_blocks = max(cfg.engine.buffer_blocks, requests * per_request + 1)
        cfg.store.write_queue_blocks = max(cfg.store.write_queue_blocks, requests * per_request)
        with LocalCluster(cfg, f"{work}/run") as c:
            turn2 = []
            for p in prompts:  # turn 1 stores the context
                out1 = complete(c.url, {"prompt": p, "max_tokens": 1})["choices"][0]["token_ids"]
                turn2.append(p + out1 + [rng.randrange(256) for _ in range(NEW_TOKENS)])
            time.sleep(1.0)  # write-behind: let the last blocks reach the store
            paths, profile = {}, {}
            for policy, path in (("pe-read", "A"), ("de-read", "B")):
                bodies = [{"prompt": t, "max_tokens": 1, "dualpath_policy": policy} for t in turn2]
                # The same batch once untimed first: on a fresh GPU host the first attention call of
                # each shape (batch size, context) compiles its kernels (cuDNN: 0.05-1.4 s each)
                first_s, _ = asyncio.run(_batch(c.url, bodies))
                (wall, replies), profile[path] = _profiled(c, lambda: asyncio.run(_batch(c.url, bodies)))
                hit = sum(sum(r["dualpath"]["read_bytes"].values()) for r in replies)
                taken = {r["dualpath"]["path"] for r in replies}
                if taken != {path}:
                    raise RuntimeError(f"{policy} took paths {taken}, expected {path}")
                paths[path] = {"wall_s": wall, "first_pass_s": first_s, "hit_bytes": hit, "GBps": hit / wall / 1e9,
                               "cached_tokens": sum(r["usage"]["prompt_tokens_details"]["cached_tokens"]
                                                    for r in replies)}
            new_only = [t[len(p):] for t, p in zip(turn2, prompts)]
            bodies = [{"prompt": t, "max_tokens": 1, "dualpath_policy": "pe-read"} for t in new_only]
            asyncio.run(_batch(c.url, bodies))  # untimed first, as above
            (compute_s, _), profile["compute only"] = _profiled(c, lambda: asyncio.run(_batch(c.url, bodies)))
        raw = _raw_read_gbps(f"{work}/store")
    peak = _copy_peak_gbps(device)
    result = {"bench": "ingest", "preset": preset, "dtype": dtype, "device": device, "requests": requests,
              "context_tokens": context, "readers": readers, "read_spans": read_spans, "paths": paths,
              "compute_only_s": compute_s, "raw_page_cache_read_GBps": raw, "copy_peak_GBps": peak,
              "ratio_to_raw_read": {p: v["GBps"] / raw for p, v in paths.items()}, "profile_s": profile}
    write_json(out, result)
    return result
