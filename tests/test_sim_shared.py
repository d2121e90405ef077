"""What the simulated nodes share (issue 35 item 4): the storage backend's read limit, the compute
switch's oversubscription and GPUs per node. Off by default, each changes nothing; on, each binds
where its rate says. Small CPU-sized runs (1-16 engines, 8-16 agents): a second or two each."""

import dataclasses
from pathlib import Path

import pytest

from dualpath.bench.repro import ReproConfig
from dualpath.bench.workload import agentic
from dualpath.sim.profile import ComputeProfile
from dualpath.sim.run import block_bytes
from dualpath.sim.simulator import Link, SimConfig, StorageNic, simulate
from dualpath.storage.blockfile import HEADER_BYTES

ROOT = Path(__file__).parent.parent
CPU_PROFILE = ComputeProfile.from_bench(ROOT / "runs/cpu/bench_model_tiny_gqa.json")
RC = ReproConfig()
BB, LAYERS = block_bytes(RC.preset, RC.dtype, RC.block_tokens)
SNIC = 0.008  # GB/s per node: storage-bound, as the CPU headline


def _run(policy: str, agents: int = 16, n_prefill: int = 1, n_decode: int = 2, **changes):
    sessions = agentic(dataclasses.replace(RC.workload, agents=agents))
    cfg = SimConfig(n_prefill, n_decode, SNIC, 10.0, block_tokens=RC.block_tokens, block_bytes=BB, n_layers=LAYERS)
    return simulate(dataclasses.replace(cfg, **changes), CPU_PROFILE, policy, sessions, RC.warmup_turns)


def _read_Bps(r) -> float:
    return sum(x.read_bytes_pe + x.read_bytes_de for x in r.records) / r.duration


def _tokens_per_s(r) -> float:
    return sum(x.prompt_tokens + x.output_tokens for x in r.records if x.t_done is not None) / r.duration


def _same(a, b) -> bool:
    return [(x.t_send, x.t_first, x.t_done, x.path, x.pe, x.de) for x in a.records] == \
        [(x.t_send, x.t_first, x.t_done, x.path, x.pe, x.de) for x in b.records]


# (policy, compute NIC GB/s per GPU): job time and the sum of completion times, as the simulator gave
# them before the shared limits existed (commit 8a15f7e), 1P2D, 8 agents, 8 MB/s storage NICs
BEFORE = {("pe-read", 10.0): (14.891788956774027, 472.5122831780938),
          ("pe-read", 0.016): (15.008338179174027, 479.3278545839573),
          ("de-read", 10.0): (7.632264353878712, 245.03597699146007),
          ("de-read", 0.016): (7.88500557627871, 256.5637213023661),
          ("dualpath", 10.0): (5.222280353878712, 168.70678242159164),
          ("dualpath", 0.016): (5.357381801451909, 180.55276326689875)}


@pytest.mark.parametrize("policy,compute", list(BEFORE))
def test_with_the_defaults_results_equal_those_from_before_the_shared_limits(policy, compute):
    cfg = SimConfig()
    assert (cfg.backend_gbps, cfg.oversubscription, cfg.gpus_per_node) == (0.0, 1.0, 0)
    r = _run(policy, agents=8, compute_link_gbps=compute)
    assert (r.duration, sum(x.t_done for x in r.records)) == BEFORE[policy, compute]
    # the same layout stated as GPUs per node (one-GPU engines, one a node), and a switch that is not
    # oversubscribed: no change at all
    assert _same(r, _run(policy, agents=8, compute_link_gbps=compute, gpus_per_node=1, oversubscription=1.0))


def test_the_paper_nodes_as_gpus_per_node_are_the_layout_the_paper_studies_used():
    """The 660B's engines of 8 GPUs, one a node: gpus_per_node=8 gives the same cluster as before."""
    from dualpath.sim import paper

    sc = paper.Scenario("deepseek-660b", 1, 2, agents_per_pe=40, turns=3)
    _, (before,) = paper.run(sc, ("dualpath",))
    _, (now,) = paper.run(sc, ("dualpath",), gpus_per_node=8)
    assert _same(before, now)


def test_a_storage_nic_waits_for_the_shared_backend_and_reports_what_it_has_not_received():
    backend = Link(1e6)  # 1 MB/s for the cluster
    a, b = StorageNic(10e6, backend), StorageNic(10e6, backend)
    assert a.read(0.0, 1e6) == pytest.approx(1.0)  # the backend, not its own NIC (0.1 s), sets the end
    assert b.read(0.0, 1e6) == pytest.approx(2.0)  # queued behind a's read at the backend (FIFO)
    assert b.backlog_bytes(0.0) == pytest.approx(1e6)  # its NIC's own backlog (the read's 0.1 s) ...
    assert b.queue_bytes(0.5) == 1e6  # ... but the read queue it reports is what has not arrived yet
    assert b.queue_bytes(2.0) == 0 and a.queue_bytes(1.0) == 0
    alone = StorageNic(10e6)  # no backend: its queue is its NIC's backlog, as before
    assert alone.read(0.0, 1e6) == pytest.approx(0.1) and alone.queue_bytes(0.05) == pytest.approx(5e5, rel=1e-6)


@pytest.mark.parametrize("policy", ["dualpath", "de-read"])
def test_a_backend_below_the_nics_sum_bounds_the_jobs_read_rate_by_it(policy):
    """Three 8 MB/s NICs (24 MB/s) behind a 12 MB/s backend: the job reads at the backend's rate,
    never faster, and within 2% of it (closed loop, storage-bound)."""
    free = _run(policy)
    assert _read_Bps(free) > 14e6  # without it, more than the backend allows
    bound = _run(policy, backend_gbps=0.012)
    assert 0.98 * 12e6 <= _read_Bps(bound) <= 12e6 * (1 + 1e-9)
    assert bound.duration > free.duration


def test_each_nodes_storage_nic_still_binds_behind_a_faster_backend():
    """pe-read reads on one 8 MB/s NIC: a 12 MB/s backend leaves it as it was (within 1%), and a
    6 MB/s one bounds it."""
    free, above, below = (_run("pe-read", backend_gbps=b) for b in (0.0, 0.012, 0.006))
    assert _read_Bps(above) <= SNIC * 1e9 * (1 + 1e-9)
    assert above.duration == pytest.approx(free.duration, rel=0.01)
    assert 0.98 * 6e6 <= _read_Bps(below) <= 6e6 * (1 + 1e-9)


def test_an_oversubscribed_switch_slows_the_policies_that_move_kv_on_path_b_and_not_pe_read():
    """Compute NICs of 16 MB/s per node (2x the storage NIC): 48 MB/s into the switch. At 4:1 its
    12 MB/s bisection is below what path B moves for de-read and dualpath (they read on all three
    NICs, every hit byte crossing to the PE), and above pe-read's handoffs (one NIC's reads)."""
    link = {"compute_link_gbps": 0.016}
    for policy, slowed in (("pe-read", False), ("de-read", True), ("dualpath", True)):
        free = _run(policy, **link)
        assert _same(free, _run(policy, oversubscription=1.0, **link))  # 1:1 is no switch at all
        tight = _run(policy, oversubscription=4.0, **link)
        if slowed:
            assert tight.duration > 1.2 * free.duration, policy
        else:
            assert tight.duration == pytest.approx(free.duration, rel=0.01)
        # what crossed the switch (path B, and handoffs) never went faster than its bisection
        crossed = sum(x.read_bytes_de for x in tight.records) * (BB - HEADER_BYTES) / BB
        assert crossed / tight.duration <= 12e6 * (1 + 1e-9)


def test_gpus_of_one_node_share_its_storage_nic():
    """One-GPU engines, 2P2D: at 2 GPUs per node both PEs share one storage NIC, and pe-read, bound by
    the PEs' NICs, halves (within 3%); so it does at 8 GPUs per node against 4, with 8 PEs."""
    one, two = _run("pe-read", n_prefill=2, n_decode=2, gpus_per_node=1), \
        _run("pe-read", n_prefill=2, n_decode=2, gpus_per_node=2)
    assert _same(one, _run("pe-read", n_prefill=2, n_decode=2))  # one a node: as before
    assert _tokens_per_s(two) / _tokens_per_s(one) == pytest.approx(0.5, rel=0.03)
    four, eight = (_run("pe-read", n_prefill=8, n_decode=8, gpus_per_node=g) for g in (4, 8))
    assert _tokens_per_s(eight) / _tokens_per_s(four) == pytest.approx(0.5, rel=0.03)
    assert _read_Bps(eight) <= SNIC * 1e9 * (1 + 1e-9)  # all 8 PEs' reads through one NIC


def test_an_engine_larger_than_a_node_has_the_nics_of_every_node_it_spans():
    """Engines of 2 GPUs on nodes of 1: each PE reads through two storage NICs, so pe-read doubles
    (within 3%) against nodes of 2 GPUs; GPUs that do not pack into nodes are refused."""
    spans = _run("pe-read", agents=8, gpus_per_engine=2, gpus_per_node=1)
    packed = _run("pe-read", agents=8, gpus_per_engine=2, gpus_per_node=2)
    assert _tokens_per_s(spans) / _tokens_per_s(packed) == pytest.approx(2.0, rel=0.03)
    with pytest.raises(ValueError):
        _run("pe-read", agents=1, gpus_per_engine=3, gpus_per_node=8)


def test_the_shared_study_reports_each_limit_per_node_and_against_none(tmp_path):
    """`sim paper`'s study on one small cluster: the rows, and the backend and GPUs-per-node limits
    moving pe-read as their rates say (a backend at 0.25x of the NICs is below pe-read's reads on a
    third of them; a node per GPU gives each 8-GPU engine eight storage NICs)."""
    from dualpath.sim import paper

    limits = {k: paper.SHARED_LIMITS[k] for k in ("none", "backend 0.25x", "1 GPU per node")}
    rows = paper.study_shared(tmp_path, sizes=((1, 2),), limits=limits, agents_per_pe=300, send_until_s=20.0)
    by = {(r["limit"], r["policy"]): r for r in rows}
    assert set(by) == {(lim, pol) for lim in limits for pol in ("pe-read", "dualpath")}
    assert by["backend 0.25x", "pe-read"]["vs none"] < 0.9 and by["backend 0.25x", "dualpath"]["vs none"] < 0.9
    assert by["1 GPU per node", "pe-read"]["vs none"] > 1.2
    assert by["none", "pe-read"]["read GB/s per node"] <= paper.Hardware().snic_gbps
    assert (tmp_path / "shared.json").exists()
