"""`dualpath sim`: the `bench repro` workload on a simulated cluster, every policy, with the same
summaries and table; beside a measured `bench repro` run when one is given (the validation)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from dualpath.bench import report
from dualpath.bench.repro import COLUMNS, ReproConfig, ratios
from dualpath.bench.workload import agentic
from dualpath.engine.weights import model_identity
from dualpath.sim.profile import ComputeProfile
from dualpath.sim.simulator import SimConfig, simulate
from dualpath.storage.blockfile import HEADER_BYTES


def block_bytes(preset: str, dtype: str, block_tokens: int) -> tuple[int, int]:
    """(one stored block's bytes, header included; layers) for a model, as the coordinator computes it."""
    mc, _ = model_identity(preset, getattr(torch, dtype))
    return HEADER_BYTES + mc.n_layers * block_tokens * mc.kv_width * getattr(torch, dtype).itemsize, mc.n_layers


def main(rc: ReproConfig, profile: ComputeProfile, compute_link_gbps: float, measured: str | None,
         out: str) -> dict:
    t0 = time.monotonic()
    sessions = agentic(rc.workload)
    bb, layers = block_bytes(rc.preset, rc.dtype, rc.block_tokens)
    cfg = SimConfig(rc.n_prefill, rc.n_decode, rc.snic_gbps, compute_link_gbps, block_tokens=rc.block_tokens,
                    block_bytes=bb, n_layers=layers)
    summaries = [report.summarize(simulate(cfg, profile, p, sessions, rc.warmup_turns), rc.snic_gbps)
                 for p in rc.policies]
    result = {"config": {"cluster": f"{rc.n_prefill}P{rc.n_decode}D", "snic_gbps": rc.snic_gbps,
                         "compute_link_gbps": compute_link_gbps, "profile": profile.source,
                         "workload": vars(rc.workload), "preset": rc.preset, "dtype": rc.dtype},
              "summaries": summaries, "ratio_vs_pe_read": ratios(summaries), "wall_s": time.monotonic() - t0}
    print(report.table(summaries, COLUMNS))
    if measured:
        real = {s["policy"]: s for s in json.loads(Path(measured).read_text())["offline"]["summaries"]}
        rows = []
        for s in summaries:
            m = real.get(s["policy"])
            rows.append({"policy": s["policy"], "simulated": s["tokens_per_s"],
                         "measured": m["tokens_per_s"] if m else None,
                         "sim / measured": s["tokens_per_s"] / m["tokens_per_s"] if m else None})
        order_sim = [r["policy"] for r in sorted(rows, key=lambda r: r["simulated"])]
        order_real = [r["policy"] for r in sorted((r for r in rows if r["measured"]), key=lambda r: r["measured"])]
        result["validation"] = {"measured": measured, "rows": rows, "same_ordering": order_sim == order_real}
        print()
        print(report.table(rows, [("policy", "policy"), ("simulated tokens/s", "simulated"),
                                  ("measured tokens/s", "measured"), ("sim / measured", "sim / measured")]))
        print(f"policy ordering simulated {order_sim}, measured {order_real}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {out} ({result['wall_s']:.1f} s)")
    return result
