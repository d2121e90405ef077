"""`python -m dualpath.sim.measure`: one machine's compute profile for the simulator, measured with
the engines' own code, as grids the simulator interpolates (profile.py ``ComputeProfile``):

- **decode**: the DE's step (``DecodeGraphs.run``, then ``sample_batch``, as ``DecodeEngine._decode_step``
  runs them) over a grid of batch x context per sequence;
- **prefill**: the PE's step over one job (``Model.forward_paged`` of its new tokens over a cached
  context, then the first token's ``sample_batch``) over a grid of new x cached tokens.

Each grid is measured at the threads torch gives an engine alone on the machine, and at one thread:
on a host whose engines outnumber its cores (the CPU runs put three engine processes on two cores)
an engine gets about one core while the others compute. Nothing here is fitted to a cluster run.

With ``--host``: the host costs, what a live cluster's engines pay beyond their model steps
(issue #35 item 1), added to an existing profile as ``host_costs``.

The grids time a model step alone. A live cluster on this machine pays more:
the event loop's messages, the compute thread's hops, token relays to the coordinator and the
client, merges and handoffs, and engines that share two cores and a GIL each. A ``HostCosts``
holds those costs in the four forms the simulator charges them (profile.py ``HostCosts``, simulator.py):

- ``request_s``: per request, on its path between its prefill and its first token (the admit and
  handoff round trips, the Prefilled message, the HTTP stream), holding no engine;
- ``step_s``: per engine step (PE and DE), on that engine (the loop's hops and messages);
- ``seq_s``: per sequence in a decode step (its token emitted, relayed and streamed);
- ``block_s``: per prompt block of a job starting a prefill step (its hit KV copied into HBM and its
  KV out for the handoff, on the engine's one compute thread).

How they are obtained: ``measure_host`` starts a 1P2D cluster of the engines on this machine, storage not
emulated, and drives four **probes** through the benchmark driver (``bench/driver.py``), each a
workload of one fixed shape built to make one cost dominate: one agent whose 24 turns have one-token
answers (``request_s``), one agent of four 64-token answers (``step_s``), 16 agents of two 48-token
answers (``seq_s``), 16 agents of two 16-token answers over 3,008 stored tokens each
(``block_s``). ``calibrate`` then solves each cost, in that order, so that the simulator run on
that probe's own workload ends when the probe did (bisection: a probe's time grows with its cost).
The probes share no workload with the committed `bench repro` runs that `sim validate` checks (16 or
48 agentic sessions of 9 turns, seed 1): nothing is fitted to a run the simulator is checked against.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from dualpath.bench.common import write_json
from dualpath.bench.workload import Session, Turn
from dualpath.engine.graphs import DecodeGraphs
from dualpath.engine.kvcache import KVPool
from dualpath.engine.model import Batch, Model, last_token_index
from dualpath.engine.runtime import sample_batch
from dualpath.engine.weights import load_pretrained
from dualpath.protocol import SamplingParams
from dualpath.sim.profile import GridProfile, HostCosts

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


@dataclass(frozen=True)
class Probe:
    """A workload of one shape: `sessions` agents at once, closed loop (as the driver's offline mode
    and the simulator run them), each `turns` timed turns of `new` tokens and `answer` tokens, after
    an untimed turn of `stored` tokens (0: none) whose KV the timed turns then hit."""
    name: str
    cost: str  # the HostCosts field this probe sets
    sessions: int
    turns: int
    new: int
    answer: int
    stored: int = 0

    def workload(self) -> list[Session]:
        first = [Turn(self.stored, 1)] if self.stored else []
        return [Session(i, 0.0, first + [Turn(self.new, self.answer)] * self.turns) for i in range(self.sessions)]

    @property
    def warmup_turns(self) -> int:
        return 1 if self.stored else 0


# In the order they are solved: each holds the costs solved before it.
PROBES = (
    Probe("one agent, one-token answers", "request_s", 1, 24, 64, 1),
    Probe("one agent, 64-token answers", "step_s", 1, 4, 64, 64),
    Probe("16 agents, 48-token answers", "seq_s", 16, 2, 64, 48),
    Probe("16 agents over 3,008 stored tokens, 16-token answers", "block_s", 16, 2, 64, 16, 3008),
)
PREFILL, DECODE = 1, 2  # the CPU runs' cluster
PORT = 19300


# -- measuring the probes on a live cluster --

def measure_host(preset: str = "tiny-gqa", dtype: str = "float32", port: int = PORT, repeat: int = 3) -> list[dict]:
    """Each probe's job time on a live 1P2D cluster of this machine (median of `repeat`, salts differ
    so no run hits another's KV), after an untimed warm-up."""
    from dualpath.bench import driver
    from dualpath.bench.common import bench_cluster
    from dualpath.launcher import LocalCluster

    out = []
    with tempfile.TemporaryDirectory(prefix="dualpath-host-") as work:
        cfg = bench_cluster(PREFILL, DECODE, preset, dtype, "cpu", port, f"{work}/store")
        with LocalCluster(cfg, f"{work}/run") as c:
            def drive(p: Probe, salt: int) -> float:
                time.sleep(0.5)  # the previous probe's write-behind and heartbeats settle
                r = asyncio.run(driver.run(c.url, p.workload(), "pe-read", salt=salt,
                                           warmup_turns=p.warmup_turns, progress=False))
                if any(rec.error for rec in r.records):
                    raise RuntimeError(f"probe {p.name!r} failed: {[rec.error for rec in r.records if rec.error][:3]}")
                return r.duration

            drive(PROBES[2], 999)  # warm-up
            for i, p in enumerate(PROBES):
                times = sorted(drive(p, 100 * i + k) for k in range(repeat))
                out.append({**asdict(p), "measured_s": times[len(times) // 2], "runs_s": times})
                print(f"  {p.name}: {out[-1]['measured_s']:.3f} s", flush=True)
    return out


# -- solving the costs with the simulator --

def _simulated_s(probe: Probe, profile, costs: HostCosts, preset: str, dtype: str) -> float:
    from dualpath.bench.common import bench_cluster
    from dualpath.sim.run import block_bytes
    from dualpath.sim.simulator import SimConfig, simulate

    cfg = bench_cluster(PREFILL, DECODE, preset, dtype, "cpu", PORT, "/nonexistent")
    bb, layers = block_bytes(preset, dtype, cfg.store.block_tokens)
    sim = SimConfig(PREFILL, DECODE, 0.0, 10.0, block_tokens=cfg.store.block_tokens, block_bytes=bb, n_layers=layers,
                    buffer_blocks=cfg.engine.buffer_blocks, hbm_blocks=cfg.engine.hbm_blocks - 1, host_cores=2,
                    host=costs)
    return simulate(sim, profile, "pe-read", probe.workload(), probe.warmup_turns).duration


def _solve(probe: Probe, measured_s: float, profile, costs: HostCosts, preset: str, dtype: str,
           hi: float = 0.1) -> HostCosts:
    """The probe's cost that makes the simulated probe take `measured_s` (0 if it is slower without it)."""
    at = lambda x: _simulated_s(probe, profile, replace(costs, **{probe.cost: x}), preset, dtype)
    if at(0.0) >= measured_s:
        return replace(costs, **{probe.cost: 0.0})
    while at(hi) < measured_s:
        hi *= 2
    lo = 0.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if at(mid) < measured_s else (lo, mid)
    return replace(costs, **{probe.cost: (lo + hi) / 2})


def calibrate(probes: list[dict], profile, preset: str = "tiny-gqa", dtype: str = "float32",
              rounds: int = 2) -> HostCosts:
    """Each probe's cost in turn; a second round lets the earlier ones see the later (step_s is paid
    by the one-token probe's prefill steps too)."""
    measured = {m["name"]: m["measured_s"] for m in probes}
    costs = HostCosts()
    for _ in range(rounds):
        for p in PROBES:  # (their shapes as here: a stored probe gives its time)
            costs = _solve(p, measured[p.name], profile, costs, preset, dtype)
    return costs


def host_main(a: argparse.Namespace) -> None:
    """The host costs into the profile at --out (its grids measured before)."""
    path = Path(a.out)
    m = json.loads(path.read_text())
    if a.solve_only:  # the stored times, under the probes' shapes and costs as defined here
        times = {p["name"]: p for p in m["host_costs"]["probes"]}
        probes = [{**asdict(p), "measured_s": times[p.name]["measured_s"], "runs_s": times[p.name]["runs_s"]}
                  for p in PROBES]
    else:
        probes = measure_host(m["preset"], m["dtype"], a.port, a.host_repeat)
    # Solved on the one-thread grids: the probe cluster's three engines outnumber this machine's cores.
    costs = calibrate(probes, GridProfile.from_file(path, shared_cores=True), m["preset"], m["dtype"])
    m["host_costs"] = {"costs": asdict(costs), "probes": probes, "cluster": f"{PREFILL}P{DECODE}D",
                 "measured": m["host_costs"].get("measured") if a.solve_only else time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "about": "python -m dualpath.sim.measure --host (docs/SIM.md)"}
    path.write_text(json.dumps(m, indent=2))
    print(json.dumps(asdict(costs), indent=2))
    print(f"wrote host costs into {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny-gqa")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--block-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="runs/sim/profiles/cpu_tiny_gqa.json")
    ap.add_argument("--host", action="store_true",
                    help="measure the host costs (live 1P2D probes) into the profile at --out, not the grids")
    ap.add_argument("--host-repeat", type=int, default=3, help="runs of each probe (their median)")
    ap.add_argument("--port", type=int, default=PORT, help="the probe cluster's first port")
    ap.add_argument("--solve-only", action="store_true", help="with --host: solve again from the probe times stored")
    a = ap.parse_args()
    if a.host:
        return host_main(a)
    result = measure(a.preset, a.device, a.dtype, a.block_tokens, a.repeat)
    write_json(a.out, result)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
