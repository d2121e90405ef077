"""Where the GPU and the CPU spend a prefill (32K cached + 513 new tokens) and a decode step of one
sequence over the same context. Usage: python3 examples/compute_profile.py [preset ...]"""
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from dualpath.engine.kvcache import KVPool
from dualpath.engine.model import Batch
from dualpath.engine.weights import load_pretrained

for preset in sys.argv[1:] or ["small-gqa"]:
    dev, td = torch.device("cuda:0"), torch.bfloat16
    model = load_pretrained(preset, dev, td)
    mc = model.cfg
    bt, cached, new = 64, 32768, 513
    n_blocks = -(-(cached + new) // bt)
    pool = KVPool(mc, n_blocks + 1, bt, dev, td)
    table = list(range(n_blocks))
    batch = Batch.build([(table, cached, new)], bt, dev)
    ids = torch.randint(0, 256, (new,), device=dev)

    def compute():
        h = model.embed(ids)
        for l in range(mc.n_layers):
            h = model.layer(l, h, batch, pool.layer(l))
        model.logits(h[-1:])

    for _ in range(2):
        compute()
    torch.cuda.synchronize()
    t = time.perf_counter()
    compute()
    cpu = time.perf_counter() - t
    torch.cuda.synchronize()
    print(f"{preset} prefill: enqueue {cpu * 1e3:.1f} ms, total {(time.perf_counter() - t) * 1e3:.1f} ms")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        compute()
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=6, max_name_column_width=60))
    dbatch = Batch.build([(table, cached + new - 1, 1)], bt, dev)

    def decode():
        return int(model.forward_paged(ids[:1], dbatch, pool.kv)[0].argmax())

    for _ in range(3):
        decode()
    t = time.perf_counter()
    for _ in range(10):
        decode()
    print(f"{preset} decode step (33K context, one sequence): {(time.perf_counter() - t) / 10 * 1e3:.1f} ms")
    del pool, model
    torch.cuda.empty_cache()
