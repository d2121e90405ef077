"""Workloads (agentic generator, Mooncake trace replay) and the report's arithmetic, without a cluster."""

from pathlib import Path

import pytest

from dualpath.bench import report
from dualpath.bench.driver import RequestRecord, RunResult
from dualpath.bench.workload import (AgenticSpec, agentic, block_of, hit_ratios, load_mooncake,
                                     poisson_arrivals, read_jsonl, trace_prompt, write_jsonl)

TRACE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "conversation_trace.jsonl"


def test_agentic_sessions_grow_long_and_hit_at_least_95_percent_after_the_first_turn():
    spec = AgenticSpec(agents=6, turns=10, seed=3)
    sessions = agentic(spec)
    assert sessions == agentic(spec) and sessions != agentic(AgenticSpec(agents=6, turns=10, seed=4))
    hits = hit_ratios(sessions, spec.block_tokens)
    assert len(hits) == 6 * 9 and min(hits) >= 0.95
    final = [sum(t.append_tokens + t.output_tokens for t in s.turns) for s in sessions]
    assert min(final) > 20_000  # tens of thousands of tokens
    assert all(1 <= t.append_tokens <= spec.tool_output[1] for s in sessions for t in s.turns[1:])


def test_jsonl_round_trip_and_bad_lines(tmp_path):
    sessions = poisson_arrivals(agentic(AgenticSpec(agents=3, turns=4, first_prompt=(3000, 4000))), rate=2.0)
    assert [s.arrival_s for s in sessions][0] == 0.0 and sessions[2].arrival_s > sessions[1].arrival_s
    write_jsonl(sessions, tmp_path / "w.jsonl")
    assert read_jsonl(tmp_path / "w.jsonl") == sessions
    (tmp_path / "bad.jsonl").write_text('{"session": 0, "turn": 1, "append_tokens": 5, "output_tokens": 2}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: bad workload line"):
        read_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "trace.jsonl").write_text('{"timestamp": 0, "input_length": 9}\n')
    with pytest.raises(ValueError, match="not a Mooncake trace line"):
        read_jsonl(tmp_path / "trace.jsonl")


@pytest.mark.skipif(not TRACE.exists(), reason="../shared/data is not present")
def test_mooncake_replay_turns_equal_hash_ids_into_equal_token_blocks():
    sessions = load_mooncake(TRACE, limit=50, block_tokens=16, time_scale=0.5)
    assert len(sessions) == 50 and all(len(s.turns) == 1 for s in sessions)
    a, b = sessions[0].turns[0], sessions[1].turns[0]
    assert a.hash_ids[0] == b.hash_ids[0] and a.hash_ids[1] != b.hash_ids[1]
    pa, pb = trace_prompt(a, 16), trace_prompt(b, 16)
    assert pa[:16] == pb[:16] and pa[16:32] != pb[16:32]
    assert len(pa) == a.append_tokens and a.append_tokens == round(6758 * 16 / 512)  # lengths scale with blocks
    assert sessions[-1].arrival_s >= sessions[0].arrival_s
    assert block_of(7, 16) == block_of(7, 16) != block_of(8, 16)


def _run() -> RunResult:
    recs = []
    for i in range(10):
        r = RequestRecord(session=i, turn=1, t_send=float(i), t_first=i + 0.1 * (i + 1), t_done=i + 2.0,
                          prompt_tokens=1000, cached_tokens=960, output_tokens=11, path="B" if i % 2 else "A",
                          pe="pe0", de="de0", read_bytes_pe=0 if i % 2 else 100, read_bytes_de=100 if i % 2 else 0)
        recs.append(r)
    recs.append(RequestRecord(session=10, turn=1, t_send=0.0, error="RuntimeError: boom"))
    samples = [{"t": t, "engines": {"pe0": {"node": 0, "role": "prefill", "read_bytes": int(t * 4e6), "write_bytes": 0},
                                    "de0": {"node": 1, "role": "decode", "read_bytes": int(t * 2e6),
                                            "write_bytes": int(t * 1e6)}}} for t in (0.0, 5.0, 10.0)]
    return RunResult("dualpath", "offline", 10.0, recs, samples)


def test_summary_percentiles_paths_and_storage_nic_utilisation():
    s = report.summarize(_run(), snic_read_gbps=0.008, ttft_slo_s=0.55)
    assert s["requests"] == 11 and s["failed"] == 1 and s["errors"] == ["RuntimeError: boom"]
    assert s["paths"] == {"A": 5, "B": 5} and s["read_bytes"] == {"pe": 500, "de": 500}
    assert s["ttft_s"]["p50"] == pytest.approx(0.55) and s["tpot_s"]["p50"] == pytest.approx(0.19, abs=0.05)
    by_path = s["ttft_s_by_path"]
    assert by_path["A"]["p50"] == pytest.approx(0.5) and by_path["B"]["p50"] == pytest.approx(0.6)
    assert s["slo_attainment"] == pytest.approx(5 / 11)
    assert s["nodes"]["0"]["read_util"] == pytest.approx(0.5) and s["nodes"]["1"]["read_util"] == pytest.approx(0.25)
    assert s["read_util_all_nodes"] == pytest.approx(0.375)
    assert s["hit_ratio"] == pytest.approx(0.96)


def test_plots_are_written(tmp_path):
    run = _run()
    s = report.summarize(run)
    report.plot_throughput([s, s], tmp_path / "t.png", "x")
    report.plot_ttft_cdf([run], tmp_path / "c.png", "x", slo=1.0)
    report.plot_node_bandwidth([run], tmp_path / "n.png", {0: "prefill", 1: "decode"}, 0.008)
    report.plot_path_share([s], tmp_path / "p.png")
    assert all((tmp_path / f).stat().st_size > 5000 for f in ("t.png", "c.png", "n.png", "p.png"))
    t, rd, wr = report.node_bandwidth(run)[0]
    assert rd == pytest.approx([0.004] * len(rd))
