"""`dualpath sim repro`: the `bench repro` workload (or a workload file: agentic JSONL or a Mooncake
trace) on a simulated cluster, every policy, with the same summaries, table and plots; beside a
measured `bench repro` run when one is given (the validation)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from dualpath.bench import report
from dualpath.bench.repro import COLUMNS, ReproConfig, node_table, ratios
from dualpath.bench.workload import Session, agentic
from dualpath.config import DTYPE_BYTES
from dualpath.engine.architecture import model_identity
from dualpath.sim.profile import HostCosts, Profile
from dualpath.sim.simulator import SimConfig, simulate
from dualpath.storage.blockfile import HEADER_BYTES


def block_bytes(preset: str, dtype: str, block_tokens: int) -> tuple[int, int]:
    """(one stored block's bytes, header included; layers) for a model, as the coordinator computes it."""
    mc, _ = model_identity(preset, dtype)
    return HEADER_BYTES + mc.n_layers * block_tokens * mc.kv_width * DTYPE_BYTES[dtype], mc.n_layers


def main(rc: ReproConfig, profile: Profile, compute_link_gbps: float, measured: str | None, out: str,
         sessions: list[Session] | None = None, trace_block_tokens: int = 512, progress: bool = False,
         egress_only: bool = False, host_cores: int = 0, host: HostCosts | None = None) -> dict:
    """Simulate every policy of `rc` (the agentic workload it names, or `sessions`); write the JSON
    to `out` and the plots beside it."""
    t0 = time.monotonic()
    sessions = sessions or agentic(rc.workload)
    bb, layers = block_bytes(rc.preset, rc.dtype, rc.block_tokens)
    cfg = SimConfig(rc.n_prefill, rc.n_decode, rc.snic_gbps, compute_link_gbps, block_tokens=rc.block_tokens,
                    block_bytes=bb, n_layers=layers, trace_block_tokens=trace_block_tokens,
                    egress_only=egress_only, host_cores=host_cores, host=host or HostCosts())
    warmup = rc.warmup_turns if all(len(s.turns) > rc.warmup_turns for s in sessions) else 0  # a trace: none
    runs = [simulate(cfg, profile, p, sessions, warmup, progress=progress) for p in rc.policies]
    summaries = [report.summarize(r, rc.snic_gbps) for r in runs]
    result = {"config": {"cluster": f"{rc.n_prefill}P{rc.n_decode}D", "snic_gbps": rc.snic_gbps,
                         "compute_link_gbps": compute_link_gbps, "egress_only": egress_only, "host_cores": host_cores,
                         "profile": profile.source, "host_costs": vars(cfg.host),
                         "workload": vars(rc.workload), "preset": rc.preset, "dtype": rc.dtype},
              "summaries": summaries, "ratio_vs_pe_read": ratios(summaries)}
    print(report.table(summaries, COLUMNS))
    roles = {e["node"]: e["role"] for e in runs[0].samples[0]["engines"].values()}
    print()
    print(node_table(summaries, roles))
    if measured:
        result["validation"] = _beside(summaries, measured)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    stem = out_path.with_suffix("")
    report.plot_throughput(summaries, Path(f"{stem}_throughput.png"),
                           f"simulated {rc.n_prefill}P{rc.n_decode}D, storage NIC {rc.snic_gbps:g} GB/s per node")
    report.plot_node_bandwidth(runs, Path(f"{stem}_node_bandwidth.png"), roles, rc.snic_gbps)
    report.plot_path_share(summaries, Path(f"{stem}_path_share.png"))
    result["wall_s"] = time.monotonic() - t0
    out_path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {out} and its plots ({result['wall_s']:.1f} s)")
    return result


def _beside(summaries: list[dict], measured: str) -> dict:
    """Each policy's simulated tokens/s over the measured run's, and whether they rank alike."""
    real = {s["policy"]: s for s in json.loads(Path(measured).read_text())["offline"]["summaries"]}
    rows = []
    for s in summaries:
        m = real.get(s["policy"])
        rows.append({"policy": s["policy"], "simulated": s["tokens_per_s"],
                     "measured": m["tokens_per_s"] if m else None,
                     "sim / measured": s["tokens_per_s"] / m["tokens_per_s"] if m else None})
    order_sim = [r["policy"] for r in sorted(rows, key=lambda r: r["simulated"])]
    order_real = [r["policy"] for r in sorted((r for r in rows if r["measured"]), key=lambda r: r["measured"])]
    print()
    print(report.table(rows, [("policy", "policy"), ("simulated tokens/s", "simulated"),
                              ("measured tokens/s", "measured"), ("sim / measured", "sim / measured")]))
    print(f"policy ordering simulated {order_sim}, measured {order_real}")
    return {"measured": measured, "rows": rows, "same_ordering": order_sim == order_real}
