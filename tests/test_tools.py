"""Tool calling (issue #32, item 3): templates render tools and tool calls, answers are parsed back
into OpenAI's `tool_calls` (whole or streamed), tool_choice is honoured or refused by name.

The tiny models write arbitrary tokens, so the answers that hold calls are given to an in-process
coordinator in place of its engines (as in test_input_bounds.py); the official `openai` client reads
them. A real 1P1D cluster then serves a tool conversation end to end."""

import json
import random

import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from dualpath.launcher import LocalCluster
from dualpath.sched.chat import ChatTemplate
from dualpath.sched.api import Api
from dualpath.sched.coordinator import RequestState
from dualpath.sched.parse import ChatRequest, parse_chat
from dualpath.sched.replies import Served, StreamChunks, chat_body
from dualpath.sched.tools import HERMES, PRESET, ToolCall, ToolCallParser, split_tool_calls
from tests.test_input_bounds import answer_with, coordinator
from tests.test_serving import BT, cluster_config

NAMES = {"ls", "cat"}
LS = {"type": "function", "function": {"name": "ls", "description": "list files",
                                       "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}
CAT = {"type": "function", "function": {"name": "cat", "parameters": {"type": "object"}}}
USER = {"role": "user", "content": "What is in the repository?"}


def call(name: str, arguments: dict, format=PRESET, space: str = "") -> str:
    return f"{format.start}{space}{json.dumps({'name': name, 'arguments': arguments})}{space}{format.end}"


def assistant_calling(*calls: tuple[str, dict]) -> dict:
    return {"role": "assistant", "content": None,
            "tool_calls": [{"id": f"call_{i}", "type": "function",
                            "function": {"name": name, "arguments": json.dumps(arguments)}}
                           for i, (name, arguments) in enumerate(calls)]}


def streamed(text: str, fmt, cuts: list[int]) -> tuple[str, list[ToolCall]]:
    """`text` given to a parser in the pieces that `cuts` makes, then ended."""
    parser, content = ToolCallParser(fmt, NAMES), []
    for a, b in zip([0, *cuts], [*cuts, len(text)]):
        content.append(parser.add(text[a:b])[0])
    content.append(parser.add("", final=True)[0])
    return "".join(content), parser.calls


def same_calls(a: list[ToolCall], b: list[ToolCall]) -> bool:
    return [(c.name, c.arguments) for c in a] == [(c.name, c.arguments) for c in b]


# -- the parser --

@pytest.mark.parametrize("fmt,space", [(PRESET, ""), (HERMES, "\n")])
def test_a_call_in_the_templates_format_becomes_a_tool_call_and_leaves_the_content(fmt, space):
    text = "Let me look.\n" + call("ls", {"path": "src"}, fmt, space) + "\n" + call("cat", {}, fmt, space) + "\n"
    content, calls = split_tool_calls(text, fmt, NAMES)
    assert content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("ls", {"path": "src"}), ("cat", {})]
    assert calls[0].id != calls[1].id and all(c.id.startswith("call_") for c in calls)


@pytest.mark.parametrize("body", ['{"name": "ls", "arguments": {"path": ', '{"name": "ls", "arguments": [1]}',
                                  '{"name": "rm", "arguments": {}}', '["ls"]', '{"arguments": {}}', "not json"])
def test_what_is_not_a_whole_call_of_a_given_tool_stays_text_as_written(body):
    text = f"before {PRESET.start}{body}{PRESET.end} after"
    assert split_tool_calls(text, PRESET, NAMES) == (text, [])


def test_a_call_cut_before_its_end_marker_counts_only_if_its_json_is_whole():
    content, calls = split_tool_calls(f"ok {HERMES.start}{{\"name\": \"ls\", \"arguments\": {{}}}}", HERMES, NAMES)
    assert content == "ok" and [c.name for c in calls] == ["ls"]
    cut = f"ok {HERMES.start}{{\"name\": \"ls\", \"argu"
    assert split_tool_calls(cut, HERMES, NAMES) == (cut, [])


def test_text_without_calls_is_given_out_unchanged_whitespace_and_look_alike_markers_included():
    text = "a <tool b <|tool_call c\n  "
    assert split_tool_calls(text, PRESET, NAMES) == (text, []) == split_tool_calls(text, HERMES, NAMES)


def test_a_stream_holds_back_what_may_begin_a_call_and_gives_out_the_rest_at_once():
    parser = ToolCallParser(HERMES, NAMES)
    assert parser.add("Sure, <tool") == ("Sure,", [])  # a marker's start, and the space before it
    assert parser.add("_call>{\"name\": \"ls\", ") == ("", [])  # inside a call: nothing yet
    content, calls = parser.add("\"arguments\": {}}</tool_call> done ")  # (a call may follow the space)
    assert content == "done" and [c.name for c in calls] == ["ls"]
    assert parser.add("<tool_call>{oops}", final=True) == (" <tool_call>{oops}", [])


@pytest.mark.parametrize("fmt", [PRESET, HERMES])
def test_streamed_in_any_pieces_the_content_and_calls_are_the_whole_answers(fmt):
    rng = random.Random(7)
    texts = ["Looking.\n" + call("ls", {"path": "ü/日本"}, fmt) + " " + call("cat", {"f": 1}, fmt) + "\n\n",
             "x " + call("rm", {}, fmt) + " y " + call("ls", {}, fmt) + " z  ",
             "no calls at all, but < and <| and <tool  ", call("ls", {}, fmt)[:-3], call("ls", {"a": [1, 2]}, fmt)]
    for text in texts:
        whole = split_tool_calls(text, fmt, NAMES)
        for _ in range(300):
            cuts = sorted(rng.sample(range(1, len(text)), rng.randrange(min(12, len(text) - 1))))
            content, calls = streamed(text, fmt, cuts)
            assert content == whole[0] and same_calls(calls, whole[1]), (text, cuts)


# -- the templates --

def test_the_preset_template_renders_tools_and_each_call_so_that_different_calls_differ():
    t = ChatTemplate(None)
    ls = t.render([USER, assistant_calling(("ls", {"path": "."}))], [LS, CAT])
    cat = t.render([USER, assistant_calling(("cat", {"path": "."}))], [LS, CAT])
    ls_src = t.render([USER, assistant_calling(("ls", {"path": "src"}))], [LS, CAT])
    assert len({ls, cat, ls_src}) == 3
    assert json.dumps(LS) in ls and json.dumps(CAT) in ls
    assert t.render([USER], [LS]) != t.render([USER], [CAT]) != t.render([USER])


def test_an_answers_call_sent_back_renders_as_the_model_wrote_it_so_the_next_turn_extends_the_last():
    """The cache depends on it: turn 2's prompt starts with turn 1's prompt and answer."""
    t = ChatTemplate(None)
    first = t.render([USER], [LS])
    answer = call("ls", {"path": "."})
    content, calls = split_tool_calls(answer, t.tool_format, NAMES)
    sent_back = {"role": "assistant", "content": content or None, "tool_calls": [c.openai() for c in calls]}
    second = t.render([USER, sent_back, {"role": "tool", "tool_call_id": calls[0].id, "content": "a.py"}], [LS])
    assert second.startswith(first + answer)


QWEN_LIKE = (  # the tool parts of Qwen2.5's template, shortened
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}"
    "\n</tools><|im_end|>\n{%- endif %}"
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}"
    "{%- for tool_call in message.tool_calls or [] %}{%- set tool_call = tool_call.function %}"
    "\n<tool_call>\n{\"name\": \"{{ tool_call.name }}\", \"arguments\": {{ tool_call.arguments | tojson }}}"
    "\n</tool_call>{%- endfor %}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")


def test_a_qwen_style_template_gets_arguments_as_an_object_tojson_unescaped_and_the_hermes_parser():
    t = ChatTemplate(QWEN_LIKE)
    prompt = t.render([USER, assistant_calling(("ls", {"path": "<src> & 'lib'"}))], [LS])
    assert '{"name": "ls", "arguments": {"path": "<src> & \'lib\'"}}' in prompt  # not "{\"path\"...}" text
    assert '"description": "list files"' in prompt and t.tool_format == HERMES


def test_tool_choice_none_renders_no_tools_and_parses_no_calls(tmp_path):
    coord = coordinator(tmp_path)
    limits = Api(coord).limits

    def parse(**body) -> ChatRequest:
        return parse_chat({"messages": [USER], "max_tokens": 2, **body}, limits, coord.tokenizer, coord.chat)

    auto, none, bare = parse(tools=[LS]), parse(tools=[LS], tool_choice="none"), parse()
    assert auto.tool_format == PRESET and auto.tool_names == {"ls"}
    assert none.tool_format is None and none.completion.prompts == bare.completion.prompts
    assert len(auto.completion.prompts[0]) > len(none.completion.prompts[0])


# -- the bodies and chunks --

SERVED = Served("tiny-gqa", BT, 1024)


def test_a_chat_body_with_calls_has_tool_calls_null_content_and_finish_reason_tool_calls():
    req = RequestState("chatcmpl-1", [1, 2], {"max_tokens": 8}, "dualpath", output=[3, 4])
    calls = [ToolCall("ls", '{"path": "."}', "call_a")]
    message = chat_body(req, "", "stop", calls, SERVED)["choices"][0]
    assert message["finish_reason"] == "tool_calls" and message["message"]["content"] is None
    assert message["message"]["tool_calls"] == [{"id": "call_a", "type": "function",
                                                 "function": {"name": "ls", "arguments": '{"path": "."}'}}]
    plain = chat_body(req, "hi", "length", [], SERVED)["choices"][0]
    assert plain["finish_reason"] == "length" and plain["message"] == {"role": "assistant", "content": "hi"}


def test_stream_deltas_carry_each_call_with_its_index_among_the_answers_calls():
    chunks = StreamChunks("chatcmpl-1", "tiny-gqa", chat=True, include_usage=False)
    first = chunks.piece("Looking.", [1], None)
    one = chunks.piece("", [2], None, [ToolCall("ls", "{}", "call_a")])
    two = chunks.piece(None, [], "tool_calls", [ToolCall("cat", "{}", "call_b")])
    assert first["delta"] == {"content": "Looking.", "role": "assistant"}
    assert one["delta"] == {"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                            "function": {"name": "ls", "arguments": "{}"}}]}
    assert [c["index"] for c in two["delta"]["tool_calls"]] == [1] and two["finish_reason"] == "tool_calls"


# -- through an in-process coordinator and the official client --

@pytest.fixture
async def api(tmp_path):
    coord = coordinator(tmp_path)
    async with TestClient(TestServer(coord.app())) as client:
        client.coord = coord
        client.openai = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0)
        yield client


# as the presets' template renders an answer with calls: its text, then each call
ANSWER = "I will look." + call("ls", {"path": "src"}) + call("cat", {"file": "a.py"})


async def test_the_official_client_reads_tool_calls_streamed_and_not(api):
    answer_with(api.coord, list(ANSWER.encode()))
    kw = {"model": "tiny-gqa", "messages": [USER], "tools": [LS, CAT], "max_tokens": len(ANSWER.encode()) + 5}
    plain = (await api.openai.chat.completions.create(**kw)).choices[0]
    assert plain.finish_reason == "tool_calls" and plain.message.content == "I will look."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in plain.message.tool_calls] == [
        ("ls", {"path": "src"}), ("cat", {"file": "a.py"})]
    content, calls, finish = "", {}, None
    async for chunk in await api.openai.chat.completions.create(**kw, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for c in delta.tool_calls or []:
            calls[c.index] = (c.function.name, c.function.arguments)
        finish = chunk.choices[0].finish_reason or finish
    assert content == plain.message.content and finish == "tool_calls"
    assert [calls[i] for i in sorted(calls)] == [(c.function.name, c.function.arguments)
                                                 for c in plain.message.tool_calls]


async def test_without_tools_or_with_tool_choice_none_a_call_is_text(api):
    answer_with(api.coord, list(ANSWER.encode()))
    kw = {"model": "tiny-gqa", "messages": [USER], "max_tokens": len(ANSWER.encode())}
    for extra in ({}, {"tools": [LS, CAT], "tool_choice": "none"}):
        reply = (await api.openai.chat.completions.create(**kw, **extra)).choices[0]
        assert reply.message.content == ANSWER and not reply.message.tool_calls and reply.finish_reason == "length"


# -- on a real 1P1D cluster --

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cfg = cluster_config(1, "tiny-gqa", str(tmp_path_factory.mktemp("store")))
    with LocalCluster(cfg, str(tmp_path_factory.mktemp("run"))) as c:
        yield c


@pytest.mark.cluster
def test_a_conversation_with_tools_calls_and_results_is_served_and_its_next_turn_is_cached(cluster):
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "system", "content": "You are a coding agent. " * 8}, USER,
                assistant_calling(("ls", {"path": "."}), ("cat", {"file": "README.md"})),
                {"role": "tool", "tool_call_id": "call_0", "content": "README.md src"},
                {"role": "tool", "tool_call_id": "call_1", "content": "# DualPath"}]
    first = client.chat.completions.create(model="tiny-gqa", messages=messages, tools=[LS, CAT], max_tokens=6)
    choice = first.choices[0]
    assert choice.finish_reason in ("length", "stop", "tool_calls") and first.usage.completion_tokens >= 1
    messages += [{"role": "assistant", "content": choice.message.content or "",
                  "tool_calls": [c.model_dump() for c in choice.message.tool_calls or []] or None},
                 {"role": "user", "content": "and now?"}]
    chunks = list(client.chat.completions.create(model="tiny-gqa", messages=messages, tools=[LS, CAT], max_tokens=4,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens >= 1
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens // BT * BT - BT
