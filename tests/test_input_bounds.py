"""Bounded input (issue #30 B): what a client sends costs the coordinator a bounded amount, and
every refusal is a 4xx in OpenAI's error shape naming what is wrong.

An in-process coordinator with no engines: validation comes before scheduling, and where a test
needs an answer, `generate` is replaced by a fixed stream of tokens (the engines' side is the
subject of test_serving.py)."""

import json
import random
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from dualpath.sched.coordinator import Coordinator, RequestState
from tests.test_serving import cluster_config

MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256  # the documented bounds (coordinator.py)


def coordinator(tmp_path, request_timeout_s: float = 30.0) -> Coordinator:
    cfg = cluster_config(1, "tiny-gqa", str(tmp_path / "store"))
    cfg.scheduler.request_timeout_s = request_timeout_s
    return Coordinator(cfg)


def answer_with(coord: Coordinator, tokens: list[int]) -> None:
    """The coordinator's requests are answered with `tokens` (as far as max_tokens), no engine asked."""

    async def generate(req: RequestState) -> AsyncIterator[int]:
        for t in tokens[:req.params["max_tokens"]]:
            req.output.append(t)
            yield t

    coord.generate = generate


@pytest.fixture
async def api(tmp_path):
    coord = coordinator(tmp_path)
    async with TestClient(TestServer(coord.app())) as client:
        client.coord = coord
        yield client


async def post(client: TestClient, body: bytes | dict, path: str = "/v1/completions") -> tuple[int, dict | str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with client.post(path, data=data, headers={"Content-Type": "application/json"}) as r:
        text = await r.text()
        return r.status, json.loads(text) if r.content_type == "application/json" else text


def assert_openai_error(status: int, reply, want_status: int, param: str | None = None, needle: str = "") -> None:
    assert status == want_status, reply
    assert isinstance(reply, dict) and set(reply["error"]) == {"message", "type", "param", "code"}, reply
    assert reply["error"]["type"] == "invalid_request_error" and needle in reply["error"]["message"], reply
    if param is not None:
        assert reply["error"]["param"] == param, reply


async def test_stop_strings_are_bounded_in_count_and_length(api):
    """80,000 stop strings once took 252 s of the coordinator's loop: now a 400 names the bound."""
    many = [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]
    status, reply = await post(api, {"prompt": "x", "max_tokens": 3, "stop": many})
    assert_openai_error(status, reply, 400, "stop", f"at most {MAX_STOP_STRINGS} strings")
    status, reply = await post(api, {"prompt": "x", "max_tokens": 3, "stop": ["y" * (MAX_STOP_CHARS + 1)]})
    assert_openai_error(status, reply, 400, "stop", f"at most {MAX_STOP_CHARS} characters")
    answer_with(api.coord, list(b"abc"))
    status, reply = await post(api, {"prompt": "x", "max_tokens": 3, "stop": ["y" * MAX_STOP_CHARS] * MAX_STOP_STRINGS})
    assert status == 200 and reply["choices"][0]["text"] == "abc", reply


async def test_a_stream_never_shows_part_of_a_stop_string_and_matches_the_plain_answer(api):
    """Each token came as the new part of the whole text decoded again: the "EN" of a stop string
    "END" went out before its "D" came, so the stream said more than the plain answer."""
    answer_with(api.coord, list(b"the answer is 42. END of it"))
    body = {"prompt": "x", "max_tokens": 40, "stop": ["END", "never"]}
    status, plain = await post(api, body)
    assert status == 200 and plain["choices"][0]["text"] == "the answer is 42. ", plain
    assert plain["choices"][0]["finish_reason"] == "stop"
    async with api.post("/v1/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in (await r.text()).splitlines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


class CountingTokenizer:
    """The coordinator's tokenizer, counting the token ids it is asked to decode."""

    def __init__(self, inner):
        self.inner, self.decoded = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode(self, ids: list[int]) -> str:
        self.decoded += len(ids)
        return self.inner.decode(ids)


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_strings_are_matched_in_the_new_text_not_the_whole_answer(api, stream):
    """2,000 tokens: each token's text is decoded from a few tokens, not from the whole answer again
    (n^2 / 2 = 2 million token decodes before), and the text is the answer's."""
    n, stops = 2000, ["never", "not this either", "z" * MAX_STOP_CHARS]
    tokens = list((b"agent step ok; " * 200)[:n])
    answer_with(api.coord, tokens)
    api.coord.tokenizer = counting = CountingTokenizer(api.coord.tokenizer)
    body = {"prompt": "x", "max_tokens": n, "stop": stops}
    if stream:
        async with api.post("/v1/completions", json={**body, "stream": True}) as r:
            chunks = [json.loads(line[6:]) for line in (await r.text()).splitlines() if line.startswith("data: {")]
        text = "".join(c["choices"][0]["text"] for c in chunks)
    else:
        status, reply = await post(api, body)
        assert status == 200, reply
        text = reply["choices"][0]["text"]
    assert text == bytes(tokens).decode()
    assert counting.decoded <= 20 * n, counting.decoded


@pytest.mark.parametrize("field", ["max_tokens", "seed", "prompt"])
async def test_integers_beyond_64_bits_are_a_400(api, field):
    """A 5,000-digit max_tokens once escaped as a 500 (Python's own int-digit limit)."""
    huge = "9" * 5000
    value = f"[1, {huge}]" if field == "prompt" else huge
    status, reply = await post(api, f'{{"prompt": [1, 2], "{field}": {value}}}'.encode())
    assert_openai_error(status, reply, 400, needle="64-bit range")
    status, reply = await post(api, f'{{"prompt": [1, 2], "max_tokens": {2**64}}}'.encode())
    assert_openai_error(status, reply, 400, needle="64-bit range")


async def test_a_body_over_the_limit_and_an_unknown_path_get_openai_shaped_errors(api):
    """A 10 MB body was refused with a text/plain 413."""
    status, reply = await post(api, b'{"prompt": "' + b"a" * (10 << 20) + b'"}')
    assert_openai_error(status, reply, 413, needle=str(1 << 20))  # names the limit (1 MiB here)
    status, reply = await post(api, {"prompt": "x"}, path="/v1/nowhere")
    assert_openai_error(status, reply, 404, needle="/v1/nowhere")


TOOL = {"type": "function", "function": {"name": "ls", "description": "list files",
                                         "parameters": {"type": "object", "properties": {}}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "ls", "arguments": "{}"}}
USER = {"role": "user", "content": "ls please"}


@pytest.mark.parametrize("body,param,needle", [
    ({"tools": [1]}, "tools", "tools[0] must be an object"),
    ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools", "name"),
    ({"tools": [{"type": "function", "function": {"name": "ls", "parameters": "{}"}}]}, "tools", "parameters"),
    ({"tools": {"ls": TOOL}}, "tools", "must be a list"),
    ({"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice", "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "rm"}}}, "tool_choice", "'rm'"),
    ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"messages": [USER, {"role": "assistant", "content": None, "tool_calls": "zz"}]}, "messages", "tool_calls"),
    ({"messages": [USER, {"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "ls", "arguments": {}}}]}]},
     "messages", "arguments must be a string"),
    ({"messages": [USER, {"role": "user", "content": "x", "tool_calls": [CALL]}]}, "messages", "assistant"),
])
async def test_tools_tool_choice_and_tool_calls_must_have_their_openai_shape(api, body, param, needle):
    status, reply = await post(api, {"messages": [USER], "max_tokens": 2, **body}, path="/v1/chat/completions")
    assert_openai_error(status, reply, 400, param, needle)


async def test_well_formed_tools_and_tool_calls_are_answered(api):
    answer_with(api.coord, list(b"ok"))
    messages = [USER, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": "a.py"}]
    for choice in (None, "auto", "none"):
        status, reply = await post(api, {"messages": messages, "tools": [TOOL], "tool_choice": choice,
                                         "max_tokens": 2}, path="/v1/chat/completions")
        assert status == 200 and reply["choices"][0]["message"]["content"] == "ok", reply


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "ls"}},
                                    {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [TOOL]}}])
async def test_a_tool_choice_that_forces_a_call_is_refused_by_name(api, choice):
    """Nothing constrains what the model generates, so a forced call could not be kept: a 400
    naming tool_choice, not an answer that may hold no call."""
    status, reply = await post(api, {"messages": [USER], "tools": [TOOL], "tool_choice": choice, "max_tokens": 2},
                               path="/v1/chat/completions")
    assert_openai_error(status, reply, 400, "tool_choice", "not supported")


def test_the_text_given_out_token_by_token_is_the_whole_answer_decoded_and_cut_at_a_stop():
    """sched/text.py against random byte-tokenizer output (split characters, raw bytes, special
    ids): the pieces join to the decode of all the ids, cut just before a stop string, which none
    of the pieces shows."""
    from dualpath.engine.tokenizer import ByteTokenizer
    from dualpath.sched.text import AnswerText

    tok, rng = ByteTokenizer(512), random.Random(0)
    for trial in range(2000):
        ids = [rng.choice([rng.randrange(128), rng.randrange(128, 256), rng.randrange(0xC2, 0xF5),
                           rng.randrange(256, 512)]) for _ in range(rng.randrange(1, 40))]
        full = tok.decode(ids)
        stops = [full[i:i + rng.randrange(1, 4)] for i in rng.sample(range(len(full)), min(2, len(full)))]
        stops = stops if trial % 2 else []
        answer, pieces = AnswerText(tok, stops), []
        for k in range(1, len(ids) + 1):
            pieces.append(answer.add(ids[:k], final=k == len(ids)))
            if answer.stopped:
                break
        text = "".join(pieces)
        assert full.startswith(text) and text == answer.text and not any(s in text for s in stops)
        if answer.stopped:
            assert any(full[len(text):].startswith(s) for s in stops)
        else:
            assert text == full


async def test_a_stream_that_fails_before_its_first_token_gets_a_real_status_and_one_after_an_event(api):
    """A 503 before any byte of the stream (clients retry it; an HTTP 200 with an error event they
    do not); once tokens went out, the failure can only be an event."""
    from dualpath.sched.errors import RequestFailed

    def fail_after(n: int):
        async def generate(req: RequestState) -> AsyncIterator[int]:
            for t in range(n):
                req.output.append(65 + t)
                yield 65 + t
            raise RequestFailed(503, "no engine had room for this request within the request timeout")
        return generate

    for path, body in [("/v1/completions", {"prompt": "hi", "max_tokens": 8, "stream": True}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                                                 "stream": True})]:
        api.coord.generate = fail_after(0)
        status, reply = await post(api, body, path)
        assert status == 503 and "no engine had room" in reply["error"]["message"], reply
        api.coord.generate = fail_after(2)
        status, reply = await post(api, body, path)
        assert status == 200 and "no engine had room" in reply and "data: " in reply, reply


async def test_models_say_when_they_were_created(api):
    async with api.get("/v1/models") as r:
        model = (await r.json())["data"][0]
    assert isinstance(model["created"], int) and model["created"] > 1_700_000_000
