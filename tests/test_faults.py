"""Fault injection: a careful operator's probes of a running cluster, each a regression test.

Real coordinator and engine processes on loopback. Each case prints one summary line (shown at the
end of the run). The hijack, NaN, crash-under-`up` and no-room cases failed on commit 02dc69c."""

import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from dualpath.launcher import LocalCluster, complete
from dualpath.protocol import Abort, Admit, Engines, Register, SamplingParams, ask
from dualpath.transport.control import ProtocolError, connect
from tests.test_serving import assert_decode_engines_idle, cluster_config, cluster_metrics, post_raw

pytestmark = pytest.mark.cluster  # every test starts a LocalCluster or `dualpath` processes

HBM_BLOCKS = 40  # per engine: 39 usable on a DE (one is scratch), i.e. 624 tokens of prompt + answer
SUMMARY: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    yield
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line("")
        for line in SUMMARY:
            tr.write_line(f"fault suite: {line}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cfg = cluster_config(2, "tiny-gqa", str(tmp_path_factory.mktemp("store")))
    cfg.engine.hbm_blocks, cfg.engine.buffer_blocks = HBM_BLOCKS, 256
    cfg.scheduler.request_timeout_s = 120.0  # a bound on a hang (a busy host is slow, not wrong)
    # a stopped engine counts as dead 10 s after its last heartbeat: on a busy host the requests sent
    # just after a SIGSTOP reach the coordinator well before that (test_a_stopped_decode_engine_...)
    cfg.scheduler.dead_after_s = 10.0
    with LocalCluster(cfg, str(tmp_path_factory.mktemp("run"))) as c:
        yield c


def stream_until_first_token(url: str, body: dict) -> tuple[threading.Thread, dict]:
    """A streaming request running in the background; returns once its first token is out. The dict
    gets its token ids, its finish reason and any error chunk."""
    first, result = threading.Event(), {"tokens": []}

    def run():
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            for line in r:
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        result["error"] = chunk["error"]
                        break
                    result["tokens"] += chunk["choices"][0]["token_ids"]
                    result["finish"] = chunk["choices"][0]["finish_reason"]
                    first.set()
        first.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert first.wait(60), "no first token"
    return t, result


def test_no_room_on_the_idlest_decode_engine_is_not_the_clients_problem(cluster):
    """de A holds a long request (38 of its 39 blocks), de B a shorter one (19 blocks) and so the
    fewest running tokens; a third long request fits neither now. It must wait for room, not get
    500 "de has no room" from the idlest DE."""
    long, short = {"prompt": list(range(100)), "max_tokens": 500}, {"prompt": list(range(100)), "max_tokens": 200}
    t1, _ = stream_until_first_token(cluster.url, long)
    t2, _ = stream_until_first_token(cluster.url, short)
    t0 = time.monotonic()
    r = complete(cluster.url, {**long, "max_tokens": 480}, timeout=60)
    waited = time.monotonic() - t0
    assert len(r["choices"][0]["token_ids"]) == 480
    t1.join(60), t2.join(60)
    SUMMARY.append(f"no room on any DE: the request waited {waited:.1f} s for room and was served")
    assert_decode_engines_idle(cluster)


def _timed_stream(url: str, body: dict, out: dict) -> None:
    """A streaming request; out gets the client's times of its first and last token."""
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            if line.startswith(b"data: {"):
                out.setdefault("first", time.monotonic())
    out["done"] = time.monotonic()


def test_requests_waiting_for_room_get_it_as_soon_as_it_is_freed_oldest_first(tmp_path):
    """1P1D whose DE holds one long request at a time, its periodic heartbeats an hour apart. Of three
    long requests sent in turn, the second and third are each served after the one before finishes,
    in the order they came: an engine that frees memory says so at once (the only heartbeat that can
    come in time), and the oldest waiter goes first. (Each used to sleep a heartbeat interval between
    tries: here it would wait an hour, past the 180 s bound on the test's waits.) No timing
    threshold: how soon after the free the next one starts is a figure for the summary line."""
    cfg = cluster_config(1, "tiny-gqa", str(tmp_path / "store"))
    cfg.engine.hbm_blocks = HBM_BLOCKS  # 100 + 480 tokens is 37 of the DE's 39 usable blocks
    cfg.scheduler.heartbeat_s, cfg.scheduler.dead_after_s = 3600.0, 7200.0
    with LocalCluster(cfg, str(tmp_path / "run")) as c:
        times = [{}, {}, {}]
        threads = [threading.Thread(target=_timed_stream, args=(c.url, {"prompt": list(range(100 + i)),
                                                                        "max_tokens": 480}, t), daemon=True)
                   for i, t in enumerate(times)]
        threads[0].start()
        deadline = time.monotonic() + 180  # a bound on a hang, not a measurement
        while "first" not in times[0]:  # the first one holds the DE
            assert time.monotonic() < deadline, "the first request never started"
            time.sleep(0.01)
        waiting = []  # what /v1/cluster says while the first one decodes
        for n, t in enumerate(threads[1:], start=1):
            t.start()  # once the one before it waits: they arrive in this order
            while (w := cluster_metrics(c)["waiting_for_room"]) < n and "done" not in times[0]:
                assert time.monotonic() < deadline, f"request {n + 1} never queued for room"
                time.sleep(0.02)
            waiting.append(w)
        while "done" not in times[0] and time.monotonic() < deadline:
            waiting.append(cluster_metrics(c)["waiting_for_room"])
            time.sleep(0.02)
        end = time.monotonic() + 180
        for t in threads:
            t.join(max(0.1, end - time.monotonic()))
        assert all("done" in t for t in times), times  # each was woken by a free, not by a periodic heartbeat
        assert max(waiting) == 2 and cluster_metrics(c)["waiting_for_room"] == 0, waiting
        with urllib.request.urlopen(c.url + "/metrics") as r:
            assert b"dualpath_requests_waiting_for_room 0.0" in r.read()
        gaps = [nxt["first"] - prev["done"] for prev, nxt in zip(times, times[1:])]
        assert all(g > 0 for g in gaps), gaps  # each started after the one before finished, oldest first
        assert_decode_engines_idle(c)
    SUMMARY.append(f"waiting for room: the next request started {max(gaps):.2f} s after room was freed "
                   "(heartbeats 4 s apart)")


def test_a_request_waiting_for_room_outlives_a_restart_of_the_last_decode_engine(tmp_path):
    """1P1D whose DE holds one long request at a time: a second one waits for room. SIGKILL the DE:
    the waiter, with no token yet, keeps waiting (bounded by its deadline: issue #30) and is served
    once the DE restarts, as `dualpath up` restarts it. (It got 503 "no live decode engine" at once;
    a DE that never comes back ends it at its deadline: test_ownership.py.)"""
    cfg = cluster_config(1, "tiny-gqa", str(tmp_path / "store"))
    cfg.engine.hbm_blocks = HBM_BLOCKS
    cfg.scheduler.request_timeout_s = 300.0  # a bound on a hang: the DE's restart has that long
    with LocalCluster(cfg, str(tmp_path / "run")) as c:
        first, _ = stream_until_first_token(c.url, {"prompt": list(range(100)), "max_tokens": 480})
        reply = {}

        def waiter() -> None:
            reply["status"], reply["body"] = post_raw(c.url, json.dumps({"prompt": list(range(1, 101)),
                                                                        "max_tokens": 480}).encode())

        t = threading.Thread(target=waiter, daemon=True)
        t.start()
        deadline = time.monotonic() + 60
        while cluster_metrics(c)["waiting_for_room"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert cluster_metrics(c)["waiting_for_room"] == 1
        t0 = time.monotonic()
        c.procs["de1"].kill()
        c.procs["de1"].wait()
        deadline = time.monotonic() + 60
        while "de1" in cluster_metrics(c)["engines"]:
            assert time.monotonic() < deadline, "the coordinator never saw de1 die"
            time.sleep(0.05)
        assert t.is_alive() and cluster_metrics(c)["waiting_for_room"] == 1, reply
        assert c.supervise() == ["de1"]
        t.join(330)
        took = time.monotonic() - t0
        first.join(60)
    assert not t.is_alive(), "the waiter was never answered"
    assert reply["status"] == 200 and len(reply["body"]["choices"][0]["token_ids"]) == 480, reply
    SUMMARY.append(f"the last DE killed and restarted: the request waiting for room was served {took:.1f} s later")


@pytest.mark.parametrize("body,needle", [
    ('{"prompt": [1, 2, 3], "temperature": NaN}', "temperature"),
    ('{"prompt": [1, 2, 3], "temperature": Infinity}', "temperature"),
    ('{"prompt": [1, 2, 3], "seed": 1180591620717411303424}', "seed"),
    ('{"prompt": "\\ud800"}', "Unicode"),
    ('[' * 50_000 + ']' * 50_000, "nested too deeply"),
    ('{"prompt": [1], "max_tokens": 700}', "KV blocks"),  # fits the context, never an engine's HBM
])
def test_bad_parameters_get_a_400_at_once_and_strand_nothing(cluster, body, needle):
    """At once: refused as the request is read, before it is counted as a request or queued for room
    (the coordinator's stats say so; how long that took is no test's business)."""
    before = cluster_metrics(cluster)["stats"]
    status, reply = post_raw(cluster.url, body.encode())
    assert status == 400 and needle in reply["error"]["message"], reply
    assert reply["error"]["type"] == "invalid_request_error"
    m = cluster_metrics(cluster)
    assert m["stats"]["requests"] == before["requests"] and m["stats"]["rejected"] == before["rejected"] + 1
    assert m["waiting_for_room"] == 0
    SUMMARY.append(f"{body[:48]!r}: 400 {reply['error']['message'][:60]!r}")


def test_a_tiny_temperature_is_answered_and_fails_nothing_batched_with_it(cluster):
    """1e-300 made logits / T infinite: the request never answered and failed its batch."""
    outs = {}

    def send(name, temperature):
        outs[name] = complete(cluster.url, {"prompt": list(range(40)), "max_tokens": 6, "temperature": temperature,
                                            "seed": 1}, timeout=30)

    threads = [threading.Thread(target=send, args=(n, t)) for n, t in [("tiny", 1e-300), ("greedy", 0), ("hot", 1.0)]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    assert {n: len(o["choices"][0]["token_ids"]) for n, o in outs.items()} == {"tiny": 6, "greedy": 6, "hot": 6}
    assert outs["tiny"]["choices"][0]["token_ids"] == outs["greedy"]["choices"][0]["token_ids"]
    SUMMARY.append("temperature 1e-300: answered (greedily), and the requests batched with it too")
    assert_decode_engines_idle(cluster)


def test_a_second_engine_cannot_take_over_a_live_engines_name(cluster):
    """With the cluster's secret, registering as the live pe0 is refused (it once replaced pe0 and
    received other users' prompts); without the secret nothing gets in at all."""
    cfg = cluster.cfg

    async def probe():
        port = cfg.scheduler.control_port
        for name, refusal in (("pe0", "already registered and live"), ("pe7", "cannot register as")):
            conn = await connect("127.0.0.1", port, cfg.transport.token, "pe0")
            try:
                with pytest.raises(Exception, match=refusal):
                    await ask(conn, Register(name, "prefill", 0, "127.0.0.1", 1))
                await asyncio.wait_for(conn.closed.wait(), 10)  # a refused connection is closed (issue #30)
            finally:
                await conn.close()
        for token in ("dualpath-local", "x" * 32):
            with pytest.raises((ProtocolError, ConnectionError)):
                c = await connect("127.0.0.1", port, token, "pe0")
                await ask(c, Engines(), timeout=2)

    asyncio.run(probe())
    r = complete(cluster.url, {"prompt": list(range(30)), "max_tokens": 3})
    assert r["dualpath"]["pe"] == "pe0"
    SUMMARY.append("hijack: re-registering live pe0 refused and closed, wrong/old secrets refused, pe0 still serves")


def test_an_oversized_frame_before_login_is_refused_without_buffering_it(cluster):
    """Refused on the length it announces: the refusal names the frame limit. A server that waited
    for the 64 MiB would be ended by its 10 s login timeout instead, with no such reason."""
    with socket.create_connection(("127.0.0.1", cluster.cfg.scheduler.control_port), timeout=60) as s:
        s.recv(4096)  # the challenge
        s.sendall(struct.pack(">I", 64 << 20) + b"x" * 1024)  # announces 64 MiB, sends 1 KiB
        got = b""
        while chunk := s.recv(4096):  # the refusal, then the close (60 s: a bound on a hang)
            got += chunk
    assert b"frame of 67108864 bytes exceeds the limit" in got, got
    SUMMARY.append("a 64 MiB frame before login: refused and closed at once")


def test_a_stopped_decode_engine_holds_new_requests_for_seconds_not_30(cluster):
    """SIGSTOP keeps the socket open and silent: admits wait on heartbeats, then go elsewhere. The
    admit to it (both DEs idle as last heard: the tie goes to de1) is given up because its heartbeats
    stopped, as the coordinator's log says, not by the ask's own 30 s timeout; how long that took
    is the summary line's."""
    de = "de1"
    pid = cluster.procs[de].pid
    assert_decode_engines_idle(cluster)  # their last heartbeats say so: de1 is the first choice
    log_at = (cluster.workdir / "coordinator.log").stat().st_size
    retries = cluster_metrics(cluster)["stats"]["admit_retries"]
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        outs = [complete(cluster.url, {"prompt": list(range(20 + i)), "max_tokens": 2}, timeout=120) for i in range(3)]
        took = time.monotonic() - t0
    finally:
        os.kill(pid, signal.SIGCONT)
    assert all(o["dualpath"]["de"] != de for o in outs)
    with open(cluster.workdir / "coordinator.log", errors="replace") as f:
        f.seek(log_at)
        given_up = [line for line in f if f"{de} did not admit it" in line]
    assert cluster_metrics(cluster)["stats"]["admit_retries"] > retries and given_up, "no admit went to de1"
    assert all(f"({de} stopped heartbeating)" in line for line in given_up), given_up
    SUMMARY.append(f"a SIGSTOPped DE: 3 requests served by the other DE in {took:.1f} s")
    deadline = time.monotonic() + 15
    while de not in [n for n in cluster_metrics(cluster)["engines"]] and time.monotonic() < deadline:
        time.sleep(0.2)


def test_a_request_past_its_deadline_gets_504_and_frees_its_memory(tmp_path):
    cfg = cluster_config(1, "tiny-gqa", str(tmp_path / "store"))
    cfg.scheduler.request_timeout_s = 0.5
    with LocalCluster(cfg, str(tmp_path / "run")) as c:
        status, reply = post_raw(c.url, json.dumps({"prompt": list(range(50)), "max_tokens": 1500}).encode())
        assert status == 504 and "request timeout" in reply["error"]["message"], reply
        assert reply["error"]["type"] == "server_error" and "Traceback" not in json.dumps(reply)
        assert_decode_engines_idle(c)
    SUMMARY.append("deadline: 504 server_error after 0.5 s, every block freed")


def test_an_api_key_guards_the_api(tmp_path):
    cfg = cluster_config(1, "tiny-gqa", str(tmp_path / "store"))
    cfg.scheduler.api_key = "sk-test-key"
    with LocalCluster(cfg, str(tmp_path / "run")) as c:
        status, reply = post_raw(c.url, b'{"prompt": [1, 2], "max_tokens": 1}')
        assert status == 401 and reply["error"]["type"] == "authentication_error"
        req = urllib.request.Request(c.url + "/v1/completions", data=b'{"prompt": [1, 2], "max_tokens": 1}',
                                     headers={"Authorization": "Bearer sk-test-key"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert len(json.load(r)["choices"][0]["token_ids"]) == 1
        # as docs/SECURITY.md says: /v1/* needs the key; the operational pages (numbers, never a prompt) do not
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(c.url + "/v1/cluster", timeout=10)
        assert refused.value.code == 401
        for path in ("/healthz", "/metrics", "/dashboard", "/dashboard/data"):
            with urllib.request.urlopen(c.url + path, timeout=10) as r:
                assert r.status == 200, path
    SUMMARY.append("API key: 401 without it, served with it; /metrics and /dashboard open")


def _children(pid: int) -> dict[int, str]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if ppid == pid:
                out[int(d)] = cmd
    return out


def test_dualpath_up_keeps_serving_when_an_engine_crashes_and_restarts_it(tmp_path):
    """kill -9 of a decode engine under `dualpath up` once tore the whole cluster down."""
    port = cluster_config(1, "tiny-gqa", "/tmp").scheduler.http_port
    up = subprocess.Popen([sys.executable, "-m", "dualpath.cli", "up", "--prefill", "1", "--decode", "2",
                           "--port", str(port), "--store", str(tmp_path / "store")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(up.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 60
        while not any(line.startswith("API:") for line in lines):  # `up` has seen every engine start
            assert up.poll() is None and time.monotonic() < deadline, "".join(lines)[-2000:]
            time.sleep(0.1)
        victim = next(p for p, cmd in _children(up.pid).items() if "--role decode --node 1" in cmd)
        os.kill(victim, signal.SIGKILL)
        try:
            outs = [complete(url, {"prompt": list(range(30 + i)), "max_tokens": 3}, timeout=30) for i in range(3)]
        except urllib.error.HTTPError as e:
            pytest.fail(f"HTTP {e.code}: {e.read()[:600]!r}")
        assert all(len(o["choices"][0]["token_ids"]) == 3 for o in outs)
        wait_for_engines(url, {"pe0", "de1", "de2"}, up)  # the restarted de1 rejoined
        assert up.poll() is None
    finally:
        os.killpg(up.pid, signal.SIGTERM)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
    out = "".join(lines)
    assert "de1 exited with code -9; restarting it (1/3)" in out, out[-2000:]
    SUMMARY.append("kill -9 of de1 under `dualpath up`: requests kept being served, de1 restarted and rejoined")


def wait_for_engines(url: str, want: set[str], proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                if set(json.load(r)["engines"]) >= want:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(f"engines {want} not all live within {timeout}s")


def test_a_non_streaming_client_that_hangs_up_stops_its_generation(cluster):
    """Its 500 tokens were once generated for nobody: aiohttp does not cancel the handler."""
    body = json.dumps({"prompt": list(range(60)), "max_tokens": 500}).encode()
    gone_before = cluster_metrics(cluster)["stats"]["client_gone"]
    with socket.create_connection(("127.0.0.1", cluster.cfg.scheduler.http_port), timeout=5) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + 30
        while not any(e["running_decode_tokens"] for e in cluster_metrics(cluster)["engines"].values()
                      if e["role"] == "decode"):
            assert time.monotonic() < deadline, "the request never reached a decode engine"
            time.sleep(0.05)
    t0 = time.monotonic()
    assert_decode_engines_idle(cluster)
    assert cluster_metrics(cluster)["stats"]["client_gone"] == gone_before + 1  # stopped for the hang-up
    SUMMARY.append(f"a non-streaming client hung up: generation stopped, memory free {time.monotonic() - t0:.1f} s "
                   "later")


def test_an_engine_given_another_hosts_address_says_so_and_exits(tmp_path):
    """An advertised address this host does not have: a clear error at start, not a hang."""
    from dualpath.config import write_config

    cfg = cluster_config(1, "tiny-gqa", str(tmp_path / "store"))
    cfg.engines[0].host = "192.0.2.7"  # TEST-NET-1: never an address of this machine
    write_config(cfg, tmp_path / "cluster.toml")
    r = subprocess.run([sys.executable, "-m", "dualpath.cli", "run", "--role", "prefill", "--node", "0", "--config",
                        str(tmp_path / "cluster.toml")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "cannot listen on 192.0.2.7" in r.stderr
    assert "must be an address of this host" in r.stderr


def test_a_decode_engine_that_refused_an_admit_takes_the_request_once_it_has_room(tmp_path):
    """The coordinator's view says the DE has room, but a squatter took it behind the view's back (it
    heartbeats every 30 s), so the DE refuses the admit. The request waits and is served by that DE
    once the squatter leaves. (The coordinator once told the DE to abort the refused admit; the DE
    then refused that request again on every try, until its deadline.)"""
    cfg = cluster_config(1, "tiny-gqa", str(tmp_path / "store"))
    cfg.engine.hbm_blocks = HBM_BLOCKS
    cfg.scheduler.heartbeat_s, cfg.scheduler.dead_after_s, cfg.scheduler.request_timeout_s = 30.0, 120.0, 300.0
    with LocalCluster(cfg, str(tmp_path / "run")) as c:
        de = next(e for e in cfg.engines if e.role == "decode")

        async def squat_then_leave() -> dict:
            conn = await connect(de.host, de.port, cfg.transport.token, "squatter")
            try:  # 100 + 500 tokens: 38 of the DE's 39 blocks
                await ask(conn, Admit("squat", list(range(100)), 0, 0, SamplingParams(max_tokens=500), pe="pe0",
                                      handoff_timeout_s=60))
                loop = asyncio.get_running_loop()
                served = loop.run_in_executor(None, lambda: complete(
                    c.url, {"prompt": list(range(40)), "max_tokens": 100}, timeout=330))
                deadline = time.monotonic() + 60
                while not (await loop.run_in_executor(None, cluster_metrics, c))["stats"]["admit_retries"]:
                    assert time.monotonic() < deadline, "the DE never refused the admit"
                    await asyncio.sleep(0.05)
                await ask(conn, Abort("squat"))
                return await served
            finally:
                await conn.close()

        t0 = time.monotonic()
        r = asyncio.run(squat_then_leave())
        assert len(r["choices"][0]["token_ids"]) == 100 and r["dualpath"]["de"] == de.name
        SUMMARY.append(f"a DE refused an admit (no room after all): served by it {time.monotonic() - t0:.1f} s "
                       "later, once it had room")
        assert_decode_engines_idle(c)


def test_a_request_already_decoding_outlives_its_prefill_engine(tmp_path):
    """Once its first token is out, a request needs only its DE: the PE dying mid-decode is no
    failure of it. (It once failed with 500 at the first pause of its tokens, made here by stopping
    the DE for longer than two heartbeats but not long enough to count as dead.)"""
    cfg = cluster_config(1, "tiny-gqa", str(tmp_path / "store"))
    # dead_after_s: a busy host's stalls must not count the DE dead (pe0's closed socket says it died)
    cfg.scheduler.heartbeat_s, cfg.scheduler.dead_after_s = 0.1, 30.0
    with LocalCluster(cfg, str(tmp_path / "run")) as c:
        t, out = stream_until_first_token(c.url, {"prompt": list(range(50)), "max_tokens": 1900})
        c.procs["pe0"].kill()
        deadline = time.monotonic() + 60
        while "pe0" in cluster_metrics(c)["engines"]:
            assert time.monotonic() < deadline, "the coordinator never saw pe0 die"
            time.sleep(0.05)
        de = c.procs["de1"].pid
        os.kill(de, signal.SIGSTOP)
        time.sleep(0.5)  # the behaviour under test: a pause in the DE's tokens (longer than two heartbeats)
        os.kill(de, signal.SIGCONT)
        assert "error" not in out, out["error"]
        assert t.is_alive() and len(out["tokens"]) < 1900, "the answer ended before the pause: make it longer"
        t.join(120)
        assert "error" not in out, out["error"]
        assert len(out["tokens"]) == 1900 and out["finish"] == "length"
        SUMMARY.append("the PE was killed while a request decoded: all 1900 tokens arrived")


def test_a_streaming_client_that_hangs_up_is_not_counted_as_a_failure(cluster):
    """Its generation stops and its memory is freed; the coordinator counts it as a client gone, not
    as a 500 of its own."""
    body = json.dumps({"prompt": list(range(60)), "max_tokens": 500, "stream": True}).encode()
    before = cluster_metrics(cluster)["stats"]
    with socket.create_connection(("127.0.0.1", cluster.cfg.scheduler.http_port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        got = b""
        while b"data: {" not in got:
            chunk = s.recv(4096)
            assert chunk, f"the server closed the stream before its first token: {got!r}"
            got += chunk
    deadline = time.monotonic() + 60
    while (after := cluster_metrics(cluster)["stats"])["client_gone"] == before["client_gone"]:
        assert time.monotonic() < deadline, "the coordinator never saw the client go"
        time.sleep(0.05)
    assert after["client_gone"] == before["client_gone"] + 1 and after["failed"] == before["failed"]
    assert_decode_engines_idle(cluster)
    SUMMARY.append("a streaming client hung up: generation stopped, counted as gone, not failed")
