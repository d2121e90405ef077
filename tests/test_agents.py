"""Agent frameworks end to end (issue #32, item 7): `openai-agents` and LangChain's `ChatOpenAI`
against this server, as their users would point them at it (base_url, a dummy key).

As in test_tools.py, the tiny models never write a tool call, so an in-process coordinator is given
its answers instead of asking engines: a call to the tool on the first request, plain text on the
next. Everything else is the frameworks' own: their requests go over HTTP to the server, whose
template renders the tools, whose parser turns the answer back into `tool_calls` (the call exists only
as text in the answer), and the frameworks run the tool and send its result back. A real 1P1D
cluster then serves 3-turn tool conversations through each framework, whose cached tokens grow
every turn.

Nothing may leave the machine: openai-agents' tracing is disabled (by its call and its environment
variable, and a trace processor of the test's own checks that no trace is even started), LangSmith's
variables are unset, and every test runs with name resolution and connects refused for anything but
loopback (any attempt fails the test)."""

import ipaddress
import json
import socket

import openai
import pytest

from tests.test_input_bounds import answer_with
from tests.test_serving import BT
from tests.test_tools import api, call, cluster  # noqa: F401  (fixtures: in-process server, 1P1D tiny-gqa cluster)

FIRST = "Let me check." + call("weather", {"city": "Paris"})  # as the presets' template renders a call
SECOND = "It is sunny in Paris."
SUNNY = "sunny, 21 degrees, in "  # what the tool answers, before the city


def answers_in_turn(coord, *texts: str) -> list[list[int]]:
    """The coordinator answers its n-th request with texts[n] (the last text after that), each given
    by answer_with; returns the list that the requests' prompts are added to as they come."""
    answers = []
    for text in texts:
        answer_with(coord, list(text.encode()))
        answers.append(coord.generate)
    prompts: list[list[int]] = []

    def generate(req):
        prompts.append(list(req.tokens))
        return answers[min(len(prompts), len(answers)) - 1](req)

    coord.generate = generate
    return prompts


def is_loopback(host) -> bool:
    host = host.decode() if isinstance(host, bytes) else str(host)
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture
def loopback_only(monkeypatch):
    """Resolving or connecting to anything but loopback raises (and fails the test at its end)."""
    tried = []
    resolve, connect, connect_ex = socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex

    def guarded_getaddrinfo(host, *args, **kwargs):
        if host is not None and not is_loopback(host):
            tried.append(("getaddrinfo", host))
            raise socket.gaierror(socket.EAI_NONAME, f"test_agents: no network beyond loopback ({host})")
        return resolve(host, *args, **kwargs)

    def check(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not is_loopback(address[0]):
            tried.append(("connect", address))
            raise ConnectionRefusedError(f"test_agents: no network beyond loopback ({address})")

    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", lambda s, a: (check(s, a), connect(s, a))[1])
    monkeypatch.setattr(socket.socket, "connect_ex", lambda s, a: (check(s, a), connect_ex(s, a))[1])
    for name in ("LANGSMITH_TRACING", "LANGSMITH_TRACING_V2", "LANGCHAIN_TRACING", "LANGCHAIN_TRACING_V2",
                 "LANGSMITH_API_KEY", "LANGCHAIN_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    yield tried
    assert tried == [], f"something tried to reach beyond loopback: {tried}"


def test_the_guard_refuses_what_is_not_loopback_and_lets_loopback_through(loopback_only):
    with pytest.raises(OSError):
        socket.getaddrinfo("api.openai.com", 443)
    with pytest.raises(OSError), socket.socket() as s:
        s.connect(("192.0.2.1", 443))  # TEST-NET-1: refused before any packet is sent
    assert [kind for kind, _ in loopback_only] == ["getaddrinfo", "connect"]
    loopback_only.clear()
    assert socket.getaddrinfo("localhost", 80) and socket.getaddrinfo("127.0.0.1", 80)


@pytest.fixture(scope="module")
def agents_package():  # module-scoped, so that a test skipped for want of it skips before the cluster starts
    return pytest.importorskip("agents")  # openai-agents


@pytest.fixture(scope="module")
def langchain_package():
    pytest.importorskip("langchain_core")
    return pytest.importorskip("langchain_openai")


@pytest.fixture
def agents(agents_package, loopback_only, monkeypatch):
    """openai-agents with tracing off; fails the test if a trace is started all the same."""
    agents = agents_package
    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")
    agents.set_tracing_disabled(True)
    started = []

    class Recorder(agents.TracingProcessor):
        def on_trace_start(self, trace): started.append(trace)
        def on_trace_end(self, trace): started.append(trace)
        def on_span_start(self, span): started.append(span)
        def on_span_end(self, span): started.append(span)
        def shutdown(self): pass
        def force_flush(self): pass

    agents.add_trace_processor(Recorder())
    yield agents
    assert started == [], "openai-agents traced a run though tracing is disabled"


@pytest.fixture
def langchain(langchain_package, loopback_only):
    return langchain_package


def make_model(agents, api, kind: str):
    client = openai.AsyncOpenAI(base_url=str(api.make_url("/v1")), api_key="x", max_retries=0)
    if kind == "chat":
        return agents.OpenAIChatCompletionsModel("tiny-gqa", client)
    return agents.OpenAIResponsesModel("tiny-gqa", client)  # the model type openai-agents uses by default


# -- openai-agents --

@pytest.mark.parametrize("streamed", [False, True], ids=["run", "run_streamed"])
@pytest.mark.parametrize("kind", ["responses", "chat"])
async def test_an_openai_agents_agent_calls_its_tool_and_answers_with_its_result(api, agents, kind, streamed):
    prompts = answers_in_turn(api.coord, FIRST, SECOND)
    called = []

    @agents.function_tool
    def weather(city: str) -> str:
        """Today's weather in a city."""
        called.append(city)
        return SUNNY + city

    # include_usage: openai-agents asks for streamed usage by default only of api.openai.com
    agent = agents.Agent(name="forecaster", instructions="Answer with the weather tool.", tools=[weather],
                         model=make_model(agents, api, kind), model_settings=agents.ModelSettings(include_usage=True))
    if streamed:
        result = agents.Runner.run_streamed(agent, "What is the weather in Paris?")
        events = [e async for e in result.stream_events()]
        assert any(e.type == "raw_response_event" for e in events)
    else:
        result = await agents.Runner.run(agent, "What is the weather in Paris?")

    assert called == ["Paris"]  # the call existed only as text in the answer: the server's parser found it
    assert result.final_output == SECOND
    assert [type(i).__name__ for i in result.new_items] == ["MessageOutputItem", "ToolCallItem",
                                                            "ToolCallOutputItem", "MessageOutputItem"]
    assert agents.ItemHelpers.text_message_output(result.new_items[0]) == "Let me check."
    assert result.new_items[2].output == SUNNY + "Paris"
    # both requests went through the server to the coordinator; the second carries the tool's result
    # and begins with the first prompt and answer as the model wrote them (so it would be cached)
    assert len(prompts) == 2 and SUNNY + "Paris" in api.coord.tokenizer.decode(prompts[1])
    assert prompts[1][:len(prompts[0]) + len(FIRST.encode())] == prompts[0] + list(FIRST.encode())
    assert [r.usage.input_tokens for r in result.raw_responses] == [len(p) for p in prompts]
    assert [r.usage.output_tokens for r in result.raw_responses] == [len(FIRST.encode()), len(SECOND.encode())]


# -- LangChain --

@pytest.mark.parametrize("responses", [False, True], ids=["chat", "responses"])
async def test_langchain_chat_openai_with_bound_tools_gets_tool_calls_then_the_answer(api, langchain, responses):
    from langchain_core.messages import AIMessageChunk, HumanMessage
    from langchain_core.tools import tool

    prompts = answers_in_turn(api.coord, FIRST, SECOND)

    @tool
    def weather(city: str) -> str:
        """Today's weather in a city."""
        return SUNNY + city

    def finished(message) -> str:  # chat's finish_reason, or the Responses API's status
        return message.response_metadata.get("finish_reason") or message.response_metadata["status"]

    # no max_tokens: LangChain's default leaves it to the server
    llm = langchain.ChatOpenAI(model="tiny-gqa", base_url=str(api.make_url("/v1")), api_key="x", max_retries=0,
                               use_responses_api=responses)
    bound = llm.bind_tools([weather])
    messages = [HumanMessage("What is the weather in Paris?")]
    first = await bound.ainvoke(messages)
    assert first.text == "Let me check." and finished(first) == ("completed" if responses else "tool_calls")
    assert [(c["name"], c["args"]) for c in first.tool_calls] == [("weather", {"city": "Paris"})]
    assert first.tool_calls[0]["id"].startswith("call_") and not first.invalid_tool_calls
    assert first.usage_metadata["input_tokens"] == len(prompts[0])
    assert first.usage_metadata["output_tokens"] == len(FIRST.encode())

    messages += [first, *(weather.invoke(c) for c in first.tool_calls)]  # ToolMessages, by call id
    second = await bound.ainvoke(messages)
    assert second.text == SECOND and not second.tool_calls
    assert finished(second) == ("completed" if responses else "stop")
    assert SUNNY + "Paris" in api.coord.tokenizer.decode(prompts[1])
    assert prompts[1][:len(prompts[0]) + len(FIRST.encode())] == prompts[0] + list(FIRST.encode())

    # the same first turn streamed: the chunks add up to the same text and call
    answers_in_turn(api.coord, FIRST)
    whole = None
    async for chunk in bound.astream(messages[:1]):
        assert isinstance(chunk, AIMessageChunk)
        whole = chunk if whole is None else whole + chunk
    assert whole.text == first.text and finished(whole) == finished(first)
    assert [(c["name"], c["args"]) for c in whole.tool_calls] == [("weather", {"city": "Paris"})]


# -- on a real 1P1D cluster: three turns whose cached tokens grow --

def listing(i: int) -> str:
    return "".join(f"src/module_{i}_{j}.py  {100 * j + i} bytes\n" for j in range(6))  # ~180 tokens


@pytest.mark.usefixtures("langchain_package")  # (before the cluster: skipped, it does not start)
@pytest.mark.cluster
def test_a_three_turn_langchain_conversation_with_tool_results_has_growing_cached_tokens(langchain, cluster):
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def ls(path: str) -> str:
        """List the files under a path."""
        return ""

    llm = langchain.ChatOpenAI(model="tiny-gqa", base_url=cluster.url + "/v1", api_key="x", max_retries=0,
                               timeout=60, max_tokens=6)
    bound = llm.bind_tools([ls])
    messages = [SystemMessage("You are a coding agent."), HumanMessage("What is in the repository?")]
    prompt_tokens, cached = [], []
    for turn in range(3):
        # the tiny model writes no calls, so each turn's call is the one an agent would make next
        messages += [AIMessage("", tool_calls=[{"name": "ls", "args": {"path": f"dir{turn}"}, "id": f"call_{turn}"}]),
                     ToolMessage(listing(turn), tool_call_id=f"call_{turn}")]
        answer = bound.invoke(messages)
        usage = answer.response_metadata["token_usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == answer.usage_metadata["input_token_details"][
            "cache_read"]
        assert answer.usage_metadata["output_tokens"] >= 1
        prompt_tokens.append(usage["prompt_tokens"])
        cached.append(usage["prompt_tokens_details"]["cached_tokens"])
        messages.append(answer)
    assert prompt_tokens[0] < prompt_tokens[1] < prompt_tokens[2]
    assert cached[0] < cached[1] < cached[2], (prompt_tokens, cached)
    for turn in (1, 2):  # the last turn's prompt, but for the block its answer may have changed
        assert cached[turn] >= prompt_tokens[turn - 1] // BT * BT - BT, (prompt_tokens, cached)


@pytest.mark.usefixtures("agents_package")  # (before the cluster: skipped, it does not start)
@pytest.mark.cluster
def test_a_three_turn_openai_agents_conversation_with_tool_results_has_growing_cached_tokens(agents, cluster):
    @agents.function_tool
    def ls(path: str) -> str:
        """List the files under a path."""
        return ""

    client = openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key="x", max_retries=0, timeout=60)
    # the chat model: the tiny model's answers end at max_tokens, which openai-agents' Responses model
    # takes for a failed run (status "incomplete", as OpenAI answers too)
    agent = agents.Agent(name="coder", instructions="You are a coding agent.", tools=[ls],
                         model=agents.OpenAIChatCompletionsModel("tiny-gqa", client),
                         model_settings=agents.ModelSettings(max_tokens=6))
    items: list = [{"role": "user", "content": "What is in the repository?"}]
    input_tokens, cached = [], []
    for turn in range(3):
        # as a run that called ls would leave its history: the call, then its output
        items += [{"type": "function_call", "call_id": f"call_{turn}", "name": "ls",
                   "arguments": json.dumps({"path": f"dir{turn}"})},
                  {"type": "function_call_output", "call_id": f"call_{turn}", "output": listing(turn)}]
        result = agents.Runner.run_sync(agent, items, max_turns=3)
        usage = result.raw_responses[-1].usage
        assert usage.output_tokens >= 1
        input_tokens.append(usage.input_tokens)
        cached.append(usage.input_tokens_details.cached_tokens)
        items = result.to_input_list()
    assert input_tokens[0] < input_tokens[1] < input_tokens[2]
    assert cached[0] < cached[1] < cached[2], (input_tokens, cached)
    for turn in (1, 2):
        assert cached[turn] >= input_tokens[turn - 1] // BT * BT - BT, (input_tokens, cached)
