"""`dualpath bench overlap`: does the PE overlap loading a long cached context with computing?

A real 1P1D cluster serves turn 1 of a conversation (`cached` tokens, computed and persisted),
then turn 2 (+`new` tokens) on path A. The PE reports how long turn 2's prefill took, from
admission to the sampled first token: storage reads layer by layer, host-to-device copies and
compute, overlapped. In this process, on the same device and the same stored blocks, two limits:
- load only: read the hit blocks into a pinned buffer and copy every layer to HBM;
- compute only: the same prefill with the hit KV already in HBM.
Target: overlapped <= 1.15 x max(load only, compute only).
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time

import torch

from dualpath.bench.common import bench_cluster, sync, write_json
from dualpath.config import ClusterConfig
from dualpath.engine.buffers import BufferPool
from dualpath.engine.kvcache import KVPool
from dualpath.engine.model import Batch
from dualpath.engine.weights import load_pretrained
from dualpath.launcher import LocalCluster, complete
from dualpath.protocol import LastPrefill, ask
from dualpath.storage.blockfile import BlockShape
from dualpath.storage.keys import block_chain
from dualpath.storage.store import open_store
from dualpath.transport.control import connect


async def _best(fn, repeat: int = 5) -> float:
    await fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - t0)
    return min(times)


async def _last_prefill(cfg: ClusterConfig) -> dict:
    """The PE's timeline of the prefill it just ran, asked of the PE itself."""
    pe = next(e for e in cfg.engines if e.role == "prefill")
    conn = await connect(pe.host, pe.port, cfg.transport.token, "bench-overlap")
    try:
        return await ask(conn, LastPrefill())
    finally:
        await conn.close()


def run(preset: str, dtype: str, device: str, cached: int, new: int, port: int, out: str, readers: int = 8,
        read_spans: int = 8) -> dict:
    bt, rng = 64, random.Random(0)
    turn1 = [rng.randrange(256) for _ in range(cached)]
    with tempfile.TemporaryDirectory(prefix="dualpath-overlap-") as work:
        store_root = f"{work}/store"
        cfg = bench_cluster(1, 1, preset, dtype, device, port, store_root)
        cfg.store.readers, cfg.store.read_spans = readers, read_spans
        with LocalCluster(cfg, f"{work}/run") as c:
            r1 = complete(c.url, {"prompt": turn1, "max_tokens": 1, "dualpath_policy": "pe-read"})
            context = turn1 + r1["choices"][0]["token_ids"]
            timelines = []
            for _ in range(3):  # turn 2 three times, each with its own new tokens; best of three
                prompt = context + [rng.randrange(256) for _ in range(new)]
                r2 = complete(c.url, {"prompt": prompt, "max_tokens": 1, "dualpath_policy": "pe-read"})
                timelines.append(asyncio.run(_last_prefill(cfg)))
            hit_blocks = r2["usage"]["prompt_tokens_details"]["cached_tokens"] // bt

        # The two limits, in this process, on the PE's device and the blocks the PE just read.
        dev, td = torch.device(cfg.engines[0].device), getattr(torch, dtype)
        model = load_pretrained(preset, dev, td)
        mc = model.cfg
        n_blocks = -(-len(prompt) // bt)
        pool = KVPool(mc, n_blocks + 1, bt, dev, td)
        buf = BufferPool(n_blocks, mc.n_layers, pool.block_bytes_per_layer, shared=True)  # as the PE's
        run_ = buf.try_alloc(n_blocks)
        shape = BlockShape(mc.n_layers, pool.block_bytes_per_layer, dtype, model.fingerprint)
        store = open_store(store_root, shape, 1 << 40, readers=cfg.store.readers, read_spans=cfg.store.read_spans)
        keys = block_chain(prompt, model.fingerprint, bt)[:hit_blocks]
        table = list(range(n_blocks))
        hbm_ids = torch.tensor(table[:hit_blocks], device=dev)

        async def load_only_s() -> float:
            await store.attach(buf.share_path, buf.host.numel())

            async def load_only():
                ok = await store.read_many(keys, buf.slot_dests(run_, 0))
                assert all(ok), "a stored block could not be read back"
                view = buf.view(run_)
                for l in range(mc.n_layers):
                    src = view[l, :hit_blocks].view(td).view(hit_blocks, bt, mc.kv_width)
                    pool.layer(l).index_copy_(0, hbm_ids, src.to(dev, non_blocking=True))
                sync(dev)

            try:
                return await _best(load_only)
            finally:
                await store.close()

        batch = Batch.build([(table, hit_blocks * bt, len(prompt) - hit_blocks * bt)], bt, dev)
        ids = torch.tensor(prompt[hit_blocks * bt:], device=dev)

        async def compute_only():
            with torch.no_grad():  # as the PE runs a step: rotary cos/sin once, then layer after layer
                h, cos_sin = model.embed(ids), model.rope_cos_sin(batch)
                for l in range(mc.n_layers):
                    h = model.layer(l, h, batch, pool.layer(l), cos_sin)
                model.logits(h[-1:])
            sync(dev)

        t_load, t_compute = asyncio.run(load_only_s()), asyncio.run(_best(compute_only))
    best = min(timelines, key=lambda t: t["total_s"])
    overlapped = best["total_s"]
    result = {"bench": "overlap", "preset": preset, "dtype": dtype, "device": str(dev), "readers": readers,
              "read_spans": read_spans,
              "cached_tokens": hit_blocks * bt, "new_tokens": len(prompt) - hit_blocks * bt,
              "prefill_s": overlapped, "prefill_s_runs": [t["total_s"] for t in timelines],
              "prefill_layer_landed_s": best["landed_s"], "prefill_layer_started_s": best["started_s"],
              "load_only_s": t_load, "compute_only_s": t_compute, "ratio_to_max": overlapped / max(t_load, t_compute),
              "sum_ratio_to_max": (t_load + t_compute) / max(t_load, t_compute)}
    write_json(out, result)
    return result
