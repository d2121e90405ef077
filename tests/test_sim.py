"""The simulator decides with the real policies and agrees with measured runs of the real system."""

import json
from pathlib import Path

import pytest

from dualpath.bench import report
from dualpath.bench.repro import ReproConfig
from dualpath.bench.workload import agentic
from dualpath.sim.profile import ComputeProfile
from dualpath.sim.run import block_bytes, main
from dualpath.sim.simulator import Link, SimConfig, simulate

ROOT = Path(__file__).parent.parent
CPU_PROFILE = ComputeProfile.from_bench(ROOT / "runs/cpu/bench_model_tiny_gqa.json")


def test_a_link_serves_transfers_in_order_at_its_rate():
    link = Link(1e6)
    assert link.reserve(0.0, 500_000) == 0.5 and link.reserve(0.1, 1_000_000) == 1.5  # queued behind the first
    assert link.backlog_bytes(1.0) == 500_000 and link.reserve(3.0, 0) == 3.0
    assert Link(0).reserve(2.0, 10**9) == 2.0  # unlimited


def _run(policy: str, snic_gbps: float = 0.008, agents: int = 8):
    rc = ReproConfig()
    sessions = agentic(rc.workload.__class__(**{**vars(rc.workload), "agents": agents}))
    bb, layers = block_bytes(rc.preset, rc.dtype, rc.block_tokens)
    cfg = SimConfig(1, 2, snic_gbps, 10.0, block_tokens=rc.block_tokens, block_bytes=bb, n_layers=layers)
    return simulate(cfg, CPU_PROFILE, policy, sessions, rc.warmup_turns)


def test_no_policy_reads_faster_than_the_storage_nics_allow_and_dualpath_pools_them():
    runs = {p: _run(p) for p in ("pe-read", "de-read", "dualpath")}
    for p, r in runs.items():
        s = report.summarize(r, 0.008)
        assert s["failed"] == 0 and all(v["read_util"] <= 1.0 + 1e-9 for v in s["nodes"].values()), (p, s["nodes"])
    pe_bytes = sum(rec.read_bytes_pe for rec in runs["pe-read"].records)
    assert runs["pe-read"].duration >= pe_bytes / 8e6  # one NIC read it all
    assert runs["dualpath"].duration < 0.5 * runs["pe-read"].duration  # three NICs read it


def test_a_simulation_is_deterministic():
    a, b = _run("dualpath", agents=4), _run("dualpath", agents=4)
    assert [(r.t_first, r.t_done, r.path) for r in a.records] == [(r.t_first, r.t_done, r.path) for r in b.records]


@pytest.mark.parametrize("measured", ["runs/repro_s6/offline_repro.json"])
def test_the_simulated_bench_repro_is_within_15_percent_of_the_measured_one(measured, tmp_path):
    """The CPU headline (1P2D, 8 MB/s storage NICs, the same seeded workload): tokens/s per policy
    within 15% of the committed measured run, and the same ordering of the policies."""
    r = main(ReproConfig(), CPU_PROFILE, 10.0, str(ROOT / measured), str(tmp_path / "sim.json"))
    v = r["validation"]
    assert v["same_ordering"], v
    assert all(0.85 <= row["sim / measured"] <= 1.15 for row in v["rows"]), v["rows"]
    assert json.loads((tmp_path / "sim.json").read_text())["validation"]["rows"] == v["rows"]
