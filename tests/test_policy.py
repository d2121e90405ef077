"""Scheduling policies are pure functions: checked directly on hand-made cluster views."""

import random

import pytest

from dualpath.sched.policy import (PATH_A, PATH_B, PATH_SPLIT, ClusterView, Decision, EngineLoad, NoEngine, NoRoom,
                                   RequestInfo, choose, split_blocks)

MB = 1 << 20
REQ = RequestInfo(prompt_tokens=8000, hit_blocks=100, block_bytes=MB, max_tokens=64)


def pick(policy: str, req: RequestInfo, engines: list[EngineLoad]) -> Decision:
    return choose(policy, req, ClusterView(engines))


def view(pe_queue=0, de_queues=(0, 0), de_tokens=(0, 0)) -> list[EngineLoad]:
    pe = EngineLoad("pe0", "prefill", 0, read_queue_bytes=pe_queue)
    return [pe] + [EngineLoad(f"de{i}", "decode", i + 1, read_queue_bytes=q, running_decode_tokens=t)
                   for i, (q, t) in enumerate(zip(de_queues, de_tokens))]


def test_baselines_read_on_one_side_whatever_the_queues():
    busy_pe = view(pe_queue=500 * MB)
    assert pick("pe-read", REQ, busy_pe).path == PATH_A
    assert pick("de-read", REQ, view(de_queues=(500 * MB, 500 * MB))).path == PATH_B


def test_dualpath_reads_on_the_shorter_queue_and_picks_the_idlest_balanced_de():
    d = pick("dualpath", REQ, view(pe_queue=300 * MB, de_queues=(200 * MB, 50 * MB)))
    assert (d.de, d.de_blocks, d.path) == ("de1", 100, PATH_B)
    d = pick("dualpath", REQ, view(pe_queue=10 * MB, de_queues=(200 * MB, 50 * MB)))
    assert (d.de_blocks, d.path) == (0, PATH_A)


def test_dualpath_does_not_unbalance_decoding_for_a_shorter_read_queue():
    # de1 has the shorter queue but runs far more than one request's tokens beyond de0.
    d = pick("dualpath", REQ, view(pe_queue=300 * MB, de_queues=(200 * MB, 0), de_tokens=(0, 50_000)))
    assert d.de == "de0" and d.path == PATH_B


def test_split_equalises_the_drain_times_of_both_queues():
    d = pick("dualpath-split", REQ, view(pe_queue=40 * MB, de_queues=(0, 0)))
    assert d.path == PATH_SPLIT and d.path == "A+B"
    assert 40 * MB + d.pe_blocks * MB == d.de_blocks * MB  # 70 blocks on the DE, 30 on the PE
    assert pick("dualpath-split", REQ, view(pe_queue=500 * MB)).de_blocks == 100  # clamped: all on the DE


def test_no_hit_means_no_read_and_a_missing_role_is_an_error():
    cold = RequestInfo(prompt_tokens=100, hit_blocks=0, block_bytes=MB, max_tokens=8)
    for policy in ("pe-read", "de-read", "dualpath", "dualpath-split"):
        assert pick(policy, cold, view()).de_blocks == 0
    with pytest.raises(NoEngine):
        pick("dualpath", REQ, [EngineLoad("pe0", "prefill", 0)])
    with pytest.raises(ValueError):
        pick("fastest", REQ, view())


def test_no_policy_picks_an_engine_without_room_for_the_request():
    """A DE without the HBM for prompt + max_tokens (or a full DRAM buffer) is passed over, even
    when it is the idlest; with no room anywhere the coordinator hears NoRoom (it waits, bounded)."""
    req = RequestInfo(prompt_tokens=8000, hit_blocks=100, block_bytes=MB, max_tokens=64, prompt_blocks=125,
                      decode_blocks=126)
    pe = EngineLoad("pe0", "prefill", 0, free_buffer_blocks=200, free_hbm_blocks=200)
    full_hbm = EngineLoad("de1", "decode", 1, free_buffer_blocks=500, free_hbm_blocks=125)
    full_buf = EngineLoad("de2", "decode", 2, free_buffer_blocks=124, free_hbm_blocks=500)
    roomy = EngineLoad("de3", "decode", 3, free_buffer_blocks=125, free_hbm_blocks=126, running_decode_tokens=10**6,
                       read_queue_bytes=10**12)
    for policy in ("pe-read", "de-read", "dualpath", "dualpath-split"):
        assert pick(policy, req, [pe, full_hbm, full_buf, roomy]).de == "de3"
        with pytest.raises(NoRoom, match="decode"):
            pick(policy, req, [pe, full_hbm, full_buf])
        with pytest.raises(NoRoom, match="decode"):  # every DE refused it: wait for room, do not fail
            choose(policy, req, ClusterView([pe, roomy]), skip={"de3"})
        with pytest.raises(NoRoom, match="prefill"):
            pick(policy, req, [EngineLoad("pe0", "prefill", 0, free_buffer_blocks=200, free_hbm_blocks=124), roomy])


def test_dualpath_compares_drain_times_once_both_sides_have_measured_their_read_rates():
    """A PE that drains 4x slower than the DE (its load pipeline, not its NIC, bounds it) loses a
    read it would win on queue bytes alone; split gives it a quarter of an idle cluster's blocks."""
    slow_pe = EngineLoad("pe0", "prefill", 0, read_queue_bytes=10 * MB, read_rate_bps=1e9)
    de = EngineLoad("de1", "decode", 1, read_queue_bytes=30 * MB, read_rate_bps=4e9)
    assert pick("dualpath", REQ, [slow_pe, de]).path == PATH_B
    unmeasured = EngineLoad("de1", "decode", 1, read_queue_bytes=30 * MB)  # bytes stand in for time
    assert pick("dualpath", REQ, [slow_pe, unmeasured]).path == PATH_A
    idle_pe = EngineLoad("pe0", "prefill", 0, read_rate_bps=1e9)
    idle_de = EngineLoad("de1", "decode", 1, read_rate_bps=3e9)
    assert pick("dualpath-split", REQ, [idle_pe, idle_de]).pe_blocks == 25


def test_path_b_is_charged_what_its_delivery_costs_the_de_decoding():
    """Both sides measured and idle, the DE draining 1.5x as fast: dualpath takes path B, unless each
    second the DE spends delivering costs its running sequences 0.6 s of decoding; split gives the
    DE 60% of the blocks uncharged, and (1.5 / (1.5 + 1.6) =) 48% charged."""
    pe = EngineLoad("pe0", "prefill", 0, read_rate_bps=2e9)
    de = EngineLoad("de1", "decode", 1, read_rate_bps=3e9)
    costly = EngineLoad("de1", "decode", 1, read_rate_bps=3e9, delivery_cost=0.6)
    assert pick("dualpath", REQ, [pe, de]).path == PATH_B
    assert pick("dualpath", REQ, [pe, costly]).path == PATH_A
    assert pick("dualpath-split", REQ, [pe, de]).de_blocks == 60
    assert pick("dualpath-split", REQ, [pe, costly]).de_blocks == 48


def test_a_decode_engine_measures_what_its_deliveries_cost_its_decoding():
    from dualpath.engine.decode import DeliveryCost

    cost = DeliveryCost()
    assert cost.seconds_per_second == 0.0  # nothing measured yet
    cost.step(0.010, 8, delivering=False)
    cost.step(0.020, 16, delivering=True)  # a larger batch while delivering: not comparable
    assert cost.seconds_per_second == 0.0
    cost.step(0.0125, 8, delivering=True)  # 25% slower at the same size, delaying 8 sequences
    assert cost.seconds_per_second == pytest.approx(2.0)
    faster = DeliveryCost()
    faster.step(0.010, 8, delivering=False)
    faster.step(0.009, 8, delivering=True)  # noise the other way is no credit
    assert faster.seconds_per_second == 0.0


def test_a_busy_clock_counts_overlapping_work_once(monkeypatch):
    """What drain rates are measured over (a DE's path-B deliveries): seconds with any work under way."""
    from dualpath.storage import store

    now = [0.0]
    monkeypatch.setattr(store.time, "monotonic", lambda: now[0])
    clock = store.BusyClock()
    clock.enter()  # [0, 3): one delivery, then a second overlapping it from 1 to 3
    now[0] = 1.0
    clock.enter()
    now[0] = 2.0
    clock.leave()
    now[0] = 3.0
    assert clock.seconds() == 3.0
    clock.leave()
    now[0] = 10.0  # idle time does not count
    assert clock.seconds() == 3.0
    clock.enter()
    now[0] = 10.5
    assert clock.seconds() == 3.5


def _by_scanning(policy: str, req: RequestInfo, engines: list[EngineLoad], skip: set[str]) -> Decision:
    """The policies written as plain scans over every engine (as before the view kept its orders)."""
    def roomy(role, hbm):
        return [e for e in engines if e.role == role and e.name not in skip
                and e.free_buffer_blocks >= req.prompt_blocks and e.free_hbm_blocks >= hbm]
    pe = min(roomy("prefill", req.prompt_blocks), key=lambda e: (e.queued_prefill_tokens, e.read_queue_bytes, e.name))
    des = roomy("decode", req.decode_blocks)
    lightest = min(des, key=lambda e: (e.running_decode_tokens, e.name))
    if policy == "pe-read":
        return Decision(pe.name, lightest.name, req.hit_blocks, 0)
    ceiling = lightest.running_decode_tokens + req.prompt_tokens + req.max_tokens
    de = min((e for e in des if e.running_decode_tokens <= ceiling),
             key=lambda e: (e.read_queue_bytes, e.running_decode_tokens, e.name))
    return Decision(pe.name, de.name, req.hit_blocks, split_blocks(req, pe, de))


@pytest.mark.parametrize("spread", [0, 20_000, 2_000_000])
def test_the_kept_orders_choose_as_a_scan_of_every_engine_would(spread):
    """The view reads only the front of its orders, through whichever walk is shorter (few or many
    balanced DEs, by the spread of decode loads); it must land on the engines a full scan picks,
    also after loads change, engines leave, and some are passed over or full."""
    rng = random.Random(spread)
    engines = {}
    for i in range(60):
        role = "prefill" if i < 20 else "decode"
        engines[f"e{i}"] = EngineLoad(f"e{i}", role, i // 8, rng.randrange(50_000) if role == "prefill" else 0,
                                      rng.randrange(spread + 1), rng.randrange(0, 10**9, MB),
                                      rng.choice([0, 900, 10**6]), rng.choice([0, 900, 10**6]))
    view = ClusterView(engines.values())
    for _ in range(300):
        req = RequestInfo(rng.randrange(1, 40_000), rng.randrange(0, 100), MB, 64, rng.randrange(1, 1000),
                          rng.randrange(1, 1000))
        skip = set(rng.sample(sorted(engines), 3))
        for policy in ("pe-read", "dualpath-split"):
            try:
                want = _by_scanning(policy, req, list(engines.values()), skip)
            except ValueError:  # min() of nothing: no room anywhere
                with pytest.raises(NoRoom):
                    choose(policy, req, view, skip)
                continue
            assert choose(policy, req, view, skip) == want
        name = rng.choice(sorted(engines))  # a heartbeat changes one engine's load, or it leaves
        if rng.random() < 0.05:
            view.drop(name)
            del engines[name]
        else:
            e = engines[name] = engines[name].plus(rng.randrange(1000), rng.randrange(spread // 10 + 1), 5 * MB)
            view.put(e)
    assert len(view.keys["decode_load"]) == sum(e.role == "decode" for e in engines.values())


def test_the_scheduler_benchmark_times_the_coordinators_own_decision_path(tmp_path):
    """bench scheduler: the real Coordinator's steps on a registry of engines, each step timed, and
    the stored prefix found (a lookup that found nothing would time a different path)."""
    from dualpath.bench.scheduler_bench import run

    r = run(prefill=2, decode=4, prompt_tokens=640, hit_ratio=0.5, requests=40, policy="dualpath",
            heartbeat_every=10, out=str(tmp_path / "sched.json"))
    assert set(r["per_decision_us"]) == {"block_chain", "prefix_lookup", "policy_and_bookkeeping"}
    assert all(us > 0 for us in r["per_decision_us"].values()) and r["back_to_back_us"] > 0
    rates = r["decisions_per_s"]
    assert rates["policy_and_bookkeeping"] > rates["whole_path"] > 0
    assert r["hit_blocks"] == 640 // 2 // r["block_tokens"]
