"""The vLLM-named metrics, from a coordinator's state without a cluster: what each family counts for
an answered request, the running / waiting gauges, finish reasons, buckets. (tests/test_dashboard.py
scrapes them from a live cluster.)"""

from __future__ import annotations

import math
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from dualpath.protocol import SamplingParams
from dualpath.sched.coordinator import RequestStatus
from dualpath.sched.metrics import ClusterMetrics, buckets_1_2_5, finish_reason, in_flight

BT = 16
EOS = 2


def fake_coordinator(**requests: RequestStatus) -> SimpleNamespace:
    """What ClusterMetrics reads of a coordinator; `requests` maps an id to its status."""
    cfg = SimpleNamespace(scheduler=SimpleNamespace(policy="dualpath"),
                          engine=SimpleNamespace(buffer_blocks=64, hbm_blocks=128))
    return SimpleNamespace(cfg=cfg, model_name="tiny-gqa", max_context=2048, waiting=[], live_engines=lambda: [],
                           requests={rid: SimpleNamespace(status=st) for rid, st in requests.items()})


def request(output: list[int], max_tokens: int, prompt: int = 40, hit_blocks: int = 2) -> SimpleNamespace:
    """An answered request: arrived at 10 s, admitted at 10.5, first token at 11, done at 13 (below)."""
    return SimpleNamespace(tokens=[1] * prompt, output=output, hit_blocks=hit_blocks, policy="dualpath",
                           decision=SimpleNamespace(path="B"), t_arrival=10.0, t_scheduled=10.5, t_first=11.0,
                           params={"max_tokens": max_tokens, "sampling": SamplingParams(eos_id=EOS)})


def scrape(m: ClusterMetrics) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(m.render().decode()) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted({"model_name": "tiny-gqa", **labels}.items())))]


def test_an_answered_request_moves_every_vllm_family_by_what_it_did():
    m = ClusterMetrics(fake_coordinator())
    m.answered(request(output=[5, 6, 7, 8, 9], max_tokens=5), t_done=13.0, bt=BT)
    s = scrape(m)
    assert value(s, "vllm:request_success_total", finished_reason="length") == 1
    assert value(s, "vllm:request_success_total", finished_reason="stop") == 0  # declared before it happens
    assert value(s, "vllm:prompt_tokens_total") == 40 and value(s, "vllm:generation_tokens_total") == 5
    assert value(s, "vllm:prefix_cache_queries_total") == 40 and value(s, "vllm:prefix_cache_hits_total") == 2 * BT
    assert value(s, "vllm:request_prompt_tokens_sum") == 40 and value(s, "vllm:request_generation_tokens_sum") == 5
    assert value(s, "vllm:request_params_max_tokens_sum") == 5
    phases = {"vllm:e2e_request_latency_seconds": 3.0, "vllm:request_queue_time_seconds": 0.5,
              "vllm:request_inference_time_seconds": 2.5, "vllm:request_prefill_time_seconds": 0.5,
              "vllm:time_to_first_token_seconds": 1.0, "vllm:request_decode_time_seconds": 2.0,
              "vllm:time_per_output_token_seconds": 0.5}  # 2 s over the 4 gaps after the first token
    for name, seconds in phases.items():
        assert value(s, name + "_count") == 1 and math.isclose(value(s, name + "_sum"), seconds), name
    assert value(s, "dualpath_cluster_info", policy="dualpath") == 1


def test_finish_reasons_as_vllm_names_them():
    assert finish_reason(request(output=[5, EOS], max_tokens=2)) == "stop"  # EOS as the last allowed token
    assert finish_reason(request(output=[5, 6], max_tokens=4)) == "stop"  # a stop string ended it early
    assert finish_reason(request(output=[5, 6], max_tokens=2)) == "length"
    m = ClusterMetrics(fake_coordinator())
    m.answered(request(output=[5, 6], max_tokens=2), t_done=13.0, bt=BT, reason="stop")  # the caller knows best
    m.aborted()
    s = scrape(m)
    assert value(s, "vllm:request_success_total", finished_reason="stop") == 1
    assert value(s, "vllm:request_success_total", finished_reason="abort") == 1


def test_running_counts_admitted_requests_and_waiting_the_rest():
    coordinator = fake_coordinator(a=RequestStatus.PREFILLING, b=RequestStatus.WAITING, c=RequestStatus.DECODING)
    assert in_flight(coordinator, running=True)() == 2 and in_flight(coordinator, running=False)() == 1
    m = ClusterMetrics(coordinator)
    s = scrape(m)
    assert value(s, "vllm:num_requests_running") == 2 and value(s, "vllm:num_requests_waiting") == 1
    coordinator.requests.clear()  # all answered: read at scrape time, the gauges follow
    s = scrape(m)
    assert value(s, "vllm:num_requests_running") == 0 and value(s, "vllm:num_requests_waiting") == 0


def test_token_buckets_are_vllms_1_2_5_up_to_the_context():
    assert buckets_1_2_5(2048) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
    assert buckets_1_2_5(1) == (1,)
