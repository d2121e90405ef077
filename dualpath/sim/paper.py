"""`dualpath sim paper`: the paper's questions at the paper's scale, on simulated clusters of the
paper's model shapes (docs/SIM.md, "Paper scale").

Each study writes its JSON (and a plot) under the output folder and returns rows for the tables:
- ``ratios``: every policy across P:D = 1:1, 1:2, 1:4 and 2:1, for each model, next to the bound
  (P+D)/P (all storage NICs over the PEs' alone), and next to what dualpath reaches with storage
  unlimited (the ceiling that compute and memory set);
- ``scaling``: dualpath from 2P4D to 48P96D with agents scaled alike, tokens/s per GPU;
- ``online``: the highest agent arrival rate meeting a TTFT SLO, dualpath and pe-read;
- ``bandwidth``: compute-NIC against storage-NIC bandwidth, and hit ratio: where path B stops paying;
- ``split``: whole-request choice (dualpath) against split reads (dualpath-split) at scale;
- ``shared``: 2P4D to 48P96D as each limit the nodes share tightens (the storage backend's read rate,
  the compute switch's oversubscription, GPUs per node), pe-read and dualpath, tokens/s per node.
The hardware (``Hardware``) is stated, not measured: an H200-class node of 8 GPUs, one 400 Gbps
compute NIC per GPU and one 400 Gbps storage NIC per node, unless a study sweeps it.

Sensitivity (``BANDED``: ratios and online, by default): such a study is run again at the low and
the high value of each uncertain input (``UNCERTAIN``), one at a time, the others at their stated
values: MFU 0.30 / 0.60 (stated 0.45), the storage NIC per node and the compute NIC per GPU at half
and double, and every turn after the first hitting 0.90 / 0.99 (the stated workload hits 0.97).
Each of its figures is then reported as central [low-high], with the input that moves it most
(``<study>_bands.json`` and SUMMARY.md).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dualpath.bench import report
from dualpath.bench.repro import ratios
from dualpath.bench.workload import AgenticSpec, Session, agentic, poisson_arrivals
from dualpath.sim.profile import SHAPES, GpuSpec, Roofline
from dualpath.sim.simulator import SimConfig, simulate
from dualpath.storage.blockfile import HEADER_BYTES

POLICIES = ("pe-read", "de-read", "dualpath", "dualpath-split")


@dataclass(frozen=True)
class Hardware:
    gpu: str = "h200"  # GpuSpec.named; 8 x 141 GB is what holds the 660B's FP8 weights on one node
    gpus_per_node: int = 8
    snic_gbps: float = 50.0  # storage NIC per node: 400 Gbps
    compute_gbps_per_gpu: float = 50.0  # one 400 Gbps compute NIC per GPU
    buffer_gb_per_node: float = 512.0  # host DRAM kept for KV buffers
    block_tokens: int = 64
    mfu: float = 0.45  # the roofline's sustained fraction of peak FLOPs (GpuSpec.mfu): assumed, not measured


@dataclass(frozen=True)
class Scenario:
    shape: str
    n_prefill: int
    n_decode: int
    gpus_per_engine: int = 8
    agents_per_pe: int = 1000  # the paper: 2K agents at 2P4D
    turns: int = 6  # per agent, the first untimed (its KV is stored, as after a warm-up)
    hw: Hardware = field(default_factory=Hardware)
    workload: AgenticSpec = field(default_factory=AgenticSpec)  # agents, turns and block size set from above

    @property
    def gpus(self) -> int:
        return (self.n_prefill + self.n_decode) * self.gpus_per_engine

    @property
    def label(self) -> str:
        return f"{self.shape} {self.n_prefill}P{self.n_decode}D"


def build(sc: Scenario) -> tuple[SimConfig, Roofline, list[Session]]:
    shape, hw = SHAPES[sc.shape], sc.hw
    profile = Roofline(shape, dataclasses.replace(GpuSpec.named(hw.gpu), mfu=hw.mfu), sc.gpus_per_engine)
    block_bytes = HEADER_BYTES + shape.kv_bytes_per_token * hw.block_tokens
    engines_per_node = hw.gpus_per_node // sc.gpus_per_engine
    cfg = SimConfig(sc.n_prefill, sc.n_decode, hw.snic_gbps, hw.compute_gbps_per_gpu, sc.gpus_per_engine,
                    engines_per_node, block_tokens=hw.block_tokens, block_bytes=block_bytes,
                    n_layers=shape.n_layers, buffer_blocks=int(hw.buffer_gb_per_node * 1e9 / engines_per_node
                                                               / block_bytes),
                    hbm_blocks=int(profile.kv_hbm_bytes / block_bytes), sample_every_s=1.0)
    spec = dataclasses.replace(sc.workload, agents=sc.agents_per_pe * sc.n_prefill, turns=sc.turns,
                               block_tokens=hw.block_tokens)
    return cfg, profile, agentic(spec)


def run(sc: Scenario, policies=POLICIES, sessions: list[Session] | None = None, progress: bool = False,
        ttft_slo_s: float | None = None, **cfg_changes) -> tuple[list[dict], list]:
    cfg, profile, built = build(sc)
    cfg = dataclasses.replace(cfg, **cfg_changes)
    summaries, runs = [], []
    for p in policies:
        r = simulate(cfg, profile, p, sessions or built, 1, progress)
        s = report.summarize(r, cfg.snic_gbps, ttft_slo_s)
        s.update(scenario=sc.label, gpus=sc.gpus, tokens_per_s_per_gpu=s["tokens_per_s"] / sc.gpus)
        summaries.append(s)
        runs.append(r)
    if "pe-read" in policies:
        ratios(summaries)
    return summaries, runs


def _slim(s: dict) -> dict:
    """A summary without its per-node figures (144 nodes at scale)."""
    return {k: v for k, v in s.items() if k != "nodes"}


# -- the studies --

Vary = Callable[[Scenario], Scenario]


def _same(sc: Scenario) -> Scenario:
    return sc


def study_ratios(out: Path, shapes=tuple(SHAPES), vary: Vary = _same, band: bool = False) -> list[dict]:
    """band: a sensitivity run (``study_bands``): no JSON, no dualpath-split and no storage-unlimited run."""
    rows = []
    gpus_per_engine = {"deepseek-660b": 8, "deepseek-27b": 1, "qwen2.5-32b": 1}
    policies = ("pe-read", "de-read", "dualpath") if band else POLICIES
    for shape in shapes:
        g = gpus_per_engine[shape]
        scale = 8 // g  # whole nodes: engines of one GPU come 8 to a node
        for p, d in ((1, 1), (1, 2), (1, 4), (2, 1)):
            sc = vary(Scenario(shape, p * scale, d * scale, g, agents_per_pe=1000 // scale))
            summaries, _ = run(sc, policies)
            bound = (p + d) / p
            row = {"model": shape, "P:D": f"{p}:{d}", "cluster": f"{sc.n_prefill}P{sc.n_decode}D", "gpus": sc.gpus,
                   **{pol: s["ratio"] for pol, s in zip(policies, summaries)}, "bound": bound}
            if not band:
                # storage unlimited: what compute and memory allow
                (free,), _ = run(sc, ("dualpath",), snic_gbps=0.0)
                row["storage unlimited"] = free["tokens_per_s"] / summaries[0]["tokens_per_s"]
            row.update({"pe-read tokens/s": summaries[0]["tokens_per_s"],
                        "pe-read PE-node read util": _pe_util(summaries[0], sc),
                        "hit ratio": summaries[0]["hit_ratio_after_first_turn"]})
            rows.append(row)
            if not band:
                print(f"  {sc.label}: " + ", ".join(f"{pol} {row[pol]:.2f}x" for pol in policies)
                      + f" (bound {bound:g})", flush=True)
    if not band:
        _write(out / "ratios.json", {"hardware": dataclasses.asdict(Hardware()), "rows": rows})
    return rows


def _pe_util(s: dict, sc: Scenario) -> float:
    pe_nodes = -(-sc.n_prefill * sc.gpus_per_engine // sc.hw.gpus_per_node)
    return sum(s["nodes"][str(n)]["read_util"] for n in range(pe_nodes)) / pe_nodes


def study_scaling(out: Path, sizes=((2, 4), (8, 16), (24, 48), (48, 96)), send_until_s: float = 120.0,
                  progress: bool = False) -> list[dict]:
    """Agents scaled with the cluster (1,000 per PE), each sending turns for `send_until_s`."""
    rows = []
    for p, d in sizes:
        sc = Scenario("deepseek-660b", p, d, turns=20)
        t0 = time.monotonic()
        (s,), _ = run(sc, ("dualpath",), progress=progress, send_until_s=send_until_s)
        rows.append({"cluster": f"{p}P{d}D", "gpus": sc.gpus, "agents": sc.agents_per_pe * p,
                     "tokens/s": s["tokens_per_s"], "tokens/s per GPU": s["tokens_per_s_per_gpu"],
                     "requests": s["requests"], "wall_s": time.monotonic() - t0})
        print(f"  {p}P{d}D: {s['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU ({rows[-1]['wall_s']:.0f} s)", flush=True)
    base = rows[0]["tokens/s per GPU"]
    for r in rows:
        r["per GPU vs 2P4D"] = r["tokens/s per GPU"] / base
    _write(out / "scaling.json", {"rows": rows})
    return rows


def study_online(out: Path, ttft_slo_s: float = 2.0, attainment: float = 0.9, first_rate: float = 4.0,
                 factor: float = 1.25, steps: int = 25, vary: Vary = _same, band: bool = False,
                 start: dict[str, float] | None = None) -> list[dict]:
    """Agents arrive as a Poisson process, each running 6 turns; the highest rate at which 90% of
    requests meet the TTFT SLO, per policy, on 2P4D of the 660B. Rates are first_rate x factor^k:
    from first_rate up to the first missed (or from start[policy], down to the first met if it
    misses: a sensitivity run starts at the central run's answer, on the same grid of rates).
    The agents are finite (800), each waiting for its answer before its next turn: once all of them
    arrive within one SLO (rate >= agents / SLO) a higher rate changes nothing, and a policy still
    meeting the SLO there meets it at any rate (reported as inf)."""
    sc = vary(Scenario("deepseek-660b", 2, 4, agents_per_pe=400))
    _, _, base = build(sc)
    top = len(base) / ttft_slo_s
    points, best = [], {}
    for policy in ("pe-read", "dualpath"):
        rate, best[policy], down = (start or {}).get(policy) or first_rate, None, False
        for _ in range(steps):
            (s,), _ = run(sc, (policy,), sessions=poisson_arrivals(base, rate, seed=1), ttft_slo_s=ttft_slo_s)
            met = s["slo_attainment"] >= attainment
            points.append({"policy": policy, "rate": rate, "ttft_p90": s["ttft_s"]["p90"], "met": met})
            if not band:
                print(f"  {policy:<9} {rate:6.2f} agents/s TTFT p90 {s['ttft_s']['p90']:.2f} s "
                      f"{'ok' if met else 'missed'}", flush=True)
            if met and down:  # going down: the first rate met is the answer
                best[policy] = rate
                break
            if met and rate >= top:  # all agents at once, and still met
                best[policy] = float("inf")
                break
            if met:
                best[policy], rate = rate, rate * factor
            elif down or best[policy] is None and start and start.get(policy):  # the start missed: go down
                down, rate = True, rate / factor
            else:
                break
    rows = [{"policy": p, "highest rate (agents/s)": r,
             "x pe-read": r / best["pe-read"] if r and best["pe-read"] and best["pe-read"] < float("inf") else None}
            for p, r in best.items()]
    if not band:
        _write(out / "online.json", {"ttft_slo_s": ttft_slo_s, "attainment": attainment, "rows": rows,
                                     "points": points})
    return rows


def study_bandwidth(out: Path) -> list[dict]:
    """2P4D of the 660B: the compute NIC per node swept against the 50 GB/s storage NIC per node, at
    three hit ratios. In PD disaggregation every hit byte crosses the compute network once on
    either path: on path A in the PE's handoff to the DE, on path B from the DE to the PE."""
    rows = []
    hit_workloads = {0.95: AgenticSpec(), 0.8: AgenticSpec(tool_output=(4_000, 6_000), min_hit_ratio=0.75),
                     0.5: AgenticSpec(first_prompt=(8_000, 12_000), tool_output=(12_000, 16_000),
                                      min_hit_ratio=0.4)}
    for hit, spec in hit_workloads.items():
        for per_node in (400.0, 100.0, 50.0, 25.0, 12.5):
            sc = Scenario("deepseek-660b", 2, 4, agents_per_pe=300, turns=4, workload=spec)
            summaries, _ = run(sc, ("pe-read", "de-read", "dualpath"), compute_link_gbps=per_node / 8)
            s = {x["policy"]: x for x in summaries}
            rows.append({"hit ratio": s["pe-read"]["hit_ratio_after_first_turn"],
                         "compute / storage NIC": per_node / sc.hw.snic_gbps,
                         "pe-read tokens/s": s["pe-read"]["tokens_per_s"],
                         "de-read": s["de-read"]["ratio"], "dualpath": s["dualpath"]["ratio"],
                         "path B share of hit bytes": s["dualpath"]["read_bytes"]["de"]
                         / max(1, sum(s["dualpath"]["read_bytes"].values()))})
            r = rows[-1]
            print(f"  hit {r['hit ratio']:.2f} compute/storage {r['compute / storage NIC']:5.2f}: pe-read "
                  f"{r['pe-read tokens/s']:,.0f} tokens/s, de-read {r['de-read']:.2f}x dualpath {r['dualpath']:.2f}x",
                  flush=True)
    _write(out / "bandwidth.json", {"rows": rows})
    return rows


def study_split(out: Path) -> list[dict]:
    """Storage-bound clusters of one-GPU engines (8 to a node), small and at 144 engines."""
    rows = []
    for shape in ("deepseek-27b", "qwen2.5-32b"):
        for p, d in ((8, 16), (48, 96)):
            sc = Scenario(shape, p, d, gpus_per_engine=1, agents_per_pe=125)
            summaries, _ = run(sc, ("pe-read", "dualpath", "dualpath-split"))
            s = {x["policy"]: x for x in summaries}
            rows.append({"cluster": sc.label, "dualpath": s["dualpath"]["ratio"],
                         "dualpath-split": s["dualpath-split"]["ratio"],
                         "split / whole": s["dualpath-split"]["tokens_per_s"] / s["dualpath"]["tokens_per_s"],
                         "TTFT p90 whole": s["dualpath"]["ttft_s"]["p90"],
                         "TTFT p90 split": s["dualpath-split"]["ttft_s"]["p90"]})
            print(f"  {sc.label}: dualpath {rows[-1]['dualpath']:.2f}x, split {rows[-1]['dualpath-split']:.2f}x",
                  flush=True)
    _write(out / "split.json", {"rows": rows})
    return rows


# What the nodes share (SimConfig.backend_gbps, oversubscription, gpus_per_node), one limit at a time from the
# paper's nodes (8 GPUs, one storage NIC, a non-blocking switch, an unbounded backend): label -> its setting.
# backend: the backend's read rate as a multiple of the sum of the nodes' storage NICs; backend_gbps: one rate
# at every size (3.6 TB/s: 0.5x of 48P96D's NICs, about half the 6.6 TiB/s 3FS reports for 180 storage nodes)
SHARED_LIMITS: dict[str, dict[str, float]] = {
    "none": {},
    "backend 1x": {"backend": 1.0}, "backend 0.5x": {"backend": 0.5}, "backend 0.25x": {"backend": 0.25},
    "backend 3.6 TB/s": {"backend_gbps": 3600.0},
    "switch 2:1": {"oversubscription": 2.0}, "switch 4:1": {"oversubscription": 4.0},
    "switch 16:1": {"oversubscription": 16.0},
    "1 GPU per node": {"gpus_per_node": 1},
}
SHARED_SIZES = ((2, 4), (8, 16), (24, 48), (48, 96))


def study_shared(out: Path, sizes=SHARED_SIZES, limits: dict[str, dict[str, float]] | None = None,
                 policies=("pe-read", "dualpath"), agents_per_pe: int = 300, send_until_s: float = 30.0) -> list[dict]:
    """The 660B from 2P4D to 48P96D as each shared limit tightens, one at a time (``SHARED_LIMITS``):
    tokens/s per node of 8 GPUs (one engine), closed loop, `agents_per_pe` agents sending turns for
    `send_until_s` simulated seconds. A cluster scales where its per-node figure at 48P96D is that at
    2P4D; a limit costs what its figure is below the one with no shared limit at the same size."""
    limits = SHARED_LIMITS if limits is None else limits
    runs = []
    for label, lim in limits.items():
        for p, d in sizes:
            sc = Scenario("deepseek-660b", p, d, agents_per_pe=agents_per_pe, turns=20)
            gpn = int(lim.get("gpus_per_node", sc.hw.gpus_per_node))
            nodes = (p + d) * sc.gpus_per_engine / gpn  # each with one storage NIC
            change = {"gpus_per_node": gpn, "oversubscription": lim.get("oversubscription", 1.0),
                      "backend_gbps": lim.get("backend_gbps", lim.get("backend", 0.0) * nodes * sc.hw.snic_gbps)}
            t0 = time.monotonic()
            summaries, _ = run(sc, policies, send_until_s=send_until_s, **change)
            wall = time.monotonic() - t0
            for s in summaries:
                runs.append({"limit": label, "cluster": f"{p}P{d}D", "policy": s["policy"], "gpus": sc.gpus,
                             "backend_gbps": change["backend_gbps"], "oversubscription": change["oversubscription"],
                             "gpus_per_node": gpn, "tokens/s": s["tokens_per_s"],
                             "tokens/s per node": s["tokens_per_s_per_gpu"] * sc.hw.gpus_per_node,
                             "read GB/s per node": sum(s["read_bytes"].values()) / s["duration_s"] / 1e9
                             / (sc.gpus / sc.hw.gpus_per_node),
                             "requests": s["requests"], "wall_s": wall})
            print(f"  {label:<16} {p}P{d}D: " + ", ".join(
                f"{r['policy']} {r['tokens/s per node']:,.0f}" for r in runs[-len(policies):])
                  + f" tokens/s per node ({wall:.1f} s)", flush=True)
    rows = []
    first, last = sizes[0], sizes[-1]
    for label in limits:
        for pol in policies:
            at = {r["cluster"]: r for r in runs if r["limit"] == label and r["policy"] == pol}
            free = {r["cluster"]: r for r in runs if r["limit"] == "none" and r["policy"] == pol}
            row = {"limit": label, "policy": pol}
            row.update({c: at[c]["tokens/s per node"] for c in at})
            big, small = f"{last[0]}P{last[1]}D", f"{first[0]}P{first[1]}D"
            row[f"{big} / {small}"] = at[big]["tokens/s per node"] / at[small]["tokens/s per node"]
            if free:
                row["vs none"] = at[big]["tokens/s per node"] / free[big]["tokens/s per node"]
            row["read GB/s per node"] = at[big]["read GB/s per node"]
            rows.append(row)
    _write(out / "shared.json", {"agents_per_pe": agents_per_pe, "send_until_s": send_until_s,
                                 "limits": limits, "hardware": dataclasses.asdict(Hardware()),
                                 "wall_s": sum({(r["limit"], r["cluster"]): r["wall_s"] for r in runs}.values()),
                                 "rows": rows, "runs": runs})
    return rows


STUDIES: dict[str, Callable[[Path], list[dict]]] = {
    "ratios": study_ratios, "scaling": study_scaling, "online": study_online, "bandwidth": study_bandwidth,
    "split": study_split, "shared": study_shared}


def _strict(v):
    """JSON without Infinity: an unbounded figure (online: the SLO met at any rate) is written "inf"."""
    if isinstance(v, float) and v == float("inf"):
        return "inf"
    if isinstance(v, dict):
        return {k: _strict(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_strict(x) for x in v]
    return v


def _write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_strict(result), indent=2, default=str))


def study_speed(out: Path, minutes: float = 10.0) -> list[dict]:
    """Wall time of the largest cluster (48P96D, 48K agents) over `minutes` of simulated time."""
    sc = Scenario("deepseek-660b", 48, 96, turns=45)
    t0 = time.monotonic()
    (s,), _ = run(sc, ("dualpath",), progress=True, send_until_s=minutes * 60)
    wall = time.monotonic() - t0
    rows = [{"cluster": "48P96D", "agents": sc.agents_per_pe * 48, "simulated s": s["duration_s"],
             "requests": s["requests"], "wall s": wall, "simulated s per wall s": s["duration_s"] / wall,
             "requests/s simulated": s["requests"] / s["duration_s"]}]
    print(f"  48P96D: {s['duration_s']:.0f} simulated s, {s['requests']:,} requests in {wall:.0f} s of wall time",
          flush=True)
    _write(out / "speed.json", {"rows": rows})
    return rows


STUDIES["speed"] = study_speed


# -- sensitivity: each banded study again at the low and high value of one uncertain input at a time --

def _hw(field_: str, scale: float | None = None, value: float | None = None) -> Vary:
    def vary(sc: Scenario) -> Scenario:
        v = getattr(sc.hw, field_) * scale if scale is not None else value
        return dataclasses.replace(sc, hw=dataclasses.replace(sc.hw, **{field_: v}))
    return vary


def _hit(ratio: float) -> Vary:
    """Every turn after the first hits `ratio` of its prompt: tool outputs drawn long, then clipped
    by the generator to just what keeps that hit ratio."""
    def vary(sc: Scenario) -> Scenario:
        return dataclasses.replace(sc, workload=dataclasses.replace(sc.workload, min_hit_ratio=ratio,
                                                                    tool_output=(200, 100_000)))
    return vary


# input: (its stated value, ((low label, change), (high label, change)))
UNCERTAIN: dict[str, tuple[str, tuple[tuple[str, Vary], tuple[str, Vary]]]] = {
    "MFU": ("0.45", (("0.30", _hw("mfu", value=0.30)), ("0.60", _hw("mfu", value=0.60)))),
    "storage NIC": ("50 GB/s per node", (("1/2x", _hw("snic_gbps", 0.5)), ("2x", _hw("snic_gbps", 2.0)))),
    "compute NIC": ("50 GB/s per GPU", (("1/2x", _hw("compute_gbps_per_gpu", 0.5)),
                                        ("2x", _hw("compute_gbps_per_gpu", 2.0)))),
    "hit ratio": ("0.97 (the stated workload)", (("0.90", _hit(0.90)), ("0.99", _hit(0.99)))),
}
FLAT = 0.02  # an input that moves a figure by less than this fraction of it does not set it


def sensitivity(measure: Callable[[Vary], dict[str, float]], central: dict[str, float] | None = None,
                inputs=UNCERTAIN) -> tuple[list[dict], dict[str, float]]:
    """measure(vary) -> {figure: value} at the inputs `vary` sets. Each figure as central
    [low-high] over every input's low and high value, one input at a time, and the input whose
    two values (with the central one) span it most: that input sets the figure ("-" if none moves it
    by FLAT of it). Returns the rows and each variant run's wall seconds."""
    central = central if central is not None else measure(_same)
    at, wall = {}, {}
    for name, (_, levels) in inputs.items():
        for label, vary in levels:
            t0 = time.monotonic()
            at[name, label] = measure(vary)
            wall[f"{name} {label}"] = time.monotonic() - t0
            print(f"  {name} {label}: {wall[f'{name} {label}']:.0f} s", flush=True)
    rows = []
    for fig, c in central.items():
        row = {"figure": fig, "central": c}
        values = [] if c is None else [c]
        span = {}
        for name, (_, levels) in inputs.items():
            lo, hi = (at[name, label].get(fig) for label, _ in levels)
            row[name] = (lo, hi)
            known = [v for v in (c, lo, hi) if v is not None]
            values += known
            span[name] = max(known) - min(known) if known else 0.0
        row["low"], row["high"] = (min(values), max(values)) if values else (None, None)
        top = max(span, key=span.get)
        row["set by"] = top if span[top] > FLAT * abs(c or 0.0) else "-"
        rows.append(row)
    return rows, wall


_SHORT = {"deepseek-660b": "DS 660B", "deepseek-27b": "DS 27B", "qwen2.5-32b": "Qwen 32B"}


def figures_ratios(rows: list[dict]) -> dict[str, float]:
    out = {}
    for r in rows:
        out[f"{_SHORT[r['model']]} {r['P:D']} dualpath x pe-read"] = r["dualpath"]
    for r in rows:
        out[f"{_SHORT[r['model']]} {r['P:D']} de-read x pe-read"] = r["de-read"]
    return out


def figures_online(rows: list[dict]) -> dict[str, float]:
    best = {r["policy"]: r["highest rate (agents/s)"] for r in rows}
    return {"pe-read agents/s": best["pe-read"], "dualpath agents/s": best["dualpath"],
            "dualpath x pe-read": best["dualpath"] / best["pe-read"]
            if best["dualpath"] and best["pe-read"] and best["pe-read"] < float("inf") else None}


# study: (its figures, the keyword arguments a sensitivity run takes from the central run's rows)
BANDED: dict[str, tuple[Callable[[list[dict]], dict], Callable[[list[dict]], dict]]] = {
    "ratios": (figures_ratios, lambda rows: {}),
    "online": (figures_online, lambda rows: {"start": {r["policy"]: r["highest rate (agents/s)"] for r in rows}}),
}


def study_bands(name: str, out: Path, central_rows: list[dict]) -> list[dict]:
    """The sensitivity of one banded study, around its central rows; writes <name>_bands.json."""
    figures, hints = BANDED[name]
    t0 = time.monotonic()
    rows, wall = sensitivity(lambda vary: figures(STUDIES[name](out, vary=vary, band=True, **hints(central_rows))),
                             figures(central_rows))
    _write(out / f"{name}_bands.json", {
        "inputs": {n: {"stated": st, "low": lv[0][0], "high": lv[1][0]} for n, (st, lv) in UNCERTAIN.items()},
        "flat": FLAT, "wall_s": time.monotonic() - t0, "wall_s_per_run": wall, "rows": rows})
    return rows


# -- plots and the summary --

def plot(study: str, rows: list[dict], path: Path) -> None:
    plt = report._plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    if study == "ratios":
        short = {"deepseek-660b": "DS 660B", "deepseek-27b": "DS 27B", "qwen2.5-32b": "Qwen 32B"}
        labels = [f"{short.get(r['model'], r['model'])}\n{r['P:D']}" for r in rows]
        x = range(len(rows))
        for k, pol in enumerate(POLICIES):
            ax.bar([i + (k - 1.5) * 0.2 for i in x], [r[pol] for r in rows], 0.2, label=pol)
        if (path.parent / "ratios_bands.json").exists():  # dualpath's band over the uncertain inputs
            band = {b["figure"]: b for b in json.loads((path.parent / "ratios_bands.json").read_text())["rows"]}
            got = [band.get(f"{_SHORT[r['model']]} {r['P:D']} dualpath x pe-read") for r in rows]
            if all(got):
                ax.errorbar([i + 0.1 for i in x], [r["dualpath"] for r in rows], fmt="none", ecolor="k", lw=0.8,
                            capsize=2, yerr=[[r["dualpath"] - b["low"] for r, b in zip(rows, got)],
                                             [b["high"] - r["dualpath"] for r, b in zip(rows, got)]],
                            label="dualpath: low-high over the uncertain inputs")
        ax.scatter(list(x), [r["bound"] for r in rows], marker="_", s=300, color="k", label="bound (P+D)/P", zorder=3)
        ax.scatter(list(x), [r["storage unlimited"] for r in rows], marker="v", s=25, color="k",
                   label="dualpath, storage unlimited", zorder=3)
        ax.set_xticks(list(x), labels, fontsize=6)
        ax.set_ylabel("tokens/s over pe-read")
    elif study == "scaling":
        ax.plot([r["gpus"] for r in rows], [r["tokens/s per GPU"] for r in rows], "o-", label="dualpath")
        ax.set_xscale("log")
        ax.set_xticks([r["gpus"] for r in rows], [f"{r['cluster']}\n{r['gpus']}" for r in rows])
        ax.minorticks_off()
        ax.set_xlabel("cluster and GPUs (8 per engine)")
        ax.set_ylabel("tokens/s per GPU")
        ax.set_ylim(bottom=0)
    elif study == "online":
        points = json.loads((path.parent / "online.json").read_text())["points"]
        for pol in ("pe-read", "dualpath"):
            pts = [p for p in points if p["policy"] == pol]
            ax.plot([p["rate"] for p in pts], [p["ttft_p90"] for p in pts], "o-", label=pol)
        slo = json.loads((path.parent / "online.json").read_text())["ttft_slo_s"]
        ax.axhline(slo, color="k", ls=":", label=f"SLO {slo:g} s")
        ax.set_yscale("log")
        ax.set_xlabel("agent arrival rate (agents/s)")
        ax.set_ylabel("TTFT p90 (s)")
    elif study == "shared":
        plt.close(fig)
        data = json.loads((path.parent / "shared.json").read_text())["runs"]
        pols = list(dict.fromkeys(r["policy"] for r in data))
        fig, axes = plt.subplots(1, len(pols), figsize=(9, 3.6), sharey=True, squeeze=False)
        axes = axes[0]
        for ax, pol in zip(axes, pols):
            for label in dict.fromkeys(r["limit"] for r in data):
                pts = [r for r in data if r["limit"] == label and r["policy"] == pol]
                ax.plot([r["gpus"] for r in pts], [r["tokens/s per node"] for r in pts], "o-", ms=3, label=label)
            ax.set_xscale("log")
            ax.set_xticks([r["gpus"] for r in pts], [r["cluster"] for r in pts], fontsize=7)
            ax.minorticks_off()
            ax.set_title(pol, fontsize=9)
            ax.set_ylim(bottom=0)
        axes[0].set_ylabel("tokens/s per node (8 GPUs)")
        axes[-1].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
    elif study == "bandwidth":
        for hit in sorted({round(r["hit ratio"], 2) for r in rows}, reverse=True):
            pts = [r for r in rows if round(r["hit ratio"], 2) == hit]
            x = [r["compute / storage NIC"] for r in pts]
            line, = ax.plot(x, [r["dualpath"] for r in pts], "o-", label=f"dualpath, hit {hit:.2f}")
            ax.plot(x, [r["de-read"] for r in pts], "x--", alpha=0.6, color=line.get_color(),
                    label=f"de-read, hit {hit:.2f}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ticks = sorted({r["compute / storage NIC"] for r in rows})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("compute NIC / storage NIC bandwidth, per node (each way)")
        ax.set_ylabel("tokens/s over pe-read")
    else:
        plt.close(fig)
        return
    ax.legend(fontsize=7, ncol=2 if study == "ratios" else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    fmt = lambda v: f"{v:,.0f}" if isinstance(v, float) and abs(v) >= 100 else (
        f"{v:.2f}" if isinstance(v, float) else str(v))
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
                     + ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows])


def _num(v) -> str:
    if v is None:
        return "-"
    if v == float("inf"):
        return "any"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}"


def markdown_bands(rows: list[dict]) -> str:
    """figure | central [low-high] | the input that sets it | each input's low / high value."""
    head = ["figure", "central [low-high]", "set by"] + [f"{n} {lv[0][0]} / {lv[1][0]}"
                                                         for n, (_, lv) in UNCERTAIN.items()]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["figure"], f"{_num(r['central'])} [{_num(r['low'])}-{_num(r['high'])}]", r["set by"]]
        cells += [f"{_num(r[n][0])} / {_num(r[n][1])}" for n in UNCERTAIN]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _bands_intro(name: str, out: Path) -> str:
    b = json.loads((out / f"{name}_bands.json").read_text())
    stated = "; ".join(f"{n} {v['low']} / {v['stated']} / {v['high']}" for n, v in b["inputs"].items())
    return (f"\nEach figure at the stated inputs, [the lowest-the highest] over each uncertain input set low and "
            f"high, one at a time (low / stated / high: {stated}). \"set by\": the input that moves it most "
            f"(\"-\": no input moves it by {b['flat']:.0%}). {len(b['wall_s_per_run'])} runs, "
            f"{b['wall_s']:.0f} s of wall time beside the central run.\n")


def main(only: tuple[str, ...], out_dir: str, bands: tuple[str, ...] = tuple(BANDED)) -> dict[str, list[dict]]:
    """bands: the studies run again for their sensitivity to the uncertain inputs (UNCERTAIN)."""
    out = Path(out_dir)
    results = {}
    for name, study in STUDIES.items():
        if only and name not in only:
            continue
        print(f"{name}:", flush=True)
        t0 = time.monotonic()
        results[name] = study(out)
        print(f"  ({time.monotonic() - t0:.0f} s)", flush=True)
        print(markdown(results[name]), flush=True)
        if name in bands and name in BANDED:
            print(f"{name}, sensitivity ({2 * len(UNCERTAIN)} runs):", flush=True)
            results[f"{name} bands"] = study_bands(name, out, results[name])
            print(markdown_bands(results[f"{name} bands"]), flush=True)
        plot(name, results[name], out / f"{name}.png")
    summary = out / "SUMMARY.md"
    sections = {}
    if summary.exists():  # keep the studies not re-run
        for part in summary.read_text().split("\n## ")[1:]:
            sections[part.split("\n", 1)[0]] = part.split("\n", 1)[1]
    for name, rows in results.items():
        if name.endswith(" bands"):
            sections[name] = _bands_intro(name.removesuffix(" bands"), out) + "\n" + markdown_bands(rows) + "\n"
        else:
            sections[name] = "\n" + markdown(rows) + "\n"
    order = [n for s in STUDIES for n in (s, f"{s} bands")]
    summary.write_text(f"# `dualpath sim paper` (hardware: {Hardware()})\n"
                       + "".join(f"\n## {n}\n{sections[n]}" for n in order if n in sections))
    print(f"wrote {out}/ (JSON, plots, SUMMARY.md)")
    return results


if __name__ == "__main__":  # `dualpath sim paper` without the CLI, and with the choice of banded studies
    import argparse

    ap = argparse.ArgumentParser(description="dualpath sim paper")
    ap.add_argument("--only", action="append", default=[], choices=list(STUDIES))
    ap.add_argument("--out-dir", default="runs/sim/paper")
    ap.add_argument("--bands", action="append", default=None, choices=list(BANDED),
                    help="studies to run for their sensitivity (default: all of BANDED)")
    ap.add_argument("--no-bands", action="store_true", help="the central runs only")
    a = ap.parse_args()
    main(tuple(a.only), a.out_dir, () if a.no_bands else tuple(a.bands or BANDED))
