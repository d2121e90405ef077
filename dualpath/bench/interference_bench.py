"""`dualpath bench interference`: does path-B bulk traffic slow down decoding on the DE?

On a 1P1D cluster a long decode request streams its tokens twice: alone, and while other requests
load long cached contexts over path B through the same DE (its storage reads, the bulk writes to
the PE, and the merge). TPOT is the median gap between streamed tokens. Target: < 5% increase.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import tempfile
import time

import aiohttp

from dualpath.bench.common import bench_cluster, write_json
from dualpath.launcher import LocalCluster, complete


async def _stream_gaps(http: aiohttp.ClientSession, url: str, body: dict) -> list[float]:
    times = []
    async with http.post(url + "/v1/completions", json={**body, "stream": True}) as resp:
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("data: {") and '"finish_reason": null' in line:  # a token (not the last chunk)
                times.append(time.monotonic())
    return [b - a for a, b in zip(times[1:], times[2:])]  # from the 2nd decode step on


async def _measure(url: str, decode_body: dict, background: list[dict]) -> tuple[list[float], int]:
    """TPOT gaps of one decode request; meanwhile `background` requests run back to back, two at a
    time, until it ends. Returns the gaps and the number of background requests completed."""
    done, stop = [0], asyncio.Event()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:

        async def loader(k: int) -> None:
            i = k
            while not stop.is_set():
                async with http.post(url + "/v1/completions", json=background[i % len(background)]) as r:
                    body = await r.json()
                    if r.status != 200 or body["dualpath"]["path"] != "B":
                        raise RuntimeError(f"background request did not take path B: {json.dumps(body)[:300]}")
                done[0] += 1
                i += 2

        loaders = [asyncio.create_task(loader(k)) for k in range(2)] if background else []
        await asyncio.sleep(1.0 if background else 0)  # let the bulk traffic reach a steady state
        gaps = await _stream_gaps(http, url, decode_body)
        stop.set()
        await asyncio.gather(*loaders)
    return gaps, done[0]


def run(preset: str, dtype: str, device: str, context: int, decode_tokens: int, port: int, out: str,
        readers: int = 8, read_spans: int = 8) -> dict:
    rng = random.Random(1)
    with tempfile.TemporaryDirectory(prefix="dualpath-interf-") as work:
        cfg = bench_cluster(1, 1, preset, dtype, device, port, f"{work}/store")
        cfg.store.readers, cfg.store.read_spans = readers, read_spans
        with LocalCluster(cfg, f"{work}/run") as c:
            # Background: four long contexts, stored once; later turns add 16 tokens and read the rest
            # on path B (max_tokens 1: no decoding, so only the loading traffic competes).
            background = []
            for _ in range(4):
                ctx = [rng.randrange(256) for _ in range(context)]
                ctx += complete(c.url, {"prompt": ctx, "max_tokens": 1})["choices"][0]["token_ids"]
                background.append(ctx)
            bodies = [{"prompt": ctx + [rng.randrange(256) for _ in range(16)], "max_tokens": 1,
                       "dualpath_policy": "de-read"} for ctx in background]
            decode = {"prompt": [rng.randrange(256) for _ in range(1024)], "max_tokens": decode_tokens,
                      "temperature": 0, "dualpath_policy": "pe-read"}
            try:
                alone, _ = asyncio.run(_measure(c.url, decode, []))
                busy, n_bg = asyncio.run(_measure(c.url, decode, bodies))
                alone2, _ = asyncio.run(_measure(c.url, decode, []))  # again, to see the noise floor
            except RuntimeError as e:
                logs = "".join(f"\n-- {x.name} log --\n{c.log_tail(x.name, 30)}" for x in cfg.engines)
                raise RuntimeError(f"{e}{logs}") from None
    tpot_alone = statistics.median(alone + alone2)
    tpot_busy = statistics.median(busy)
    duration = sum(busy)
    result = {"bench": "interference", "preset": preset, "dtype": dtype, "device": device, "readers": readers,
              "read_spans": read_spans,
              "background_context_tokens": context, "decode_tokens": decode_tokens,
              "tpot_alone_s": tpot_alone, "tpot_with_path_b_s": tpot_busy,
              "increase": tpot_busy / tpot_alone - 1, "tpot_alone_runs_s": [statistics.median(alone),
                                                                            statistics.median(alone2)],
              "background_requests": n_bg, "background_tokens_loaded_per_s": n_bg * context / duration}
    write_json(out, result)
    return result
