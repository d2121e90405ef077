"""`python -m dualpath.sim.validate`: the simulator beside committed `bench repro` runs that its
profile was not taken from, per policy, sim / measured tokens/s and whether the policies rank alike.

Each case reads the measured run's own config (model, cluster, storage rate, workload and seed) and
simulates the same workload; only the links that the run shaped (``Case``) and the compute profile
come from elsewhere. A CPU run's engines (and a namespace-host run's) all computed on one machine of
two cores, which ``host_cores`` states; with its engines outnumbering its cores, the profile's
one-thread grids are used (profile.py ``GridProfile.from_file``). The GPU runs have no measured grid
yet: they are simulated with the one-point `bench model` profile of their machine, each engine on a
device of its own. (A one-GPU run's two engines share it; modelled as shared cores, ``host_cores=1``,
its cells fall by a further third: docs/SIM.md.)
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from dualpath.bench import report
from dualpath.bench.repro import Pools
from dualpath.bench.workload import AgenticSpec, agentic
from dualpath.sim.profile import HostCosts, Profile, host_costs, load_profile
from dualpath.sim.run import block_bytes
from dualpath.sim.simulator import SimConfig, simulate

CPU_HOST_CORES = 2  # the VM every committed CPU run ran on (runs/cpu/*.json: "cpus": 2)
CPU_PROFILE = "runs/sim/profiles/cpu_tiny_gqa.json"


@dataclass(frozen=True)
class Case:
    name: str
    measured: str  # a committed `bench repro` JSON
    compute_link_gbps: float = 10.0  # per engine, each way; a shaped run's link rate
    egress_only: bool = False  # tc shapes what a namespace host sends (bench repro --hosts)
    profile: str = CPU_PROFILE  # measured on the run's kind of machine, never taken from the run
    host_cores: int = CPU_HOST_CORES  # the engines share this many cores (0: each has its own device)
    one_device: bool = False  # a GPU run whose engines all ran on one GPU
    host_costs: bool = True  # charge the host costs the profile file holds, if any (measure.py --host)


def _gpu(name: str, measured: str, gpus: int) -> Case:
    """A small-gqa bf16 run on H200s, with the `bench model` point of that machine: two GPUs, or one."""
    profile = "runs/gpu/model_small_gqa.json" if gpus == 2 else "runs/gpu/s7_one_gpu/model_small_gqa_bf16_b64.json"
    return Case(name, measured, profile=profile, host_cores=0, one_device=gpus == 1)


CPU_CASES = (
    Case("CPU 1P2D, 8 MB/s (s9)", "runs/repro_s9/repro.json"),
    Case("CPU 1P2D, 8 MB/s (s11 final)", "runs/repro_s11_final/repro.json"),
    Case("CPU 1P2D, storage not emulated (s9)", "runs/repro_s9_unbounded/repro.json"),
    Case("CPU 1P2D, storage not emulated (s9, median of 3)", "runs/repro_s9_unbounded_x3/repro.json"),
    Case("CPU 1P2D, storage not emulated (s10, median of 3)", "runs/repro_s10_unbounded_x3/repro.json"),
    Case("CPU 1P2D, storage not emulated, 48 agents (s10, median of 3)",
         "runs/repro_s10_unbounded48_x3/repro.json"),
    Case("3 namespace hosts, 1000 Mbit/s, 8 MB/s", "runs/multihost/repro_hosts/repro.json", 0.125, True),
    Case("3 namespace hosts, 40 Mbit/s, 8 MB/s", "runs/multihost/repro_hosts40/repro.json", 0.005, True),
)
GPU_CASES = (
    _gpu("2x H200 1P1D, 0.2 GB/s", "runs/gpu/s5_final/repro.json", 2),
    _gpu("2x H200 1P1D, 1 GB/s", "runs/gpu/s6_rates/repro_1gbps.json", 2),
    _gpu("2x H200 1P1D, 4 GB/s", "runs/gpu/s6_rates/repro_4gbps.json", 2),
    _gpu("2x H200 1P1D, 16 GB/s", "runs/gpu/s6_rates/repro_16gbps.json", 2),
    _gpu("1x H200 1P1D, 1 GB/s (median of 3)", "runs/gpu/s11_one_gpu/repro_1gbps_x3_off.json", 1),
    _gpu("1x H200 1P1D, 4 GB/s (median of 2)", "runs/gpu/s11_one_gpu/repro_4gbps_x2_off.json", 1),
    _gpu("1x H200 1P1D, 16 GB/s (median of 3)", "runs/gpu/s11_one_gpu/repro_16gbps_x3_off.json", 1),
)


def sim_config(run_cfg: dict, case: Case, host_cores: int, root: Path = Path(".")) -> SimConfig:
    bb, layers = block_bytes(run_cfg["preset"], run_cfg["dtype"], run_cfg["block_tokens"])
    pools = Pools(**run_cfg["pools"]) if "pools" in run_cfg else Pools()
    return SimConfig(run_cfg["n_prefill"], run_cfg["n_decode"], run_cfg["snic_gbps"], case.compute_link_gbps,
                     egress_only=case.egress_only, block_tokens=run_cfg["block_tokens"], block_bytes=bb,
                     n_layers=layers, buffer_blocks=pools.buffer_blocks,
                     hbm_blocks=pools.hbm_blocks - 1,  # a DE keeps one HBM block as scratch (decode.py)
                     host_cores=host_cores, host=host_costs(root / case.profile) if case.host_costs else HostCosts())


def check(case: Case, profile: Profile, host_cores: int, root: Path = Path(".")) -> dict:
    """Simulate the measured run's workload on its cluster, every policy it measured."""
    measured = json.loads((root / case.measured).read_text())
    run_cfg, real = measured["config"], {s["policy"]: s for s in measured["offline"]["summaries"]}
    spec = AgenticSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in run_cfg["workload"].items()})
    sessions, cfg = agentic(spec), sim_config(run_cfg, case, host_cores, root)
    rows = []
    for policy in run_cfg["policies"]:
        sim = report.summarize(simulate(cfg, profile, policy, sessions, run_cfg["warmup_turns"]), cfg.snic_gbps)
        m = real[policy]["tokens_per_s"]
        rows.append({"policy": policy, "simulated": sim["tokens_per_s"], "measured": m,
                     "sim / measured": sim["tokens_per_s"] / m, "failed": sim["failed"]})
    rank = lambda key: [r["policy"] for r in sorted(rows, key=lambda r: r[key])]
    return {"case": asdict(case), "profile": profile.source, "host_cores": host_cores, "rows": rows,
            "order simulated": rank("simulated"), "order measured": rank("measured"),
            "same_ordering": rank("simulated") == rank("measured")}


def shares_cores(case: Case, host_cores: int, root: Path = Path(".")) -> bool:
    """Whether the run's engines outnumber its host's cores: then each computes on about one."""
    run_cfg = json.loads((root / case.measured).read_text())["config"]
    return bool(host_cores) and run_cfg["n_prefill"] + run_cfg["n_decode"] > host_cores


def markdown(results: list[dict]) -> str:
    policies = ("pe-read", "de-read", "dualpath", "dualpath-split")
    lines = ["| run (measured) | " + " | ".join(policies) + " | same ordering |",
             "|" + " --- |" * (len(policies) + 2)]
    for r in results:
        by = {row["policy"]: row["sim / measured"] for row in r["rows"]}
        cells = [f"{by[p]:.2f}" if p in by else "-" for p in policies]
        lines.append(f"| {r['case']['name']} (`{r['case']['measured']}`) | " + " | ".join(cells)
                     + f" | {'yes' if r['same_ordering'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-profile", default=CPU_PROFILE, help="the CPU cases' profile")
    ap.add_argument("--cpu-host-cores", type=int, default=CPU_HOST_CORES,
                    help="the CPU cases' cores; 0: engines do not share cores")
    ap.add_argument("--one-thread", action=argparse.BooleanOptionalAction, default=None,
                    help="the CPU grids measured at one thread (default: where a run's engines outnumber the cores)")
    ap.add_argument("--gpu-host-cores", type=int, default=0,
                    help="the GPU cases' engines share a device of this many (1: a one-GPU run's two engines share it)")
    ap.add_argument("--host-costs", action=argparse.BooleanOptionalAction, default=True,
                    help="charge the host costs the profiles hold (python -m dualpath.sim.measure --host); "
                         "--no-host-costs: the model steps alone")
    ap.add_argument("--out", default="runs/sim/validate_grid.json")
    a = ap.parse_args()
    cases = [replace(c, profile=a.cpu_profile, host_cores=a.cpu_host_cores, host_costs=a.host_costs) for c in CPU_CASES]
    cases += [replace(c, host_cores=a.gpu_host_cores if c.one_device else 0, host_costs=a.host_costs)
              for c in GPU_CASES]
    results = []
    for case in cases:
        one_thread = a.one_thread if a.one_thread is not None and case.profile == a.cpu_profile else None
        profile = load_profile(case.profile, shared_cores=one_thread if one_thread is not None
                               else shares_cores(case, case.host_cores))
        results.append(check(case, profile, case.host_cores))
        print(markdown(results[-1:]).splitlines()[-1], flush=True)
    print(markdown(results))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"results": results}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
