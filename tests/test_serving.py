"""The serving system end to end: real coordinator and engine processes on loopback, real files.

For each model kind and each policy, multi-turn conversations return exactly the greedy tokens of
forward_reference over the full sequence; from turn 2 on every full block of the earlier context
is a hit; and each path was really taken (engine metrics, not assumed)."""

import asyncio
import json
import random
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import aiohttp
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from dualpath.bench.driver import run as bench_run
from dualpath.bench.report import summarize
from dualpath.bench.workload import AgenticSpec, agentic, read_jsonl
from dualpath.config import POLICIES, local_cluster
from dualpath.engine.weights import load_pretrained
from dualpath.launcher import LocalCluster, complete
from dualpath.storage.blockfile import HEADER_BYTES, BlockShape
from dualpath.storage.keys import block_chain
from dualpath.storage.store import FileStore

pytestmark = pytest.mark.cluster  # every test serves on a LocalCluster

BT = 16


def _free_port_block(n: int = 12) -> int:
    """A base port such that base..base+n and the engines' data ports (+1000) are all free. Drawn
    below Linux's ephemeral range, so that outgoing connections cannot take them meanwhile."""
    rng = random.Random()
    while True:
        base = rng.randrange(20000, 30000)
        try:
            for port in [*range(base, base + n), *range(base + 1000, base + 1000 + n)]:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue


def cluster_config(n_decode: int, preset: str, store_root: str, snic_read_gbps: float = 0.0):
    """1P<n_decode>D on free loopback ports, small pools, BT-token blocks."""
    port = _free_port_block()
    cfg = local_cluster(1, n_decode, base_port=port + 2)
    cfg.model.preset = preset
    cfg.store.root, cfg.store.block_tokens, cfg.store.snic_read_gbps = store_root, BT, snic_read_gbps
    cfg.scheduler.http_port, cfg.scheduler.control_port = port, port + 1
    cfg.engine.hbm_blocks, cfg.engine.buffer_blocks, cfg.engine.max_context = 512, 256, 2048
    return cfg


@pytest.fixture(scope="module", params=["tiny-gqa", "tiny-mla"])
def cluster(request, tmp_path_factory):
    cfg = cluster_config(2, request.param, str(tmp_path_factory.mktemp("store")))
    with LocalCluster(cfg, str(tmp_path_factory.mktemp("run"))) as c:
        c.model = load_pretrained(request.param)
        yield c


def cluster_metrics(c) -> dict:
    with urllib.request.urlopen(c.url + "/v1/cluster") as r:
        return json.load(r)


def greedy_reference(model, tokens: list[int], n: int) -> list[int]:
    seq = list(tokens)
    for _ in range(n):
        seq.append(int(model.forward_reference(torch.tensor(seq))[-1].argmax()))
    return seq[len(tokens):]


def settled_metrics(c, timeout: float = 60) -> dict:
    """The cluster's metrics once every engine is idle and has reported it: nothing queued or
    running, and two heartbeats agree (so counters of finished work are in)."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        m = cluster_metrics(c)
        idle = all(not e.get("running_decode_tokens") and not e.get("queued_prefill_tokens")
                   and not e["read_queue_bytes"] for e in m["engines"].values())
        if idle and m == last:
            return m
        last = m
        time.sleep(c.cfg.scheduler.heartbeat_s * 1.5)
    pytest.fail(f"the cluster did not settle within {timeout}s: {last}")


def engine_counter(m: dict, key: str) -> int:
    return sum(e.get("metrics", {}).get(key, 0) for e in m["engines"].values())


@pytest.mark.parametrize("policy", ["pe-read", "de-read", "dualpath", "dualpath-split"])
def test_multi_turn_conversation_matches_reference_and_hits_every_full_block(cluster, policy):
    gen = torch.Generator().manual_seed(POLICIES.index(policy))
    tokens = torch.randint(0, 256, (53,), generator=gen).tolist()
    before = settled_metrics(cluster)
    paths = []
    for turn in range(3):
        r = complete(cluster.url, {"prompt": tokens, "max_tokens": 9, "temperature": 0, "dualpath_policy": policy})
        out = r["choices"][0]["token_ids"]
        assert out == greedy_reference(cluster.model, tokens, 9), f"turn {turn + 1} diverged"
        cached = r["usage"]["prompt_tokens_details"]["cached_tokens"]
        if turn:
            assert cached == (len(prev_context) - 1) // BT * BT  # every full block with computed KV
        paths.append(r["dualpath"]["path"])
        prev_context = tokens + out
        tokens = prev_context + torch.randint(0, 256, (21,), generator=gen).tolist()
    after = settled_metrics(cluster)
    delta_a = engine_counter(after, "path_a_requests") - engine_counter(before, "path_a_requests")
    delta_b = engine_counter(after, "path_b_requests") - engine_counter(before, "path_b_requests")
    if policy == "pe-read":
        assert paths[1:] == ["A", "A"] and delta_a == 2 and delta_b == 0
    elif policy == "de-read":
        assert paths[1:] == ["B", "B"] and delta_b == 2 and delta_a == 0
        links = {k: v for e in after["engines"].values() for k, v in e["links"].items()}
        # each engine reports its peer links' backend: engines of one host copy into each other's buffers
        assert links and set(links.values()) == {"shm"}
        assert engine_counter(after, "path_b_sent_blocks") > engine_counter(before, "path_b_sent_blocks")
    elif policy == "dualpath-split":  # an idle cluster: both queues empty, so each side reads half
        assert paths[1:] == ["A+B", "A+B"] and delta_a == 2 and delta_b == 2
    else:
        assert delta_a + delta_b == 2


@pytest.mark.parametrize("policy", ["pe-read", "de-read"])
def test_a_corrupt_stored_block_is_a_miss_and_the_turn_still_gives_the_reference_tokens(cluster, policy):
    gen = torch.Generator().manual_seed(7 + len(policy))
    tokens = torch.randint(0, 256, (120,), generator=gen).tolist()
    r = complete(cluster.url, {"prompt": tokens, "max_tokens": 4, "temperature": 0})
    context = tokens + r["choices"][0]["token_ids"]
    keys = block_chain(context, cluster.model.fingerprint, BT)
    store = FileStore(cluster.cfg.store.root, BlockShape(1, 1, "float32", b""), 1 << 40, scan=False)
    with open(store.path(keys[3]), "r+b") as f:  # flip bytes inside block 3's KV (its header stays valid)
        f.seek(HEADER_BYTES + 100)
        f.write(bytes(b ^ 0xFF for b in f.read(8)))
    turn2 = context + torch.randint(0, 256, (10,), generator=gen).tolist()
    r = complete(cluster.url, {"prompt": turn2, "max_tokens": 6, "temperature": 0, "dualpath_policy": policy})
    assert r["choices"][0]["token_ids"] == greedy_reference(cluster.model, turn2, 6)
    # The reader found the bad block and removed it; the retried turn recomputed from block 3 on
    # and persisted it again, so the next turn hits every full block.
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 3 * BT
    turn3 = turn2 + r["choices"][0]["token_ids"] + [5, 6, 7]
    r = complete(cluster.url, {"prompt": turn3, "max_tokens": 4, "temperature": 0, "dualpath_policy": policy})
    assert r["choices"][0]["token_ids"] == greedy_reference(cluster.model, turn3, 4)
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == (len(turn3) - 4) // BT * BT
    assert_decode_engines_idle(cluster)  # the failed attempt's decode slot and buffer were given back


def test_sampling_with_a_seed_is_reproducible(cluster):
    body = {"prompt": "hello agent", "max_tokens": 6, "temperature": 0.8, "seed": 42}
    a, b = complete(cluster.url, body), complete(cluster.url, body)
    assert a["choices"][0]["token_ids"] == b["choices"][0]["token_ids"]


def post_raw(url: str, data: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/v1/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=330) as r:  # a bound on a hang: a request may wait for room
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


@pytest.mark.parametrize("body,needle", [
    (b"{not json", "not valid JSON"),
    (b'["a list"]', "JSON object"),
    (b'{"prompt": 5}', "'prompt' must be"),
    (b'{"prompt": ""}', "empty"),
    (b'{"prompt": [1, 2, 99999]}', "outside the vocabulary"),
    (b'{"prompt": "hi", "max_tokens": "ten"}', "'max_tokens'"),
    (b'{"prompt": "hi", "max_tokens": 5000}', "exceeds the context limit"),
    (b'{"prompt": "hi", "temperature": -1}', "'temperature'"),
    (b'{"prompt": "hi", "dualpath_policy": "fastest"}', "unknown 'dualpath_policy'"),
])
def test_bad_input_gets_a_4xx_naming_the_problem_and_the_cluster_keeps_serving(cluster, body, needle):
    status, reply = post_raw(cluster.url, body)
    assert 400 <= status < 500 and needle in reply["error"]["message"]
    assert complete(cluster.url, {"prompt": "still here", "max_tokens": 2})["usage"]["completion_tokens"] == 2


def stream_events(c, body: dict) -> list[dict]:
    async def run():
        async with aiohttp.ClientSession() as s:
            async with s.post(c.url + "/v1/completions", json={**body, "stream": True}) as r:
                return [json.loads(line[6:]) async for line in _sse_lines(r)]

    return asyncio.run(run())


def test_streaming_sends_each_token_once_then_the_finish_reason_then_the_usage(cluster):
    """As OpenAI streams: text deltas that join to the non-streamed text (same seed), a last chunk
    with the finish reason and no content, and with include_usage a usage chunk without choices."""
    body = {"prompt": "stream me", "max_tokens": 5, "temperature": 0.8, "seed": 7}
    events = stream_events(cluster, {**body, "stream_options": {"include_usage": True}})
    *deltas, finish, usage = events
    assert [e["choices"][0]["finish_reason"] for e in deltas] == [None] * 5 and all(e["usage"] is None for e in deltas)
    assert finish["choices"][0] | {"index": 0} == {"index": 0, "text": "", "token_ids": [], "logprobs": None,
                                                    "finish_reason": "length"} and finish["dualpath"]["path"]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    plain = complete(cluster.url, body)["choices"][0]
    assert "".join(e["choices"][0]["text"] for e in deltas) == plain["text"]
    assert [t for e in deltas for t in e["choices"][0]["token_ids"]] == plain["token_ids"]
    assert "usage" not in stream_events(cluster, body)[0]  # not asked for: no usage field at all


def test_finish_reason_max_completion_tokens_and_several_prompts(cluster):
    r = complete(cluster.url, {"prompt": list(range(20)), "max_completion_tokens": 4, "temperature": 0})
    assert r["choices"][0]["finish_reason"] == "length" and len(r["choices"][0]["token_ids"]) == 4
    text = r["choices"][0]["text"]
    if text:  # a stop string that the answer contains ends it there, with finish_reason "stop"
        stopped = complete(cluster.url, {"prompt": list(range(20)), "max_tokens": 4, "stop": [text[-1]]})
        assert stopped["choices"][0]["finish_reason"] == "stop" and text[-1] not in stopped["choices"][0]["text"]
    both = complete(cluster.url, {"prompt": [list(range(20)), "hello"], "max_tokens": 4, "temperature": 0})
    assert [c["index"] for c in both["choices"]] == [0, 1]
    assert both["choices"][0]["token_ids"] == r["choices"][0]["token_ids"]
    assert both["usage"]["completion_tokens"] == 8


@pytest.mark.parametrize("body,status,param,code", [
    ({"prompt": "x", "model": "gpt-17"}, 404, "model", "model_not_found"),
    ({"prompt": "x", "n": 2}, 400, "n", 400),
    ({"prompt": "x", "logprobs": 3}, 400, "logprobs", 400),
    ({"prompt": ["a", "b"], "stream": True}, 400, "prompt", 400),
])
def test_unsupported_or_unknown_requests_get_openai_shaped_errors(cluster, body, status, param, code):
    got, reply = post_raw(cluster.url, json.dumps(body).encode())
    assert got == status and reply["error"]["param"] == param and reply["error"]["code"] == code
    assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["message"]


async def _sse_lines(resp):
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("data: ") and line != "data: [DONE]":
            yield line


def test_client_disconnect_mid_stream_frees_slot_and_buffers(cluster):
    async def run():
        async with aiohttp.ClientSession() as s:
            async with s.post(cluster.url + "/v1/completions",
                              json={"prompt": "x" * 300, "max_tokens": 1500, "stream": True}) as r:
                n = 0
                async for _ in _sse_lines(r):
                    n += 1
                    if n == 3:
                        break  # hang up mid-stream

    asyncio.run(run())
    assert_decode_engines_idle(cluster)


def assert_decode_engines_idle(c, timeout: float = 60) -> None:
    """Every decode slot and DRAM buffer block is free again (the timeout bounds a hang: on an idle
    host it takes a few heartbeats)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = cluster_metrics(c)
        de = [e for e in m["engines"].values() if e["role"] == "decode"]
        if all(e["running_decode_tokens"] == 0 and e["free_buffer_blocks"] == c.cfg.engine.buffer_blocks for e in de):
            return
        time.sleep(0.2)
    pytest.fail(f"decode engines still hold a request: {m}")


def test_bench_driver_offline_agents_hit_their_history_and_are_timed(cluster):
    sessions = agentic(AgenticSpec(agents=3, turns=3, first_prompt=(300, 400), tool_output=(5, 20), answer=(3, 6),
                                   min_hit_ratio=0.8, block_tokens=BT, seed=7))
    r = asyncio.run(bench_run(cluster.url, sessions, "dualpath", warmup_turns=1, progress=False, salt=1))
    assert len(r.records) == 3 * 2 and all(rec.error is None for rec in r.records)
    for rec in r.records:
        assert rec.cached_tokens >= rec.prompt_tokens - 20 - 6 - BT  # everything but the new tool output
        assert 0 <= rec.t_send < rec.t_first <= rec.t_done <= r.duration
        assert rec.output_tokens == sessions[rec.session].turns[rec.turn].output_tokens
        assert rec.path in ("A", "B") and rec.read_bytes_pe + rec.read_bytes_de > 0
    s = summarize(r)
    assert s["failed"] == 0 and s["hit_ratio"] > 0.8 and len(r.samples) >= 1
    assert sum(v["read_bytes"] for v in s["nodes"].values()) > 0


def test_a_failed_warm_up_turn_says_why(cluster):
    """A benchmark whose warm-up fails names the first failure (it used to say only 'failed')."""
    sessions = agentic(AgenticSpec(agents=2, turns=2, first_prompt=(3000, 3000), tool_output=(5, 20), answer=(3, 6),
                                   block_tokens=BT, seed=7))  # 3000 tokens: over the cluster's context limit
    with pytest.raises(RuntimeError, match=r"2 warm-up turns failed, the first: session \d turn 0: .*context limit"):
        asyncio.run(bench_run(cluster.url, sessions, "dualpath", warmup_turns=1, progress=False, salt=2))


def test_bench_driver_in_chat_mode_sends_messages_and_each_turn_hits_the_last(cluster):
    """--api chat: the history goes as messages through the chat template; turn k+1's cached tokens
    cover the last turn's prompt and answer but for the partial block and the new messages."""
    sessions = agentic(AgenticSpec(agents=2, turns=3, first_prompt=(300, 400), tool_output=(5, 20), answer=(3, 6),
                                   min_hit_ratio=0.8, block_tokens=BT, seed=8))
    r = asyncio.run(bench_run(cluster.url, sessions, "dualpath", warmup_turns=1, progress=False, salt=2, api="chat"))
    assert len(r.records) == 2 * 2 and all(rec.error is None for rec in r.records)
    for rec in r.records:
        # new: the tool output (<= 20 characters) and two messages' worth of template markup
        assert rec.prompt_tokens > 300 and rec.cached_tokens >= rec.prompt_tokens - 20 - 6 - 64 - BT, rec
        assert rec.output_tokens == sessions[rec.session].turns[rec.turn].output_tokens
    with pytest.raises(ValueError, match="api must be"):
        asyncio.run(bench_run(cluster.url, sessions, "dualpath", progress=False, api="grpc"))


def test_bench_driver_online_sends_at_arrival_times_and_replays_a_trace(cluster, tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"timestamp": t, "input_length": n, "output_length": 3, "hash_ids": ids}) + "\n"
                             for t, n, ids in [(0, 1300, [0, 1, 2]), (300, 1450, [0, 1, 3]), (600, 700, [4, 5])]))
    sessions = read_jsonl(trace, block_tokens=16)
    r = asyncio.run(bench_run(cluster.url, sessions, "pe-read", "online", trace_block_tokens=16, progress=False))
    assert [rec.error for rec in r.records] == [None] * 3
    by_session = {rec.session: rec for rec in r.records}
    assert by_session[1].t_send >= 0.3 and by_session[2].t_send >= 0.6
    assert by_session[1].cached_tokens == 32  # hash ids 0 and 1 are shared with request 0: two 16-token blocks


def test_engines_stop_promptly_on_sigterm_while_a_prefill_loads_from_slow_storage(tmp_path):
    """Promptly: each process exits on SIGTERM by itself, while the load is still minutes from done,
    instead of being killed at the end of the grace period (a compute thread that waits for KV, or
    an engine that waits for its reads, was). No timing threshold: the load outlasts the grace."""
    # an emulated 2 KB/s storage NIC: the next turn's 64 blocks (~0.5 MB) load for minutes, far
    # longer than the 60 s grace below
    cfg = cluster_config(1, "tiny-gqa", str(tmp_path / "store"), snic_read_gbps=0.000002)
    c = LocalCluster(cfg, str(tmp_path / "run")).start()
    try:
        prompt = [random.randrange(256) for _ in range(1024)]
        context = prompt + complete(c.url, {"prompt": prompt, "max_tokens": 1})["choices"][0]["token_ids"]
        turn2 = threading.Thread(target=lambda: _ignore_errors(complete, c.url, {"prompt": context + [1, 2, 3],
                                                                                  "max_tokens": 1,
                                                                                  "dualpath_policy": "pe-read"}),
                                 daemon=True)
        turn2.start()
        assert loading_engines(c, "prefill") == ["pe0"]
        backlog = cluster_metrics(c)["engines"]["pe0"]["read_queue_bytes"]
        assert backlog > 60 * cfg.store.snic_read_gbps * 1e9, backlog  # more than the grace can drain
    finally:
        c.stop(grace=60)  # SIGTERM, then SIGKILL (returncode -9) whatever is left after 60 s
    assert all(p.returncode in (0, -signal.SIGTERM) for p in c.procs.values()), {
        n: p.returncode for n, p in c.procs.items()}


def loading_engines(c, role: str, timeout: float = 30) -> list[str]:
    """The engines of a role with storage reads queued, once there are any."""
    deadline = time.monotonic() + timeout
    while True:
        loading = [n for n, e in cluster_metrics(c)["engines"].items() if e["role"] == role and e["read_queue_bytes"]]
        if loading:
            return loading
        assert time.monotonic() < deadline, f"no {role} engine started loading"
        time.sleep(0.05)


def _ignore_errors(fn, *args):
    try:
        fn(*args)
    except Exception:
        pass  # the cluster is being stopped under it


def test_a_decode_engine_that_dies_while_loading_path_b_costs_a_retry_not_the_request(tmp_path):
    # an emulated 200 KB/s storage NIC: path B loads for seconds
    cfg = cluster_config(2, "tiny-gqa", str(tmp_path / "store"), snic_read_gbps=0.0002)
    with LocalCluster(cfg, str(tmp_path / "run")) as c:
        model = load_pretrained("tiny-gqa")
        prompt = [random.randrange(256) for _ in range(1024)]
        context = prompt + complete(c.url, {"prompt": prompt, "max_tokens": 1})["choices"][0]["token_ids"]
        turn2 = context + [1, 2, 3]
        result = {}
        t = threading.Thread(target=lambda: result.update(complete(c.url, {
            "prompt": turn2, "max_tokens": 5, "temperature": 0, "dualpath_policy": "de-read"})))
        t.start()
        loading = loading_engines(c, "decode")  # the DE reading the hit blocks: kill it mid-load
        c.procs[loading[0]].kill()
        t.join(120)
        assert result["choices"][0]["token_ids"] == greedy_reference(model, turn2, 5)
        assert result["dualpath"]["de"] != loading[0]
        assert cluster_metrics(c)["stats"]["retried"] >= 1


def scrape(c) -> dict[tuple, float]:
    """/metrics as {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(c.url + "/metrics") as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(m: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in m.items() if n == name and set(labels.items()) <= set(ls))


def test_prometheus_metrics_agree_with_the_responses(cluster):
    """Requests by path, cached vs computed prompt tokens, generated tokens and TTFT observations
    move exactly as the responses say; engine gauges match /v1/cluster."""
    before = scrape(cluster)
    gen = torch.Generator().manual_seed(11)
    tokens, replies = torch.randint(0, 256, (70,), generator=gen).tolist(), []
    for policy in ("pe-read", "de-read", "de-read"):
        r = complete(cluster.url, {"prompt": tokens, "max_tokens": 4, "temperature": 0, "dualpath_policy": policy})
        replies.append(r)
        tokens = tokens + r["choices"][0]["token_ids"] + [1, 2, 3]
    m = settled_metrics(cluster)
    after = scrape(cluster)

    def delta(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    for path in ("A", "B"):
        assert delta("dualpath_requests_total", path=path) == sum(r["dualpath"]["path"] == path for r in replies)
    cached = sum(r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in replies)
    assert cached > 0 and delta("dualpath_prompt_tokens_total", kind="cached") == cached
    assert delta("dualpath_prompt_tokens_total", kind="computed") == sum(r["usage"]["prompt_tokens"]
                                                                          for r in replies) - cached
    assert delta("dualpath_generation_tokens_total") == 12
    assert delta("dualpath_time_to_first_token_seconds_count") == 3
    for name, e in m["engines"].items():
        assert total(after, "dualpath_storage_read_bytes_total", engine=name) == e["storage_read_bytes"]
        assert total(after, "dualpath_memory_blocks", engine=name, memory="buffer", state="free") == e[
            "free_buffer_blocks"]
        assert total(after, "dualpath_transport_info", engine=name, backend=e["transport"]) == 1
        for peer, used in e["links"].items():
            assert total(after, "dualpath_transport_link_info", engine=name, peer=peer, backend=used) == 1
    assert total(after, "dualpath_network_sent_bytes_total", traffic_class="bulk") > 0  # path B went over it
    assert any(e["links"] for e in m["engines"].values())  # so the per-link gauge above was checked


def chat(c, body: dict) -> dict:
    req = urllib.request.Request(c.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


def test_an_agent_chat_with_tool_results_hits_every_full_block_of_the_last_turn(cluster):
    """Chat messages go through the chat template; each turn's prompt extends the last one token for
    token (the earlier answer sent back as text gives back its tokens), so its KV is a hit."""
    messages = [{"role": "system", "content": "You are a coding agent."},
                {"role": "user", "content": "List the files in the repository " + "and their sizes " * 20}]
    tools = [{"type": "function", "function": {"name": "ls", "parameters": {"type": "object"}}}]
    prev = None
    for turn in range(3):
        r = chat(cluster, {"messages": messages, "tools": tools, "max_tokens": 8, "temperature": 0})
        choice = r["choices"][0]
        assert r["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
        assert choice["finish_reason"] == "length" and len(choice["token_ids"]) == 8
        if prev is not None:  # every full block of the last prompt and its answer (but its last token)
            assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == (prev - 1) // BT * BT
        prev = r["usage"]["prompt_tokens"] + len(choice["token_ids"])
        messages += [{"role": "assistant", "content": choice["message"]["content"]},
                     {"role": "tool", "tool_call_id": f"call_{turn}", "content": f"file_{turn}.py 120 bytes"}]


def test_chat_streams_deltas_that_join_to_the_answer_and_refuses_bad_messages(cluster):
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}], "max_tokens": 5,
            "temperature": 0.7, "seed": 3}
    plain = chat(cluster, body)["choices"][0]

    async def run():
        async with aiohttp.ClientSession() as s:
            async with s.post(cluster.url + "/v1/chat/completions", json={**body, "stream": True}) as r:
                return [json.loads(line[6:]) async for line in _sse_lines(r)]

    *deltas, finish = asyncio.run(run())
    assert deltas[0]["choices"][0]["delta"]["role"] == "assistant" and "role" not in deltas[1]["choices"][0]["delta"]
    assert "".join(d["choices"][0]["delta"]["content"] for d in deltas) == plain["message"]["content"]
    assert finish["object"] == "chat.completion.chunk" and finish["choices"][0]["finish_reason"] == "length"
    for bad in ({"messages": []}, {"messages": [{"role": "wizard", "content": "x"}]},
                {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}):
        req = urllib.request.Request(cluster.url + "/v1/chat/completions", data=json.dumps(bad).encode())
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 400 and json.load(e.value)["error"]["param"] == "messages"


def test_answers_ended_by_a_stop_string_are_counted_like_any_other(cluster):
    """A stop string ends a request at the coordinator, before its engines finish it: it is still an
    answered request in /metrics, streamed or not. (Such requests were once not counted at all.)"""
    body = {"prompt": list(range(30)), "max_tokens": 8, "temperature": 0}
    text = complete(cluster.url, body)["choices"][0]["text"]
    assert text.strip(), "no text to stop on"
    stop = text.strip()[-1]
    before = scrape(cluster)
    plain = complete(cluster.url, {**body, "stop": [stop]})["choices"][0]
    *_, last = stream_events(cluster, {**body, "stop": [stop]})
    assert plain["finish_reason"] == last["choices"][0]["finish_reason"] == "stop"
    after = scrape(cluster)
    for name in ("dualpath_requests_total", "dualpath_time_to_first_token_seconds_count"):
        assert total(after, name) - total(before, name) == 2, name
    assert_decode_engines_idle(cluster)
