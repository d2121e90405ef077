"""The simulator decides with the real policies and agrees with measured runs of the real system."""

import dataclasses
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


@pytest.mark.parametrize("measured", ["runs/repro_s9/repro.json"])
def test_the_simulated_bench_repro_is_within_15_percent_of_the_measured_one(measured, tmp_path):
    """The CPU headline (1P2D, 8 MB/s storage NICs, the same seeded workload): tokens/s per policy
    within 15% of the committed measured run, and the same ordering of the policies."""
    r = main(ReproConfig(), CPU_PROFILE, 10.0, str(ROOT / measured), str(tmp_path / "sim.json"))
    v = r["validation"]
    assert v["same_ordering"], v
    assert all(0.85 <= row["sim / measured"] <= 1.15 for row in v["rows"]), v["rows"]
    assert json.loads((tmp_path / "sim.json").read_text())["validation"]["rows"] == v["rows"]


def test_a_pool_serves_waiters_as_the_engines_room_does_and_refuses_what_never_fits():
    from dualpath.sim.simulator import Pool

    pool, order = Pool(10), []
    pool.take(8, lambda: order.append("a"))
    pool.take(5, lambda: order.append("b"))  # waits: 2 free
    pool.take(1, lambda: order.append("c"))  # fits: takes at once, past b (Room.until tries first)
    pool.take(3, lambda: order.append("d"))  # waits: 1 free
    assert order == ["a", "c"] and pool.free == 1
    pool.give(1)  # 2 free: neither waiter fits
    assert order == ["a", "c"]
    pool.give(8)  # 10 free: b, then d, in the order they began waiting
    assert order == ["a", "c", "b", "d"] and pool.used == 8
    assert not pool.try_take(3) and pool.try_take(2) and pool.free == 0
    with pytest.raises(ValueError):
        pool.take(11, lambda: None)
    assert Pool(0).free > 10**12  # unbounded


async def test_the_simulated_pool_grants_in_the_order_the_engines_block_allocator_does():
    """The same takes and releases, on the engines' own ``BlockAllocator`` (its ``Room``) and on the
    simulator's ``Pool``: the same requests hold memory after each step, granted in the same order."""
    import asyncio

    from dualpath.engine.kvcache import BlockAllocator
    from dualpath.sim.simulator import Pool

    script = [("take", "a", 6), ("take", "b", 5), ("take", "c", 3), ("take", "d", 2), ("take", "e", 4),
              ("give", "a", 6), ("give", "c", 3), ("take", "f", 1), ("give", "d", 2), ("give", "b", 5)]
    real, real_order, held = BlockAllocator(10), [], {}
    pool, sim_order = Pool(10), []

    async def take_real(name: str, n: int) -> None:
        held[name] = await real.alloc_wait(n)
        real_order.append(name)

    tasks = []
    for op, name, n in script:
        if op == "take":
            tasks.append(asyncio.create_task(take_real(name, n)))
            pool.take(n, lambda name=name: sim_order.append(name))
        else:
            real.release(held.pop(name))
            pool.give(n)
        for _ in range(5):  # let the woken waiters run
            await asyncio.sleep(0)
        assert real_order == sim_order and real.free == pool.free, (op, name, real_order, sim_order)
    await asyncio.gather(*tasks)
    assert sim_order == ["a", "c", "b", "d", "f", "e"]  # c and f pass b and e, which wait (strict FIFO would not)


def test_the_prefill_engine_and_the_simulator_batch_alike():
    from dualpath.engine.batching import pick_batch

    assert pick_batch([100, 5000, 300], 4096) == [100, 3996]  # the second is chunked, the third waits
    assert pick_batch([], 4096) == [] and pick_batch([10, 10], 20) == [10, 10]


async def test_a_prefill_step_takes_the_jobs_whose_kv_is_in_and_else_the_first_loading_one():
    """A step waits for each layer of every job in it: a job read early must not wait for the slowest
    read. Only fully loaded jobs go in; with none, the first job runs alone (its layers as they land)."""
    import asyncio
    from types import SimpleNamespace

    from dualpath.config import EngineConfig
    from dualpath.engine.prefill import PrefillEngine, PrefillJob
    from dualpath.protocol import SamplingParams

    def job(rid: str, layers_in: int, hit_blocks: int = 4) -> PrefillJob:
        j = PrefillJob(rid=rid, tokens=list(range(300)), prompt_len=300, hit_blocks=hit_blocks, de_blocks=0,
                       sampling=SamplingParams(), de="de", de_run=None, computed=hit_blocks * 64)
        j.path_a_layer = [asyncio.Event() for _ in range(3)]
        j.path_b_layer = [asyncio.Event() for _ in range(3)]
        for ev in j.path_a_layer[:layers_in] + j.path_b_layer:
            ev.set()
        return j

    engine = SimpleNamespace(cfg=SimpleNamespace(engine=EngineConfig()), ready=[])
    last_only = job("last layer only", 0)  # spans of layers land in any order
    last_only.path_a_layer[-1].set()
    engine.ready = [job("loading", 1), job("loaded", 3), last_only, job("cold", 0, hit_blocks=0), job("unread", 0)]
    assert [j.rid for j, _ in PrefillEngine._pick(engine)] == ["loaded", "cold"]
    engine.ready = [job("unread", 0), job("one layer", 1), job("two layers", 2)]
    assert [j.rid for j, _ in PrefillEngine._pick(engine)] == ["unread"]  # the first to be read


def test_memory_bounds_concurrency_and_every_request_still_ends():
    """A DE whose HBM holds two requests: never more than that in flight, and nothing is lost."""
    rc = ReproConfig()
    sessions = agentic(rc.workload.__class__(**{**vars(rc.workload), "agents": 6, "turns": 3}))
    bb, layers = block_bytes(rc.preset, rc.dtype, rc.block_tokens)
    big = max(-(-(c + t.append_tokens + t.output_tokens) // 64) for s in sessions for c, t in
              zip([0] + [sum(x.append_tokens + x.output_tokens for x in s.turns[:k]) for k in range(1, 3)], s.turns))
    from dualpath.sim.simulator import Simulation

    cfg = SimConfig(1, 1, 0.008, 10.0, block_tokens=64, block_bytes=bb, n_layers=layers, hbm_blocks=2 * big + 1)
    sim = Simulation(cfg, CPU_PROFILE, "dualpath", sessions)
    peak = []
    real_take = sim.engines[1].hbm.try_take  # a DE admits without waiting
    sim.engines[1].hbm.try_take = lambda n: (real_take(n), peak.append(sim.engines[1].hbm.used))[0]
    r = sim.run(1)
    assert len(r.records) == 6 * 2 and all(rec.t_done is not None for rec in r.records)
    assert max(peak) <= cfg.hbm_blocks and sim.engines[1].hbm.used == 0  # all given back
    free = simulate(dataclasses.replace(cfg, hbm_blocks=0), CPU_PROFILE, "dualpath", sessions)
    assert r.duration > free.duration  # the limit costs time


def test_engines_on_one_node_share_its_storage_nic():
    rc = ReproConfig()
    sessions = agentic(rc.workload.__class__(**{**vars(rc.workload), "agents": 16, "turns": 3}))
    bb, layers = block_bytes(rc.preset, rc.dtype, rc.block_tokens)
    apart = SimConfig(2, 2, 0.008, 10.0, block_tokens=64, block_bytes=bb, n_layers=layers)
    together = dataclasses.replace(apart, engines_per_node=2)  # both PEs on node 0, both DEs on node 1
    a, t = (simulate(c, CPU_PROFILE, "pe-read", sessions) for c in (apart, together))
    assert {e["node"] for e in t.samples[0]["engines"].values()} == {0, 1}
    assert 1.8 < t.duration / a.duration < 2.2  # storage-bound: one NIC where there were two


def test_the_roofline_knows_the_papers_shapes():
    from dualpath.sim.profile import SHAPES, GpuSpec, Roofline

    assert SHAPES["qwen2.5-32b"].kv_bytes_per_token == 64 * 2 * 8 * 128 * 2  # 256 KiB: GQA, bf16
    assert SHAPES["deepseek-660b"].kv_bytes_per_token == 61 * 576 * 2  # MLA latent + rope
    qwen = Roofline(SHAPES["qwen2.5-32b"], GpuSpec.named("h200"), 1)
    ds = Roofline(SHAPES["deepseek-660b"], GpuSpec.named("h200"), 8)
    assert qwen.prefill_s([(1024, 64_000)]) > 1.5 * qwen.prefill_s([(1024, 1_000)])  # dense attention grows
    assert ds.prefill_s([(1024, 64_000)]) < 1.05 * ds.prefill_s([(1024, 4_000)])  # a 2K window does not
    assert ds.kv_hbm_bytes > 0 and Roofline(SHAPES["deepseek-660b"], GpuSpec.named("h800"), 8).kv_hbm_bytes == 0
    assert ds.decode_step_s(128, 128 * 2048) > ds.decode_step_s(1, 2048)


def test_a_trace_hits_what_earlier_requests_stored(tmp_path):
    """Mooncake-format replay: a request whose leading hash ids an earlier one computed loads them."""
    from dualpath.bench.workload import read_jsonl

    lines = [{"timestamp": 0, "input_length": 2048, "output_length": 4, "hash_ids": [1, 2, 3, 4]},
             {"timestamp": 5000, "input_length": 2560, "output_length": 4, "hash_ids": [1, 2, 3, 4, 5]},
             {"timestamp": 5000, "input_length": 1024, "output_length": 4, "hash_ids": [9, 10]}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    sessions = read_jsonl(tmp_path / "t.jsonl", block_tokens=64)
    bb, layers = block_bytes("tiny-gqa", "float32", 64)
    cfg = SimConfig(1, 1, 0.008, 10.0, block_tokens=64, block_bytes=bb, n_layers=layers, trace_block_tokens=64)
    r = simulate(cfg, CPU_PROFILE, "dualpath", sessions, warmup_turns=0)
    cached = {rec.session: rec.cached_tokens for rec in r.records}
    assert cached == {0: 0, 1: 4 * 64, 2: 0} and r.mode == "online"


def test_paper_scale_dualpath_beats_pe_read_within_the_bound():
    from dualpath.sim.paper import Scenario, run

    sc = Scenario("qwen2.5-32b", 1, 2, gpus_per_engine=8, agents_per_pe=100, turns=3)  # one engine a node
    summaries, _ = run(sc, ("pe-read", "dualpath"))
    ratio = summaries[1]["ratio"]
    assert summaries[0]["failed"] == summaries[1]["failed"] == 0
    assert 2.5 < ratio <= 3.0 + 1e-6, ratio  # storage-bound: three NICs where pe-read has one


@pytest.mark.cluster
def test_sim_repro_replays_a_trace_file_and_writes_the_bench_repro_plots(tmp_path):
    import subprocess
    import sys

    lines = [{"timestamp": i * 100, "input_length": 1024, "output_length": 8, "hash_ids": [1, 2, 3 + i]}
             for i in range(20)]
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "sim.json"
    argv = [sys.executable, "-m", "dualpath.cli", "sim", "repro", "--workload", str(trace), "--trace-block-tokens",
            "64", "--policies", "pe-read,dualpath", "--out", str(out)]
    p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    assert [s["requests"] for s in r["summaries"]] == [20, 20] and r["summaries"][0]["cached_tokens"] > 0
    assert all((tmp_path / f"sim_{k}.png").stat().st_size > 0 for k in ("throughput", "node_bandwidth", "path_share"))
    bad = subprocess.run(argv[:6] + [str(tmp_path / "missing.jsonl")], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode != 0 and "--workload" in bad.stderr and "Traceback" not in bad.stderr


def test_a_request_larger_than_an_engines_memory_fails_and_the_rest_go_on():
    rc = ReproConfig()
    sessions = agentic(rc.workload.__class__(**{**vars(rc.workload), "agents": 3, "turns": 3}))
    bb, layers = block_bytes(rc.preset, rc.dtype, rc.block_tokens)
    small = -(-(sessions[0].turns[0].append_tokens + sessions[0].turns[0].output_tokens) // 64)  # fits turn 1 only
    cfg = SimConfig(1, 1, 0.008, 10.0, block_tokens=64, block_bytes=bb, n_layers=layers, hbm_blocks=small + 2)
    r = simulate(cfg, CPU_PROFILE, "dualpath", sessions)  # returns: nothing waits forever
    failed = [rec for rec in r.records if rec.error]
    assert failed and all("memory" in rec.error for rec in failed)
    assert all(rec.t_done is not None for rec in r.records if not rec.error)


def test_a_de_that_refuses_is_passed_over_at_once_as_the_coordinator_does():
    """The view (a heartbeat old) shows room on de0, which has none: de0 refuses, holding nothing,
    and de1 is asked at once, not at the next heartbeat. As in the coordinator's ``schedule``, the
    refused decision stays counted in the view until the next heartbeat."""
    from dualpath.sched.policy import RequestInfo
    from dualpath.sim.simulator import Simulation

    bb, layers = block_bytes("tiny-gqa", "float32", 64)
    cfg = SimConfig(1, 2, 0.008, 10.0, block_tokens=64, block_bytes=bb, n_layers=layers, hbm_blocks=100)
    sim = Simulation(cfg, CPU_PROFILE, "de-read", [])
    for e in sim.engines:
        sim.view.put(sim._load(e))
    de0, de1 = sim.engines[1], sim.engines[2]
    assert de0.hbm.try_take(95)  # since its heartbeat
    sim.view.put(sim.view.loads["de1"].plus(running_decode_tokens=1000))  # so the policy asks de0 first
    info = RequestInfo(640, 5, bb, 16, 10, 11)
    d = sim._decide(info)
    assert d is not None and d.de == "de1"
    assert (de0.hbm.used, de0.buffer.used, de1.hbm.used, de1.buffer.used) == (95, 0, 11, 10)
    assert sim.view.loads["de0"].free_hbm_blocks == 100 - 11  # the refused attempt, counted until a heartbeat
    assert sim.view.loads["pe0"].queued_prefill_tokens == 2 * (640 - 5 * 64)  # both attempts, as the coordinator
    de1.hbm.used = 95
    assert sim._decide(info) is None and sim.short_of == "decode"  # no DE has room: the request waits


def test_a_measured_grid_profile_grows_with_context_and_batch_and_interpolates_between_points():
    from dualpath.sim.profile import GridProfile

    path = ROOT / "runs/sim/profiles/cpu_tiny_gqa.json"
    g = GridProfile.from_file(path, shared_cores=True)
    rows = json.loads(path.read_text())["grids"]["1"]
    point = next(r for r in rows["decode"] if r["batch"] == 8 and r["context"] == 2048)
    assert g.decode_step_s(8, 8 * 2048) == pytest.approx(point["seconds"])  # a measured point, as measured
    assert g.decode_step_s(8, 8 * 8192) > 2 * g.decode_step_s(8, 8 * 1024)  # context costs, at any batch
    assert g.decode_step_s(2, 2 * 2048) < g.decode_step_s(16, 16 * 2048)  # not flat below some batch
    between = g.decode_step_s(8, 8 * 3072)
    assert min(g.decode_step_s(8, 8 * 2048), g.decode_step_s(8, 8 * 4096)) <= between \
        <= max(g.decode_step_s(8, 8 * 2048), g.decode_step_s(8, 8 * 4096))
    assert g.decode_step_s(96, 96 * 2048) > g.decode_step_s(48, 48 * 2048)  # extended past the grid
    assert g.prefill_s([(256, 8192)]) > 2 * g.prefill_s([(256, 0)])  # cached tokens cost attention
    two = g.prefill_s([(256, 4096), (256, 0)])
    assert two == pytest.approx(g.prefill_s([(512, 0)]) + g.prefill_s([(256, 4096)]) - g.prefill_s([(256, 0)]))


def test_engines_that_share_a_hosts_cores_compute_slower_together():
    rc = ReproConfig()
    sessions = agentic(rc.workload.__class__(**{**vars(rc.workload), "agents": 8, "turns": 3}))
    bb, layers = block_bytes(rc.preset, rc.dtype, rc.block_tokens)
    own = SimConfig(1, 2, 0.0, 10.0, block_tokens=64, block_bytes=bb, n_layers=layers)  # storage unlimited
    one_core, two_cores = (dataclasses.replace(own, host_cores=n) for n in (1, 2))
    t_own, t_two, t_one = (simulate(c, CPU_PROFILE, "dualpath", sessions).duration for c in (own, two_cores, one_core))
    assert t_own <= t_two < t_one


@pytest.mark.parametrize("name", ["CPU 1P2D, 8 MB/s (s9)", "CPU 1P2D, 8 MB/s (s11 final)",
                                  "3 namespace hosts, 1000 Mbit/s, 8 MB/s"])
def test_the_measured_profile_predicts_committed_cpu_runs_within_15_percent(name):
    """Runs the profile was not taken from (it is a grid of the engines' steps on this machine,
    runs/sim/profiles/): tokens/s per policy within 15% and the policies in the measured order.
    (Not the runs with storage not emulated, nor 40 Mbit/s links: docs/SIM.md gives their gap.)"""
    from dualpath.sim.profile import load_profile
    from dualpath.sim.validate import CPU_CASES, CPU_HOST_CORES, check, shares_cores

    case = next(c for c in CPU_CASES if c.name == name)
    assert shares_cores(case, CPU_HOST_CORES, ROOT)  # 1P2D on two cores: the one-thread grids
    profile = load_profile(ROOT / "runs/sim/profiles/cpu_tiny_gqa.json", shared_cores=True)
    r = check(case, profile, CPU_HOST_CORES, ROOT)
    assert r["same_ordering"], r
    assert all(0.85 <= row["sim / measured"] <= 1.15 and row["failed"] == 0 for row in r["rows"]), r["rows"]


def test_the_profile_command_measures_the_engines_steps_into_grids_the_simulator_reads(tmp_path):
    from dualpath.bench.common import write_json
    from dualpath.sim.measure import Axes, measure
    from dualpath.sim.profile import GridProfile, load_profile

    result = measure("tiny-gqa", "cpu", "float32", 64, repeat=1, axes=Axes((1, 4), (64, 512), (16, 128), (0, 256)))
    path = write_json(tmp_path / "profile.json", result)
    assert {len(g["decode"]) for g in result["grids"].values()} == {4}
    assert all(r["seconds"] > 0 for g in result["grids"].values() for r in g["decode"] + g["prefill"])
    for shared in (True, False):
        p = load_profile(path, shared_cores=shared)
        assert isinstance(p, GridProfile) and p.decode_step_s(2, 2 * 300) > 0 and p.prefill_s([(64, 128)]) > 0


def test_paper_sensitivity_moves_a_compute_bound_figure_with_mfu_and_a_storage_bound_one_with_the_storage_nic():
    """`sim paper`'s bands (issue 35 item 3) on a tiny configuration: each uncertain input low and
    high, one at a time; directions only, no times."""
    from dualpath.sim.paper import FLAT, UNCERTAIN, Scenario, run, sensitivity

    def measure(vary):
        ds = vary(Scenario("deepseek-660b", 1, 1, agents_per_pe=300, turns=3))
        qwen = vary(Scenario("qwen2.5-32b", 1, 2, gpus_per_engine=8, agents_per_pe=60, turns=3))
        (dp,), _ = run(ds, ("dualpath",), snic_gbps=0.0)  # storage unlimited: compute-bound
        (q,), _ = run(qwen, ("pe-read",))  # one storage NIC for three engines: storage-bound
        return {"compute-bound": dp["tokens_per_s"], "storage-bound": q["tokens_per_s"]}

    rows, wall = sensitivity(measure)
    assert len(wall) == 2 * len(UNCERTAIN)
    fig = {r["figure"]: r for r in rows}
    compute, storage = fig["compute-bound"], fig["storage-bound"]
    for r in rows:  # the band spans the central value and every input's low and high
        values = [r["central"], *(v for n in UNCERTAIN for v in r[n])]
        assert (r["low"], r["high"]) == (min(values), max(values))
    c = compute["central"]
    assert compute["MFU"][0] < c < compute["MFU"][1], compute
    assert compute["hit ratio"][0] < c < compute["hit ratio"][1]  # less hit, more to compute
    assert all(abs(v - c) < FLAT * c for v in compute["storage NIC"] + compute["compute NIC"])
    assert compute["set by"] in ("MFU", "hit ratio")
    c = storage["central"]
    assert storage["set by"] == "storage NIC", storage
    lo, hi = storage["storage NIC"]
    assert 1.8 < hi / c < 2.2 and 1.8 < c / lo < 2.2  # its one NIC at half and double
    assert all(abs(v - c) < FLAT * c for v in storage["MFU"])


def _probe_config(host):
    bb, layers = block_bytes("tiny-gqa", "float32", 64)
    return SimConfig(1, 2, 0.0, 10.0, block_tokens=64, block_bytes=bb, n_layers=layers, host_cores=2, host=host)


def test_host_costs_are_charged_where_the_engines_pay_them():
    """None: the model steps alone, as before. request_s: once per request, between its prefill and
    its first token. seq_s and step_s: per decode step (per sequence, per step). block_s: per prompt
    block of a job starting a prefill step."""
    from dualpath.sim.measure import PROBES
    from dualpath.sim.profile import HostCosts

    one = PROBES[0].workload()  # one agent, one-token answers: nothing overlaps
    base = simulate(_probe_config(HostCosts()), CPU_PROFILE, "pe-read", one)
    assert SimConfig().host == HostCosts()  # by default none: the paper studies and `sim repro` as before
    late = simulate(_probe_config(HostCosts(request_s=0.01)), CPU_PROFILE, "pe-read", one)
    assert [r.ttft for r in late.records] == pytest.approx([r.ttft + 0.01 for r in base.records])
    decode = PROBES[1].workload()  # one agent, 64-token answers: batch 1
    t0 = simulate(_probe_config(HostCosts()), CPU_PROFILE, "pe-read", decode).records[0].tpot
    t1 = simulate(_probe_config(HostCosts(seq_s=0.001, step_s=0.002)), CPU_PROFILE, "pe-read", decode).records[0].tpot
    assert t1 == pytest.approx(t0 + 0.003)
    hits = PROBES[3]
    slow = [simulate(_probe_config(HostCosts(block_s=b)), CPU_PROFILE, "pe-read", hits.workload(), 1).records
            for b in (0.0, 0.001)]
    assert all(b.ttft > a.ttft for a, b in zip(*slow))


def test_calibration_finds_the_host_costs_a_probe_set_was_simulated_with():
    """host.calibrate solves each cost from its probe's time: given probe times the simulator itself
    produced with known costs, it returns those costs."""
    from dataclasses import asdict

    from dualpath.sim.measure import PROBES, _simulated_s, calibrate
    from dualpath.sim.profile import HostCosts

    true = HostCosts(request_s=0.004, step_s=0.0005, seq_s=0.001, block_s=0.0004)
    probes = [{**asdict(p), "measured_s": _simulated_s(p, CPU_PROFILE, true, "tiny-gqa", "float32")} for p in PROBES]
    got = calibrate(probes, CPU_PROFILE, rounds=3)
    for k, v in asdict(true).items():
        assert getattr(got, k) == pytest.approx(v, rel=0.15, abs=2e-4), (k, got)


@pytest.mark.parametrize("name", ["CPU 1P2D, storage not emulated (s9)",
                                  "CPU 1P2D, storage not emulated (s10, median of 3)",
                                  "CPU 1P2D, storage not emulated, 48 agents (s10, median of 3)"])
def test_host_costs_bring_storage_unbound_cpu_runs_within_25_percent(name):
    """Runs where storage does not bind, with the host costs the probes measured (measure.py --host; the probes
    share no workload with these runs): tokens/s per policy within 25% (3.0-3.8x over without them).
    The issue's target is 10%, checked at 15%; the gap left and the orderings: docs/SIM.md."""
    from dualpath.sim.profile import load_profile
    from dualpath.sim.validate import CPU_CASES, CPU_HOST_CORES, check

    case = next(c for c in CPU_CASES if c.name == name)
    profile = load_profile(ROOT / case.profile, shared_cores=True)
    r = check(case, profile, CPU_HOST_CORES, ROOT)
    assert all(0.75 <= row["sim / measured"] <= 1.25 and row["failed"] == 0 for row in r["rows"]), r["rows"]
