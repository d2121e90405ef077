"""The official `openai` Python client against a running cluster: completions and chat, streamed
and not, cached tokens on the next turn, a tool-shaped conversation, and the error cases."""

import openai
import pytest

from tests.test_serving import BT, cluster  # noqa: F401  (the module-scoped 1P2D cluster fixture)

pytestmark = pytest.mark.cluster  # every test talks to a LocalCluster


@pytest.fixture
def client(cluster):  # noqa: F811
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def model(cluster) -> str:  # noqa: F811
    return cluster.cfg.model.preset


def test_completions_streamed_and_not_agree_and_the_next_turn_is_cached(client, cluster):  # noqa: F811
    kw = {"model": model(cluster), "prompt": "def f(x):\n    return x * 2\n" * 8, "max_tokens": 6, "temperature": 0.9,
          "seed": 5}
    plain = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 6
    turn2 = client.completions.create(**{**kw, "prompt": kw["prompt"] + plain.choices[0].text + " more"})
    assert turn2.usage.prompt_tokens_details.cached_tokens >= (plain.usage.prompt_tokens // BT) * BT


def test_a_tool_conversation_through_chat(client, cluster):  # noqa: F811
    tools = [{"type": "function", "function": {"name": "ls", "description": "list files",
                                               "parameters": {"type": "object", "properties": {}}}}]
    messages = [{"role": "system", "content": "You are a coding agent."}, {"role": "user", "content": "ls please"}]
    first = client.chat.completions.create(model=model(cluster), messages=messages, tools=tools, max_tokens=5)
    assert first.choices[0].message.role == "assistant" and first.choices[0].finish_reason == "length"
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "tool", "tool_call_id": "call_1", "content": "a.py b.py"}]
    stream = client.chat.completions.create(model=model(cluster), messages=messages, tools=tools, max_tokens=5,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert sum(len(c.choices[0].delta.content or "") > 0 for c in chunks if c.choices) >= 1
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


@pytest.mark.parametrize("kw,error,status", [
    ({"model": "gpt-17"}, openai.NotFoundError, 404),
    ({"n": 2}, openai.BadRequestError, 400),
    ({"max_tokens": 0}, openai.BadRequestError, 400),
])
def test_errors_reach_the_client_as_openai_errors(client, cluster, kw, error, status):  # noqa: F811
    with pytest.raises(error) as e:
        client.completions.create(**{"model": model(cluster), "prompt": "x", "max_tokens": 2, **kw})
    assert e.value.status_code == status and e.value.body["message"]
