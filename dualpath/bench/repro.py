"""`dualpath bench repro`: the paper's headline on a local cluster, every policy in one run.

One agentic workload (seeded) runs against a fresh 1P2D cluster per policy, with the storage NICs
emulated (a token bucket on the real file I/O, per node) so that storage is the bottleneck:
1. offline: closed loop; job completion time, tokens/s, and each node's storage-NIC use;
2. online: agents arrive as a Poisson process; the arrival rate is raised step by step until the
   TTFT SLO is missed; the highest rate that meets it, per policy;
3. the same offline workload without emulation (storage not the bottleneck): dualpath must not
   cost anything there.
Every run starts from an empty store, so no policy inherits another's cache.

With ``hosts`` (root only), each cluster spreads over that many hosts made as network namespaces
(bench/netns.py): the coordinator and the PE on host 0, DE i on host i, every host's link shaped
to ``link_mbit`` by traffic class (its compute NIC); the workload is driven from host 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from dualpath.bench import netns, report
from dualpath.bench.common import bench_cluster
from dualpath.bench.driver import RunResult, run
from dualpath.bench.workload import AgenticSpec, agentic, hit_ratios, poisson_arrivals, write_jsonl
from dualpath.config import ClusterConfig
from dualpath.launcher import LocalCluster


# Workloads by what computes them. "cpu": contexts of ~3K tokens growing by tool outputs of 20-100
# tokens keep every later turn >= 95% hit while a 2-core CPU can still compute the misses faster
# than the emulated NICs load hits. "gpu": the agentic shape the paper studies (first prompts of
# 16-24K tokens, tool outputs of 200-1000), sized so that one GPU's engines are storage-bound at
# real storage-NIC rates (GB/s).
WORKLOADS = {
    "cpu": AgenticSpec(agents=16, turns=9, first_prompt=(2500, 3500), tool_output=(20, 100), answer=(8, 24), seed=1),
    "gpu": AgenticSpec(agents=48, turns=6, first_prompt=(16_000, 24_000), tool_output=(200, 1_000),
                       answer=(16, 48), seed=1),
}


@dataclass
class Pools:
    """Each engine's pools, in blocks: the paged HBM pool and the DRAM buffer."""

    hbm_blocks: int = 4096
    buffer_blocks: int = 2048


def size_pools(spec: AgenticSpec, preset: str, dtype: str, block_tokens: int, engines_per_gpu: int,
               store_root: str) -> Pools:
    """Pools for a workload on GPUs: room for every agent's longest context in HBM (a DE may hold
    them all), within 80% of the device's free memory shared by the engines on it; a buffer of a
    third of that. The store's disk must hold every block the workload writes."""
    import shutil

    import torch

    from dualpath.engine.architecture import PRESETS

    cfg = PRESETS[preset]
    block_bytes = block_tokens * cfg.kv_width * cfg.n_layers * torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    longest = spec.first_prompt[1] + (spec.turns - 1) * (spec.tool_output[1] + spec.answer[1]) + spec.answer[1]
    want = spec.agents * (-(-longest // block_tokens) + 1)
    free, _ = torch.cuda.mem_get_info()
    fits = int(0.8 * free / engines_per_gpu / block_bytes) - 2 * (1 << 30) // block_bytes  # 2 GiB for weights
    if fits < want // 4:
        raise ValueError(f"{preset}: the GPU holds {fits} blocks per engine, the workload needs ~{want}")
    store_need = spec.agents * -(-longest // block_tokens) * block_bytes
    disk_free = shutil.disk_usage(Path(store_root).parent if not Path(store_root).exists() else store_root).free
    if store_need > 0.9 * disk_free:
        raise ValueError(f"the store needs ~{store_need / 1e9:.0f} GB, {disk_free / 1e9:.0f} GB free under {store_root}")
    hbm = min(want, fits)
    return Pools(hbm_blocks=hbm, buffer_blocks=max(256, hbm // 3))


@dataclass
class ReproConfig:
    out_dir: str = "runs/repro"
    preset: str = "tiny-gqa"
    dtype: str = "float32"
    device: str = "cpu"  # "cuda": engine i on cuda:i
    n_prefill: int = 1
    n_decode: int = 2
    snic_gbps: float = 0.008  # emulated storage-NIC read rate per node, GB/s (CPU-sized; see README)
    block_tokens: int = 64
    policies: tuple[str, ...] = ("pe-read", "de-read", "dualpath", "dualpath-split")
    workload: AgenticSpec = field(default_factory=lambda: dataclasses.replace(WORKLOADS["cpu"]))
    pools: Pools = field(default_factory=Pools)
    warmup_turns: int = 1
    repeats: int = 1  # offline runs of each policy; the median one is reported
    online_policies: tuple[str, ...] = ("pe-read", "dualpath")
    online_agents: int = 24
    online_turns: int = 5
    first_rate: float = 0.5  # agents per second
    rate_factor: float = 1.25
    max_rate_steps: int = 9
    ttft_slo_s: float = 1.5
    slo_attainment: float = 0.9  # a rate meets the SLO when this share of requests does
    unbounded: bool = True
    base_port: int = 18000
    hosts: int = 0  # > 0: one cluster across this many namespace hosts (root), PE on host 0
    link_mbit: float = 0.0  # with hosts: each host's link (compute NIC), scheduled by traffic class


def cluster_config(rc: ReproConfig, snic_gbps: float, store_root: str) -> ClusterConfig:
    cfg = bench_cluster(rc.n_prefill, rc.n_decode, rc.preset, rc.dtype, rc.device, rc.base_port, store_root,
                        snic_gbps, rc.block_tokens)
    cfg.engine.hbm_blocks, cfg.engine.buffer_blocks = rc.pools.hbm_blocks, rc.pools.buffer_blocks
    return cfg.validate()


def run_on_fresh_cluster(rc: ReproConfig, sessions, policy: str, mode: str, snic_gbps: float) -> RunResult:
    work = Path(tempfile.mkdtemp(prefix="dualpath-repro-"))
    try:
        if rc.hosts:
            return _run_across_hosts(rc, sessions, policy, mode, snic_gbps, work)
        with LocalCluster(cluster_config(rc, snic_gbps, str(work / "store")), str(work / "run")) as c:
            return asyncio.run(run(c.url, sessions, policy, mode, warmup_turns=rc.warmup_turns))
    except Exception:
        kept = Path(rc.out_dir) / f"failed_{policy}_{mode}_logs"
        try:  # never in the way of the error itself
            if (work / "run").exists():
                shutil.copytree(work / "run", kept, dirs_exist_ok=True)
                print(f"the {policy} {mode} run failed; its cluster's logs are in {kept}", file=sys.stderr)
        except OSError as e:
            print(f"the {policy} {mode} run failed, and its logs could not be kept: {e}", file=sys.stderr)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_across_hosts(rc: ReproConfig, sessions, policy: str, mode: str, snic_gbps: float, work: Path) -> RunResult:
    """The same run on a cluster across namespace hosts; `dualpath bench run` drives it from host 0
    (this process's namespace has no route to the hosts) and its JSON comes back."""
    if mode != "offline" or rc.n_prefill != 1:
        raise ValueError("across hosts, bench repro runs offline with one prefill engine")
    write_jsonl(sessions, work / "workload.jsonl")
    with netns.Hosts(1 + rc.n_decode) as hosts:
        if rc.link_mbit:
            for i in range(hosts.n):
                hosts.shape_by_class(i, f"{rc.link_mbit:g}mbit")
        cfg = cluster_config(rc, snic_gbps, str(work / "store"))
        with netns.NamespaceCluster(hosts, cfg, work / "run") as c:
            driver = hosts.popen(0, [sys.executable, "-m", "dualpath.cli", "bench", "run", "--workload",
                                     str(work / "workload.jsonl"), "--url", c.url, "--policy", policy,
                                     "--warmup-turns", str(rc.warmup_turns), "--out", str(work / "run.json")],
                                 env=c.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                _, err = driver.communicate(timeout=1800)
            except subprocess.TimeoutExpired:
                driver.kill()
                raise
            if driver.returncode:
                raise RuntimeError(f"bench run on host 0 failed: {err[-2000:]}")
    return RunResult.from_json(json.loads((work / "run.json").read_text())["run"])


def offline(rc: ReproConfig, sessions, snic_gbps: float, policies) -> tuple[list[RunResult], list[dict]]:
    """Each policy on a fresh cluster, rc.repeats times, the policies taking turns (a host that slows
    down mid-way slows all of them alike). Each policy's reported run is its median one by tokens/s;
    its summary lists every run's tokens/s (``tokens_per_s_runs``)."""
    tried: dict[str, list[tuple[RunResult, dict]]] = {p: [] for p in policies}
    for _ in range(rc.repeats):
        for policy in policies:
            r = run_on_fresh_cluster(rc, sessions, policy, "offline", snic_gbps)
            tried[policy].append((r, report.summarize(r, snic_gbps)))
            print("  " + run_line(tried[policy][-1][1]), flush=True)
    runs, summaries = [], []
    for policy in policies:
        ranked = sorted(tried[policy], key=lambda rs: rs[1]["tokens_per_s"])
        r, summary = ranked[(len(ranked) - 1) // 2]  # the median (the lower one of an even count)
        runs.append(r)
        summaries.append({**summary, "tokens_per_s_runs": [s["tokens_per_s"] for _, s in tried[policy]]})
    return runs, summaries


def run_line(s: dict) -> str:
    """One finished run in a line: a sweep cut short by a time limit keeps its figures in the log."""
    ttft = " ".join(f"{p} {_p50(d)}" for p, d in s["ttft_s_by_path"].items())
    util = " ".join(f"n{n} {v['read_util']:.2f}" for n, v in s.get("nodes", {}).items() if "read_util" in v)
    return (f"{s['policy']:<15} {s['duration_s']:7.2f} s  {s['tokens_per_s']:>10,.0f} tokens/s  "
            f"TPOT p50 {_p50(s['tpot_s'])} s  TTFT p50 by path {ttft or '-'} s  read use {util or '-'}  "
            f"failed {s['failed']}")


def _p50(d: dict) -> str:
    return "-" if d.get("p50") is None else f"{d['p50']:.3f}"


def online(rc: ReproConfig) -> dict:
    """Raise the agent arrival rate until the TTFT SLO is missed, for each policy."""
    spec = dataclasses.replace(rc.workload, agents=rc.online_agents, turns=rc.online_turns + rc.warmup_turns)
    base = agentic(spec)
    points, best, runs = [], {}, {}
    for policy in rc.online_policies:
        rate, best[policy] = rc.first_rate, None
        for _ in range(rc.max_rate_steps):
            r = run_on_fresh_cluster(rc, poisson_arrivals(base, rate, seed=spec.seed), policy, "online", rc.snic_gbps)
            s = report.summarize(r, rc.snic_gbps, rc.ttft_slo_s)
            ok = s["slo_attainment"] >= rc.slo_attainment
            points.append({"policy": policy, "rate": rate, "meets_slo": ok, **s})
            print(f"  {policy:<15} {rate:6.3f} agents/s  TTFT p90 {s['ttft_s']['p90']:.2f} s  "
                  f"SLO attainment {s['slo_attainment']:.0%}  {'ok' if ok else 'missed'}", flush=True)
            if not ok:
                break
            best[policy], runs[policy] = rate, r
            rate *= rc.rate_factor
    base_rate = best.get("pe-read")
    return {"ttft_slo_s": rc.ttft_slo_s, "slo_attainment": rc.slo_attainment, "max_rate": best,
            "ratio_vs_pe_read": {p: (v / base_rate if v and base_rate else None) for p, v in best.items()},
            "points": points, "_runs": runs}


def ratios(summaries: list[dict]) -> dict[str, float]:
    """Throughput relative to pe-read; also stored in each summary as "ratio"."""
    base = next(s for s in summaries if s["policy"] == "pe-read")["tokens_per_s"]
    for s in summaries:
        s["ratio"] = s["tokens_per_s"] / base
    return {s["policy"]: s["ratio"] for s in summaries}


def node_table(summaries: list[dict], roles: dict[int, str]) -> str:
    rows = [{"policy": s["policy"], **{f"n{n}": v.get("read_util") for n, v in s.get("nodes", {}).items()}}
            for s in summaries]
    return report.table(rows, [("policy", "policy")] + [(f"node {n} ({roles[n]}) read util", f"n{n}")
                                                        for n in sorted(roles)])


COLUMNS = [("policy", "policy"), ("JCT s", "duration_s"), ("tokens/s", "tokens_per_s"), ("x pe-read", "ratio"),
           ("TTFT p50", "ttft_s.p50"), ("TTFT p99", "ttft_s.p99"), ("TPOT p50", "tpot_s.p50"),
           ("hit ratio", "hit_ratio_after_first_turn"), ("SNIC read util", "read_util_all_nodes"),
           ("failed", "failed")]


def main(rc: ReproConfig) -> dict:
    out = Path(rc.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sessions = agentic(rc.workload)
    write_jsonl(sessions, out / "workload.jsonl")
    hits = hit_ratios(sessions, rc.block_tokens)
    print(f"workload: {rc.workload.agents} agents x {rc.workload.turns} turns ({rc.warmup_turns} warm-up), "
          f"min hit ratio after turn 1 {min(hits):.3f}; {rc.n_prefill}P{rc.n_decode}D, "
          f"storage NIC {rc.snic_gbps * 1000:g} MB/s per node (emulated)")
    t0 = time.monotonic()
    result: dict = {"config": dataclasses.asdict(rc)}

    print("offline, storage-bound:")
    runs, summaries = offline(rc, sessions, rc.snic_gbps, rc.policies)
    result["offline"] = {"summaries": summaries, "ratio_vs_pe_read": ratios(summaries)}
    roles = {e.node: e.role for e in cluster_config(rc, 0, "/tmp").engines}
    report.plot_throughput(summaries, out / "throughput.png",
                           f"offline, {rc.n_prefill}P{rc.n_decode}D, storage-bound (emulated SNIC)")
    report.plot_node_bandwidth(runs, out / "node_bandwidth.png", roles, rc.snic_gbps)
    report.plot_path_share(summaries, out / "path_share.png")
    for r in runs:
        (out / f"offline_{r.policy}.json").write_text(json.dumps(r.to_json()))

    if rc.hosts and (rc.online_policies or rc.unbounded):
        print("across hosts: the offline runs only")
    if rc.online_policies and not rc.hosts:
        print(f"online (Poisson arrivals, TTFT SLO {rc.ttft_slo_s} s for {rc.slo_attainment:.0%} of requests):")
        on = online(rc)
        report.plot_ttft_cdf(list(on.pop("_runs").values()), out / "ttft_cdf.png",
                             "TTFT at each policy's highest rate within the SLO", rc.ttft_slo_s)
        result["online"] = on

    if rc.unbounded and not rc.hosts:
        print("offline, storage not the bottleneck (no emulation):")
        _, free = offline(rc, sessions, 0.0, rc.policies)  # every policy: a mixing one must not lose to a fixed one
        result["unbounded"] = {"summaries": free, "ratio_vs_pe_read": ratios(free)}

    result["wall_s"] = time.monotonic() - t0
    print()
    print(report.table(summaries, COLUMNS))
    if rc.repeats > 1:
        print(f"tokens/s of each of {rc.repeats} runs (the table shows the median one): " + "; ".join(
            f"{s['policy']} " + ", ".join(f"{t:,.0f}" for t in s["tokens_per_s_runs"]) for s in summaries))
    print()
    print(node_table(summaries, roles))
    if "online" in result:
        print()
        print("online: highest arrival rate meeting the TTFT SLO: " + ", ".join(
            f"{p} {v if v is None else f'{v:.3f}'} agents/s" for p, v in result["online"]["max_rate"].items())
            + "; ratio " + ", ".join(f"{p} {v:.2f}x" for p, v in result["online"]["ratio_vs_pe_read"].items() if v))
    if "unbounded" in result:
        print()
        print("without storage emulation:")
        print(report.table(result["unbounded"]["summaries"], COLUMNS[:5]))
    (out / "repro.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {out}/repro.json and plots in {out}/ ({result['wall_s']:.0f} s)")
    return result
