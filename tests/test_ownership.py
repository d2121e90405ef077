"""Who serves a request (issue #30 A and C).

A: only the registered, live connection of an engine a request was given to speaks for it: a
connection that logged in with the cluster secret under a live engine's name cannot inject tokens
into, or finish, another user's request, and one whose Register was refused is closed.
C: a request with no token yet waits, until its deadline, for an engine that is restarting,
instead of failing with 503 at once.

Real coordinator and engine processes on loopback (one 1P1D cluster for the module), as in
test_faults.py; the deadline case uses an in-process coordinator with no engines at all."""

import asyncio
import json
import os
import signal
import threading
import urllib.request

import pytest
from aiohttp.test_utils import TestClient, TestServer

from dualpath.launcher import LocalCluster, complete
from dualpath.protocol import Done, Register, Token, ask, tell
from dualpath.transport.control import RemoteError, connect
from tests.conftest import wait_until
from tests.test_input_bounds import coordinator
from tests.test_serving import cluster_config, cluster_metrics


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cfg = cluster_config(1, "tiny-gqa", str(tmp_path_factory.mktemp("store")))
    cfg.scheduler.request_timeout_s = 60.0
    with LocalCluster(cfg, str(tmp_path_factory.mktemp("run"))) as c:
        yield c


class Stream(threading.Thread):
    """A streaming completion in the background: its id, token ids, finish reason and any error."""

    def __init__(self, url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.rid, self.tokens, self.finish, self.error = None, [], None, None
        self.first = threading.Event()
        self.start()

    def run(self) -> None:
        req = urllib.request.Request(self.url + "/v1/completions", data=json.dumps({**self.body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                for line in r:
                    if line.startswith(b"data: {"):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            self.error = chunk["error"]
                            break
                        self.rid = chunk["id"]
                        self.tokens += chunk["choices"][0]["token_ids"]
                        self.finish = chunk["choices"][0]["finish_reason"]
                        self.first.set()
        except Exception as e:  # an HTTP error status, say: the test reads it
            self.error = repr(e)
        finally:
            self.first.set()


@pytest.mark.cluster
def test_a_connection_logged_in_as_a_live_engine_cannot_speak_for_its_requests(cluster):
    """Logged in with the secret as the live de1: Register is refused and the connection closed; a
    second such connection that does not register sends 5 tokens and a finish for a request that
    de1 is decoding (de1 stopped meanwhile, so they would come first). The request's answer is
    still exactly de1's. (Both were accepted: the coordinator checked only the login name.)"""
    cfg = cluster.cfg
    body = {"prompt": list(range(40)), "max_tokens": 300, "temperature": 0}
    reference = complete(cluster.url, body)["choices"][0]["token_ids"]
    stream = Stream(cluster.url, body)
    assert stream.first.wait(60) and stream.error is None, stream.error
    de1 = cluster.procs["de1"].pid

    async def impostors() -> None:
        port = cfg.scheduler.control_port
        refused = await connect("127.0.0.1", port, cfg.transport.token, "de1")
        with pytest.raises(RemoteError, match="already registered and live"):
            await ask(refused, Register("de1", "decode", 0, "127.0.0.1", 1))
        await asyncio.wait_for(refused.closed.wait(), 10)  # closed by the coordinator
        silent = await connect("127.0.0.1", port, cfg.transport.token, "de1")
        try:
            for _ in range(5):
                tell(silent, Token(f"{stream.rid}.1", 7))
            tell(silent, Done(f"{stream.rid}.1"))
            # Kept: the coordinator acknowledges nothing it ignores, so there is no condition to await.
            # The pause lets the frames arrive before de1 speaks again (the scenario); were they late,
            # the test would be weaker, not flaky.
            await asyncio.sleep(0.2)
        finally:
            await silent.close()

    os.kill(de1, signal.SIGSTOP)
    try:
        asyncio.run(impostors())
    finally:
        os.kill(de1, signal.SIGCONT)
    stream.join(120)
    assert stream.error is None, stream.error
    assert stream.tokens == reference and stream.finish == "length"


def admitted(c) -> int:
    """Requests admitted on a DE so far: the coordinator sends the PE its job right after."""
    stats = cluster_metrics(c)["stats"]
    return stats["path_A"] + stats["path_B"] + stats["path_A+B"]


@pytest.mark.cluster
def test_requests_wait_for_a_prefill_engine_that_restarts(cluster):
    """The only PE dies with a request sent to it (no token yet), and a second request comes while
    it is gone; it restarts, as `dualpath up` restarts it. Both are served. (The first got 503 after
    one retry, the second at once, though their deadlines were a minute away.)"""
    pe0 = cluster.procs["pe0"].pid
    os.kill(pe0, signal.SIGSTOP)  # the first request reaches it, and no token comes
    started = admitted(cluster)
    sent = Stream(cluster.url, {"prompt": list(range(30)), "max_tokens": 5})
    try:
        wait_until(lambda: admitted(cluster) > started, "the request's admission")
    finally:
        os.kill(pe0, signal.SIGKILL)
    cluster.procs["pe0"].wait()
    wait_until(lambda: "pe0" not in cluster_metrics(cluster)["engines"], "pe0's death seen")
    waiting = Stream(cluster.url, {"prompt": list(range(31)), "max_tokens": 5})
    wait_until(lambda: cluster_metrics(cluster)["waiting_for_room"] == 2 or sent.error or waiting.error,
             "both requests waiting")
    assert sent.error is None and waiting.error is None, (sent.error, waiting.error)
    assert cluster.supervise() == ["pe0"]  # what `dualpath up` does every half second
    for s in (sent, waiting):
        s.join(60)
        assert s.error is None and len(s.tokens) == 5 and s.finish == "length", (s.error, s.tokens)
    assert cluster_metrics(cluster)["waiting_for_room"] == 0


async def test_a_role_that_never_comes_back_ends_the_request_at_its_deadline(tmp_path):
    """No engine at all: the request waits for one until its deadline (1 s here), then gets 503
    saying what it waited for."""
    coord = coordinator(tmp_path, request_timeout_s=1.0)
    async with TestClient(TestServer(coord.app())) as client:
        async with client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2}) as r:
            status, reply = r.status, await r.json()
    assert status == 503 and reply["error"]["type"] == "server_error", reply
    message = reply["error"]["message"]
    assert "no live prefill engine" in message and "within the request timeout of 1 s" in message, message
    assert len(coord.waiting) == 0
