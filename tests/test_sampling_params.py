"""OpenAI's and vLLM's sampling parameters (issue #32): each logits processor of engine/runtime.py
against a hand-computed expectation; the coordinator's validation (every out-of-range value and
every unsupported parameter is a 400 naming it, nothing accepted is ignored); and a 1P2D cluster
on which seeded draws with top_p / top_k / penalties are the same on every path, unseeded draws
differ, stop_token_ids end a stream with "stop" and min_tokens holds them back."""

import json
import math

import msgpack
import pytest
import torch

from dualpath.engine.runtime import filter_probs, process_logits, sample
from dualpath.launcher import LocalCluster, complete
from dualpath.protocol import Admit, SamplingParams, from_wire
from tests.test_input_bounds import answer_with, api, assert_openai_error, post  # noqa: F401  (api: a fixture)
from tests.test_serving import cluster_config, post_raw, stream_events

INF = math.inf


# -- the logits processors, by hand --

def test_logit_bias_adds_to_the_named_tokens():
    p = SamplingParams(logit_bias=((2, 5.0), (0, -1.0)))
    assert process_logits(torch.zeros(4), p, [3], 1).tolist() == [-1.0, 0.0, 5.0, 0.0]


def test_min_tokens_masks_eos_and_stop_token_ids_until_reached():
    p = SamplingParams(min_tokens=2, stop_token_ids=(1,), eos_id=3)
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert process_logits(logits, p, [5, 0], 1).tolist() == [1.0, -INF, 3.0, -INF]  # 1 generated < 2
    assert process_logits(logits, p, [5, 0, 0], 1).tolist() == [1.0, 2.0, 3.0, 4.0]  # 2 generated: free
    # greedy would pick EOS (4.0); held back, the answer goes on with the next best
    assert sample(logits, p, [5], 1) == 2


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_prompt_and_output():
    p = SamplingParams(repetition_penalty=2.0)
    logits = torch.tensor([2.0, -2.0, 2.0, -2.0])
    assert process_logits(logits, p, [0, 1], 1).tolist() == [1.0, -4.0, 2.0, -2.0]  # 0: prompt, 1: output


def test_presence_and_frequency_penalties_count_the_output_only():
    p = SamplingParams(presence_penalty=1.0, frequency_penalty=0.5)
    # prompt [3]; output [0, 0, 1]: token 0 twice (-(0.5 * 2 + 1)), token 1 once (-(0.5 + 1)), 3 untouched
    assert process_logits(torch.zeros(4), p, [3, 0, 0, 1], 1).tolist() == [-2.0, -1.5, 0.0, 0.0]


PROBS = torch.tensor([0.1, 0.4, 0.3, 0.2], dtype=torch.float64)


@pytest.mark.parametrize("kw,kept", [
    ({"top_k": 2}, [0.0, 0.4, 0.3, 0.0]),
    ({"top_k": 1}, [0.0, 0.4, 0.0, 0.0]),
    ({"top_p": 0.6}, [0.0, 0.4, 0.3, 0.0]),  # 0.4 < 0.6, so the next one (0.3) is needed too
    ({"top_p": 0.3}, [0.0, 0.4, 0.0, 0.0]),  # the most likely token alone already reaches it
    ({"top_p": 0.75}, [0.0, 0.4, 0.3, 0.2]),
    ({"min_p": 0.6}, [0.0, 0.4, 0.3, 0.0]),  # at least 0.6 * 0.4 = 0.24
    ({"top_k": 3, "top_p": 0.5}, [0.0, 0.4, 0.3, 0.0]),  # top_p over the renormalised top 3: 0.4 / 0.9 < 0.5
    ({}, [0.1, 0.4, 0.3, 0.2]),
])
def test_top_k_top_p_and_min_p_keep_what_they_should(kw, kept):
    assert filter_probs(PROBS.clone(), SamplingParams(temperature=1.0, **kw)).tolist() == pytest.approx(kept)


def test_a_filtered_draw_only_draws_kept_tokens_and_top_k_1_is_greedy():
    logits = torch.log(PROBS)
    for seed in range(30):
        assert sample(logits, SamplingParams(temperature=1.0, seed=seed, top_k=2), [0], 1) in (1, 2)
        assert sample(logits, SamplingParams(temperature=1.5, seed=seed, top_k=1), [0], 1) == 1
        assert sample(logits, SamplingParams(temperature=1.0, seed=seed, min_p=0.6), [0], 1) in (1, 2)


def test_greedy_with_logits_processing_takes_the_argmax_of_the_processed_logits():
    logits = torch.tensor([0.0, 3.0, 1.0])
    assert sample(logits, SamplingParams(), [0], 1) == 1
    assert sample(logits, SamplingParams(logit_bias=((2, 2.5),)), [0], 1) == 2
    assert sample(logits, SamplingParams(repetition_penalty=4.0), [1], 1) == 2  # 3 / 4 < 1


def test_what_ends_an_answer():
    p = SamplingParams(stop_token_ids=(7,), eos_id=2)
    assert p.stops_on(7) and p.stops_on(2) and not p.stops_on(3)
    q = SamplingParams(stop_token_ids=(7,), eos_id=2, ignore_eos=True)
    assert q.stops_on(7) and not q.stops_on(2)


def test_sampling_params_survive_the_wire_in_an_admit():
    p = SamplingParams(0.7, 0.9, 40, 0.05, -5, 32, 2, (7, 9), True, 2, 0.5, -0.5, 1.2, ((3, -100.0), (12, 4.5)))
    msg = Admit("r.1", [1, 2, 3], 1, 0, p, "pe0", 30.0)
    wire = msgpack.unpackb(msgpack.packb(msg.params(), use_bin_type=True), raw=False)
    assert from_wire("admit", wire) == msg


# -- the coordinator: applied or refused by name --

def sampling_of(api) -> list[dict]:  # noqa: F811
    """Make the in-process coordinator answer without engines, keeping each request's params."""
    seen = []
    answer_with(api.coord, [1, 2])
    generate = api.coord.generate

    def keep(req):
        seen.append(req.params)
        return generate(req)

    api.coord.generate = keep
    return seen


@pytest.mark.parametrize("body,param", [
    ({"temperature": 2.5}, "temperature"), ({"temperature": -0.1}, "temperature"),
    ({"top_p": 5}, "top_p"), ({"top_p": 0}, "top_p"), ({"top_p": "0.5"}, "top_p"),
    ({"top_k": 0}, "top_k"), ({"top_k": -2}, "top_k"), ({"top_k": 1.5}, "top_k"),
    ({"min_p": 1.5}, "min_p"), ({"min_p": -0.1}, "min_p"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"repetition_penalty": -1}, "repetition_penalty"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"), ({"logit_bias": {"1": 101}}, "logit_bias"),
    ({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"), ({"min_tokens": -1}, "min_tokens"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"stop_token_ids": [99999]}, "stop_token_ids"),
    ({"stop_token_ids": 3}, "stop_token_ids"),
    ({"ignore_eos": "yes"}, "ignore_eos"), ({"seed": 1.5}, "seed"),
    ({"response_format": {"type": "json_object"}}, "response_format"), ({"suffix": "x"}, "suffix"),
    ({"n": 2}, "n"), ({"best_of": 2}, "best_of"), ({"logprobs": 1}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"echo": True}, "echo"), ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": False, "stream_options": {}}, "stream_options"),
])
async def test_completions_refuse_by_name(api, body, param):  # noqa: F811
    status, reply = await post(api, {"prompt": [1, 2, 3], "max_tokens": 4, **body})
    assert_openai_error(status, reply, 400, param)


USER = {"role": "user", "content": "ls please"}
TOOL = {"type": "function", "function": {"name": "ls", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("body,param", [
    ({"tools": [TOOL], "parallel_tool_calls": False}, "parallel_tool_calls"),
    ({"tools": [TOOL], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"logprobs": True}, "logprobs"), ({"top_logprobs": 1}, "top_logprobs"),
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    ({"suffix": "x"}, "suffix"), ({"top_p": 5}, "top_p"), ({"stream_options": {}}, "stream_options"),
])
async def test_chat_refuses_by_name(api, body, param):  # noqa: F811
    status, reply = await post(api, {"messages": [USER], "max_tokens": 2, **body}, path="/v1/chat/completions")
    assert_openai_error(status, reply, 400, param)


async def test_every_accepted_parameter_reaches_the_engines(api):  # noqa: F811
    seen = sampling_of(api)
    body = {"prompt": [1, 2, 3], "max_tokens": 8, "temperature": 0.5, "top_p": 0.9, "top_k": 40, "min_p": 0.1,
            "seed": 7, "stop_token_ids": [5], "ignore_eos": True, "min_tokens": 2, "presence_penalty": 0.5,
            "frequency_penalty": -0.5, "repetition_penalty": 1.1, "logit_bias": {"4": -100, "9": 2.5},
            "response_format": {"type": "text"}, "parallel_tool_calls": True}
    status, reply = await post(api, body)
    assert status == 200, reply
    assert seen[0]["sampling"] == SamplingParams(0.5, 0.9, 40, 0.1, 7, 8, 2, (5,), True, api.coord.tokenizer.eos_id,
                                                 0.5, -0.5, 1.1, ((4, -100.0), (9, 2.5)))


async def test_an_unseeded_request_gets_its_own_random_seed(api):  # noqa: F811
    seen = sampling_of(api)
    for _ in range(3):
        assert (await post(api, {"prompt": [1, 2, 3], "max_tokens": 2, "temperature": 1.0}))[0] == 200
    assert len({p["sampling"].seed for p in seen}) == 3


async def test_chat_max_tokens_defaults_to_the_rest_of_the_context_completions_to_16(api):  # noqa: F811
    seen = sampling_of(api)
    status, reply = await post(api, {"messages": [USER]}, path="/v1/chat/completions")
    assert status == 200, reply
    prompt_tokens = reply["usage"]["prompt_tokens"]
    assert seen[0]["max_tokens"] == seen[0]["sampling"].max_tokens == api.coord.max_context - prompt_tokens
    assert (await post(api, {"prompt": [1, 2, 3]}))[0] == 200
    assert seen[1]["max_tokens"] == 16
    status, _ = await post(api, {"messages": [USER], "max_completion_tokens": 3}, path="/v1/chat/completions")
    assert status == 200 and seen[2]["max_tokens"] == 3


# -- on a 1P2D cluster --

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cfg = cluster_config(2, "tiny-gqa", str(tmp_path_factory.mktemp("store")))
    with LocalCluster(cfg, str(tmp_path_factory.mktemp("run"))) as c:
        yield c


SAMPLED = {"temperature": 0.9, "top_p": 0.9, "top_k": 50, "min_p": 0.01, "presence_penalty": 0.5,
           "frequency_penalty": 0.3, "repetition_penalty": 1.2, "logit_bias": {"7": 3.0}, "seed": 1234}


@pytest.mark.cluster
def test_seeded_draws_with_filters_and_penalties_are_the_same_on_every_path(cluster):
    turn1 = list(range(10, 80))
    complete(cluster.url, {"prompt": turn1, "max_tokens": 2})  # its blocks are stored: turn 2 hits them
    turn2 = turn1 + [3, 4, 5]
    outs = {}
    for policy in ("pe-read", "de-read", "dualpath-split"):
        r = complete(cluster.url, {"prompt": turn2, "max_tokens": 10, **SAMPLED, "dualpath_policy": policy})
        assert r["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        outs[r["dualpath"]["path"]] = r["choices"][0]["token_ids"]
    assert set(outs) == {"A", "B", "A+B"}, outs
    assert len({tuple(v) for v in outs.values()}) == 1, outs
    assert len(next(iter(outs.values()))) == 10


@pytest.mark.cluster
def test_unseeded_requests_differ_across_repeats(cluster):
    body = {"prompt": list(range(20)), "max_tokens": 8, "temperature": 1.0}
    answers = {tuple(complete(cluster.url, body)["choices"][0]["token_ids"]) for _ in range(3)}
    assert len(answers) > 1


@pytest.mark.cluster
def test_stop_token_ids_end_a_stream_and_min_tokens_holds_them_back(cluster):
    prompt = list(range(30, 60))
    greedy = complete(cluster.url, {"prompt": prompt, "max_tokens": 8})["choices"][0]["token_ids"]
    i = next(i for i in range(1, 8) if greedy[i] not in greedy[:i])  # its first appearance
    events = stream_events(cluster, {"prompt": prompt, "max_tokens": 8, "stop_token_ids": [greedy[i]]})
    tokens = [t for e in events for c in e["choices"] for t in c["token_ids"]]
    assert tokens == greedy[: i + 1] and events[-1]["choices"][0]["finish_reason"] == "stop"
    # the first greedy token as a stop token: with min_tokens 3 it cannot come among the first 3
    r = complete(cluster.url, {"prompt": prompt, "max_tokens": 8, "stop_token_ids": [greedy[0]], "min_tokens": 3})
    out = r["choices"][0]["token_ids"]
    assert len(out) >= 3 and greedy[0] not in out[:3]
    assert r["choices"][0]["finish_reason"] == ("stop" if greedy[0] in out else "length")


@pytest.mark.parametrize("param,value", [("top_p", 5), ("suffix", "x"), ("response_format", {"type": "json_object"}),
                                         ("logit_bias", {"1": 500}), ("stream_options", {"include_usage": True})])
@pytest.mark.cluster
def test_refused_parameters_name_themselves_on_the_cluster(cluster, param, value):
    status, reply = post_raw(cluster.url, json.dumps({"prompt": [1, 2], "max_tokens": 2, param: value}).encode())
    assert status == 400 and reply["error"]["param"] == param and reply["error"]["type"] == "invalid_request_error"


def test_a_checkpoints_generation_config_sets_the_defaults_a_request_does_not_name():
    """As vLLM: generation_config.json's sampling parameters are the defaults, the rest OpenAI's
    (temperature 1); what a request names wins. The presets' own config is greedy."""
    from dualpath.engine.tokenizer import ByteTokenizer, sampling_defaults
    from dualpath.sched.parse import _sampling

    qwen = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
            "eos_token_id": [151645, 151643]}
    defaults = sampling_defaults(qwen)
    assert defaults == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    assert sampling_defaults({"top_k": 0}) == {"top_k": -1} and sampling_defaults({}) == {}  # 0: transformers' "off"
    p = _sampling({}, 16, 1000, None, defaults)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.7, 0.8, 20, 1.05)
    p = _sampling({"temperature": 0, "top_k": 5}, 16, 1000, None, defaults)
    assert (p.temperature, p.top_p, p.top_k) == (0.0, 0.8, 5)
    p = _sampling({}, 16, 1000, None, {})  # a checkpoint that names none: OpenAI's
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (1.0, 1.0, -1, 1.0)
    assert _sampling({}, 16, 1000, None, ByteTokenizer(1000).sampling_defaults).temperature == 0.0
