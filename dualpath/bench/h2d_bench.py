"""`dualpath bench h2d`: KV from the pinned DRAM buffer into the paged HBM pool, next to the pinned
host-to-device copy peak measured in the same run (one large contiguous copy)."""

from __future__ import annotations

import time

import torch

from dualpath.bench.common import write_json
from dualpath.engine.buffers import BufferPool
from dualpath.engine.kvcache import KVPool
from dualpath.engine.architecture import PRESETS


def run(preset: str, dtype: str, blocks: int, out: str) -> dict:
    assert torch.cuda.is_available(), "bench h2d needs a CUDA device"
    cfg, td, bt = PRESETS[preset], getattr(torch, dtype), 64
    pool = KVPool(cfg, blocks + 8, bt, "cuda", td)
    buf = BufferPool(blocks, cfg.n_layers, pool.block_bytes_per_layer, pin=True)
    run_ = buf.try_alloc(blocks)
    ids = torch.randperm(blocks + 8, device="cuda")[:blocks]  # scattered HBM blocks, as in serving
    nbytes = blocks * cfg.n_layers * pool.block_bytes_per_layer

    def paged():
        view = buf.view(run_)
        for l in range(cfg.n_layers):
            src = view[l].view(td).view(blocks, bt, cfg.kv_width)
            pool.layer(l).index_copy_(0, ids, src.to("cuda", non_blocking=True))

    flat_dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")

    def peak():
        flat_dev.copy_(buf.host[:nbytes], non_blocking=True)

    rates = {}
    for name, fn in (("peak", peak), ("paged", paged)):
        fn()
        torch.cuda.synchronize()
        t0, n = time.perf_counter(), 10
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        rates[name] = n * nbytes / (time.perf_counter() - t0) / 1e9
    result = {"bench": "h2d", "preset": preset, "dtype": dtype, "bytes": nbytes,
              "paged_h2d_GBps": rates["paged"], "pinned_copy_peak_GBps": rates["peak"],
              "ratio": rates["paged"] / rates["peak"]}
    write_json(out, result)
    return result
