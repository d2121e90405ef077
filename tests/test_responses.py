"""/v1/responses (issue #32, item 4) with the official `openai` client: text and tool calls as
output items, streamed as typed events that add up to the non-streamed response,
`previous_response_id` continuing a conversation, and what is not supported refused by name.

As in test_tools.py, answers that hold tool calls are given to an in-process coordinator in place of
its engines; a real 1P1D cluster then serves a two-turn conversation whose second turn is cached."""

import json

import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.test_input_bounds import answer_with, coordinator
from tests.test_serving import BT
from tests.test_tools import ANSWER, cluster  # noqa: F401  (cluster: a 1P1D fixture)

TOOLS = [{"type": "function", "name": "ls", "description": "list files", "parameters": {"type": "object"}},
         {"type": "function", "name": "cat", "parameters": {"type": "object"}}]
ENOUGH = len(ANSWER.encode()) + 5  # max_output_tokens that let the whole answer out


@pytest.fixture
async def api(tmp_path):
    coord = coordinator(tmp_path)
    prompts = []
    async with TestClient(TestServer(coord.app())) as client:
        answer_with(coord, list(ANSWER.encode()))
        generate = coord.generate

        def keep_prompt(req):
            prompts.append(req.tokens)
            return generate(req)

        coord.generate = keep_prompt
        client.prompts = prompts
        client.openai = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0)
        yield client


def calls_of(response) -> list[tuple[str, dict]]:
    return [(o.name, json.loads(o.arguments)) for o in response.output if o.type == "function_call"]


async def test_an_answer_with_tool_calls_is_a_message_then_one_function_call_item_each(api):
    r = await api.openai.responses.create(model="tiny-gqa", input="What is here?", instructions="Be brief.",
                                          tools=TOOLS, max_output_tokens=ENOUGH)
    assert r.status == "completed" and r.output_text == "I will look."
    assert [o.type for o in r.output] == ["message", "function_call", "function_call"]
    assert calls_of(r) == [("ls", {"path": "src"}), ("cat", {"file": "a.py"})]
    assert r.usage.output_tokens == len(ANSWER.encode()) and r.usage.input_tokens == len(api.prompts[0])


async def test_the_streamed_events_add_up_to_the_response(api):
    kw = {"model": "tiny-gqa", "input": "What is here?", "tools": TOOLS, "max_output_tokens": ENOUGH}
    plain = await api.openai.responses.create(**kw)
    events = [e async for e in await api.openai.responses.create(**kw, stream=True)]
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(1, len(events) + 1))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    arguments = [e.arguments for e in events if e.type == "response.function_call_arguments.done"]
    done = events[-1].response
    assert text == done.output_text == plain.output_text
    assert arguments == [o.arguments for o in plain.output if o.type == "function_call"]
    assert calls_of(done) == calls_of(plain)


async def test_previous_response_id_continues_the_conversation_so_the_prompt_extends_the_last(api):
    first = await api.openai.responses.create(model="tiny-gqa", input="What is here?", tools=TOOLS,
                                              max_output_tokens=ENOUGH)
    results = [{"type": "function_call_output", "call_id": o.call_id, "output": "a.py b.py"}
               for o in first.output if o.type == "function_call"]
    second = await api.openai.responses.create(model="tiny-gqa", input=results, previous_response_id=first.id,
                                               tools=TOOLS, max_output_tokens=4)
    assert second.status == "incomplete" and second.incomplete_details.reason == "max_output_tokens"
    # the answer is sent back as the template renders a call, which is how the model wrote it
    assert api.prompts[1][:len(api.prompts[0]) + len(ANSWER.encode())] == api.prompts[0] + list(ANSWER.encode())
    with pytest.raises(openai.NotFoundError):
        await api.openai.responses.create(model="tiny-gqa", input="x", previous_response_id="resp_unknown")


@pytest.mark.parametrize("kw,param", [
    ({"background": True}, "background"), ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"truncation": "auto"}, "truncation"), ({"text": {"format": {"type": "json_object"}}}, "text"),
    ({"input": [{"type": "image_generation_call"}]}, "input"), ({"input": []}, "input"),
    ({"tools": [{"type": "web_search"}]}, "tools"), ({"tool_choice": "required", "tools": TOOLS}, "tool_choice"),
    ({"temperature": 3}, "temperature"),
])
async def test_what_cannot_be_honoured_is_refused_by_name(api, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        await api.openai.responses.create(**{"model": "tiny-gqa", "input": "x", "max_output_tokens": 2, **kw})
    assert e.value.status_code == 400 and e.value.body["param"] == param


@pytest.mark.cluster
def test_a_two_turn_conversation_on_a_cluster_is_served_and_its_second_turn_is_cached(cluster):
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    first = client.responses.create(model="tiny-gqa", input="Summarise the repository. " * 12, tools=TOOLS,
                                    instructions="You are a coding agent.", max_output_tokens=6)
    assert first.status in ("completed", "incomplete") and first.usage.output_tokens >= 1
    events = list(client.responses.create(model="tiny-gqa", input="And the tests?", previous_response_id=first.id,
                                          tools=TOOLS, instructions="You are a coding agent.", max_output_tokens=4,
                                          stream=True))
    second = events[-1].response
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens // BT * BT - BT
