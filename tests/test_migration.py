"""A stream survives its engine (issue #37).

When a request's decode engine dies (kill -9), or stops answering (SIGSTOP), after the request has
streamed tokens, the coordinator continues it on a live engine as prompt + the tokens it produced
(their KV loaded from the blocks the dead DE persisted, on the policy's path), and the client's
stream goes on with the next token. The continuation is exact: greedy and seeded sampled tokens are
those of an uninterrupted run, with the same usage and finish reason, and no token is repeated.
The prefill engine's death while requests wait for it costs them only time: they wait, bounded by
their deadline, for `dualpath up` to restart it. On commit 997d14d every stream that had sent a
token failed with "engine de1 died".
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request

import pytest
import torch

from dualpath.engine.weights import load_pretrained
from dualpath.launcher import LocalCluster, complete
from tests.test_serving import BT, assert_decode_engines_idle, cluster_config, greedy_reference, scrape, total

pytestmark = pytest.mark.cluster  # every test starts a LocalCluster

STREAMS = 20  # half greedy, half sampled with a seed
ANSWER = 40  # tokens each


@pytest.fixture
def cluster(tmp_path):
    cfg = cluster_config(2, "tiny-gqa", str(tmp_path / "store"))
    cfg.scheduler.request_timeout_s = 180.0  # a bound on a hang (a busy host is slow, not wrong)
    cfg.scheduler.dead_after_s = 5.0  # a stopped DE is found silent after this
    with LocalCluster(cfg, str(tmp_path / "run")) as c:
        c.model = load_pretrained("tiny-gqa")
        yield c


def bodies(seed: int) -> list[dict]:
    """Prompts of 3-5 blocks; odd ones sampled at temperature 0.8 with a seed."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(STREAMS):
        prompt = torch.randint(0, 256, (int(torch.randint(40, 80, (1,), generator=gen)),), generator=gen).tolist()
        body = {"prompt": prompt, "max_tokens": ANSWER, "ignore_eos": True, "dualpath_policy": "dualpath"}
        body.update({"temperature": 0.8, "seed": 1000 + i} if i % 2 else {"temperature": 0})
        out.append(body)
    return out


def references(c, bodies: list[dict]) -> list[list[int]]:
    """Greedy: the no-cache reference. Sampled: the same request served without a fault first (the
    draws depend only on the seed and the position, so this is the uninterrupted answer)."""
    return [greedy_reference(c.model, b["prompt"], ANSWER) if not b["temperature"]
            else complete(c.url, b, timeout=120)["choices"][0]["token_ids"] for b in bodies]


class Stream(threading.Thread):
    """One streaming completion in the background: its token ids, finish reason, usage, and any error."""

    def __init__(self, url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = url, {**body, "stream": True, "stream_options": {"include_usage": True}}
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.usage: dict | None = None
        self.error: str | None = None
        self.start()

    def run(self) -> None:
        req = urllib.request.Request(self.url + "/v1/completions", data=json.dumps(self.body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=240) as r:
                for line in r:
                    if not line.startswith(b"data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        self.error = str(chunk["error"])
                    elif chunk.get("choices"):
                        self.tokens += chunk["choices"][0]["token_ids"]
                        self.finish = chunk["choices"][0]["finish_reason"] or self.finish
                    elif chunk.get("usage"):
                        self.usage = chunk["usage"]
        except Exception as e:  # an HTTP error before the stream began
            self.error = f"{type(e).__name__}: {e}"


def until_streaming(streams: list[Stream], timeout: float = 120) -> None:
    """Wait (a bound on a hang) until most streams have sent tokens and none has finished: the
    fault then lands in the middle of their answers."""
    deadline = time.monotonic() + timeout
    while sum(len(s.tokens) >= 2 for s in streams) < len(streams) // 2:
        assert time.monotonic() < deadline, "the streams did not start"
        time.sleep(0.02)


def check(c, streams: list[Stream], want: list[list[int]]) -> None:
    for i, (s, ref) in enumerate(zip(streams, want)):
        s.join(240)
        assert not s.is_alive(), f"stream {i} hung"
        assert s.error is None, f"stream {i} failed: {s.error}"
        assert s.tokens == ref, f"stream {i} ({'sampled' if i % 2 else 'greedy'}) differs from an uninterrupted run"
        assert s.finish == "length"
        assert s.usage["completion_tokens"] == ANSWER and s.usage["prompt_tokens"] == len(s.body["prompt"])
        # the prompt's hits as the first attempt found them: a sampled prompt was served once before
        # (its reference run), a greedy one never (migrations load more, but usage is the prompt's)
        cached = (len(s.body["prompt"]) - 1) // BT * BT if s.body["temperature"] else 0
        assert s.usage["prompt_tokens_details"]["cached_tokens"] == cached


def test_streams_continue_at_the_exact_token_when_their_decode_engine_is_killed(cluster):
    c = cluster
    work = bodies(1)
    want = references(c, work)
    streams = [Stream(c.url, b) for b in work]
    until_streaming(streams)
    os.kill(c.procs["de1"].pid, signal.SIGKILL)
    c.procs["de1"].wait(30)
    check(c, streams, want)
    m = scrape(c)
    assert total(m, "dualpath_request_migrations_total") >= 1
    assert c.supervise() == ["de1"]  # as `dualpath up` restarts it; the cluster then serves as before
    assert_decode_engines_idle(c)


def test_streams_continue_when_their_decode_engine_stops_answering(cluster):
    """SIGSTOP: the DE's socket stays open, so only its silence tells. Once it is resumed, the
    abort it finds frees its slots, and none of its late tokens reaches a client."""
    c = cluster
    work = bodies(2)
    want = references(c, work)
    streams = [Stream(c.url, b) for b in work]
    until_streaming(streams)
    os.kill(c.procs["de1"].pid, signal.SIGSTOP)
    try:
        check(c, streams, want)
    finally:
        os.kill(c.procs["de1"].pid, signal.SIGCONT)
    assert total(scrape(c), "dualpath_request_migrations_total") >= 1
    assert_decode_engines_idle(c)  # the resumed DE freed what the migrated requests held there


def test_requests_waiting_for_a_killed_prefill_engine_are_served_once_it_restarts(cluster):
    """kill -9 of the only PE: requests sent meanwhile wait for it (no 503), and once it is
    restarted each gets the reference tokens; nothing is stranded on the decode engines."""
    c = cluster
    work = [b for b in bodies(3) if not b["temperature"]][:6]
    want = references(c, work)
    os.kill(c.procs["pe0"].pid, signal.SIGKILL)
    c.procs["pe0"].wait(30)
    streams = [Stream(c.url, b) for b in work]
    deadline = time.monotonic() + 60
    while total(scrape(c), "dualpath_requests_waiting_for_room") < len(work):  # all wait for a PE
        assert time.monotonic() < deadline and all(s.is_alive() for s in streams), \
            [s.error for s in streams]
        time.sleep(0.05)
    assert c.supervise() == ["pe0"]
    check(c, streams, want)
    assert_decode_engines_idle(c)
