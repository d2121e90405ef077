"""`python -m dualpath.sim.measure`: one machine's compute profile for the simulator, measured with
the engines' own code, as grids the simulator interpolates (profile.py ``ComputeProfile``):

- **decode**: the DE's step (``DecodeGraphs.run``, then ``sample_batch``, as ``DecodeEngine._decode_step``
  runs them) over a grid of batch x context per sequence;
- **prefill**: the PE's step over one job (``Model.forward_paged`` of its new tokens over a cached
  context, then the first token's ``sample_batch``) over a grid of new x cached tokens.

Each grid is measured at the threads torch gives an engine alone on the machine, and at one thread:
on a host whose engines outnumber its cores (the CPU runs put three engine processes on two cores)
an engine gets about one core while the others compute. Nothing here is fitted to a cluster run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from dataclasses import dataclass

import torch

from dualpath.bench.common import write_json
from dualpath.engine.graphs import DecodeGraphs
from dualpath.engine.kvcache import KVPool
from dualpath.engine.model import Batch, Model, last_token_index
from dualpath.engine.runtime import sample_batch
from dualpath.engine.weights import load_pretrained
from dualpath.protocol import SamplingParams

DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 48)
CONTEXTS = (256, 1024, 2048, 4096, 8192)  # tokens per sequence
PREFILL_NEW = (16, 64, 256, 1024, 4096)
PREFILL_CACHED = (0, 1024, 2048, 4096, 8192)


@dataclass(frozen=True)
class Axes:
    """The grid's points: decode batch x context per sequence, prefill new x cached tokens."""
    batches: tuple[int, ...] = DECODE_BATCHES
    contexts: tuple[int, ...] = CONTEXTS
    new: tuple[int, ...] = PREFILL_NEW
    cached: tuple[int, ...] = PREFILL_CACHED


@dataclass
class Bench:
    """A model and a KV pool big enough for the largest grid point, with one block table per sequence."""
    model: Model
    pool: KVPool
    tables: list[list[int]]
    block_tokens: int
    device: str

    @staticmethod
    def build(preset: str, device: str, dtype: str, block_tokens: int, seqs: int, tokens: int) -> "Bench":
        torch_dtype = getattr(torch, dtype)
        model = load_pretrained(preset, device=device, dtype=torch_dtype)
        per_seq = -(-(tokens + 1) // block_tokens)
        pool = KVPool(model.cfg, seqs * per_seq + 2, block_tokens, device, torch_dtype)
        tables = [pool.allocator.alloc(per_seq) for _ in range(seqs)]
        return Bench(model, pool, tables, block_tokens, device)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # a step ends when the device is done with it, as sampling waits for it


def _median_s(fn, repeat: int) -> float:
    fn()  # warm-up (a GPU captures the step's graph here)
    _sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_grid(b: Bench, axes: Axes, repeat: int) -> list[dict]:
    graphs = DecodeGraphs(b.model, b.pool.kv, b.block_tokens, b.pool.allocator.alloc(1)[0], capture=True)
    greedy = SamplingParams()
    rows = []
    for batch in axes.batches:
        for ctx in axes.contexts:
            seqs = [(1, ctx, b.tables[i]) for i in range(batch)]
            rows_s = [(greedy, [1] * (ctx + 1), ctx) for _ in range(batch)]

            def step() -> None:
                logits = graphs.run(seqs)
                sample_batch(logits[:batch], rows_s)

            rows.append({"batch": batch, "context": ctx, "seconds": _median_s(step, repeat)})
    return rows


def prefill_grid(b: Bench, axes: Axes, repeat: int) -> list[dict]:
    greedy, rows = SamplingParams(), []
    for new in axes.new:
        for cached in axes.cached:
            ids = torch.ones(new, dtype=torch.long, device=b.device)
            batch = Batch.build([(b.tables[0], cached, new)], b.block_tokens, b.device)

            def step() -> None:
                logits = b.model.forward_paged(ids, batch, b.pool.kv)
                sample_batch(logits[last_token_index(batch)], [(greedy, [1] * (cached + new), cached + new)])

            rows.append({"new": new, "cached": cached, "seconds": _median_s(step, repeat)})
    return rows


def measure(preset: str, device: str, dtype: str, block_tokens: int, repeat: int, axes: Axes = Axes()) -> dict:
    most = max(max(axes.contexts), max(axes.new) + max(axes.cached))
    b = Bench.build(preset, device, dtype, block_tokens, max(axes.batches), most)
    grids = {}
    alone = torch.get_num_threads()
    for threads in sorted({alone, 1}, reverse=True):
        torch.set_num_threads(threads)
        grids[str(threads)] = {"decode": decode_grid(b, axes, repeat), "prefill": prefill_grid(b, axes, repeat)}
        print(f"  {threads} thread(s): decode and prefill grids done", flush=True)
    torch.set_num_threads(alone)
    return {"bench": "sim-profile", "preset": preset, "device": device, "dtype": dtype,
            "block_tokens": block_tokens, "machine": platform.node(), "threads_alone": alone,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "grids": grids}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny-gqa")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--block-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="runs/sim/profiles/cpu_tiny_gqa.json")
    a = ap.parse_args()
    result = measure(a.preset, a.device, a.dtype, a.block_tokens, a.repeat)
    write_json(a.out, result)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
