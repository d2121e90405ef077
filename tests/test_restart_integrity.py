"""A restarted engine is a new peer (issue #30, item 1).

On the default (shm) data plane a writer once kept its mapping of a peer's DRAM buffer across that
peer's kill -9 and restart: handoffs (after a DE restart) and path-B loads (after a PE restart)
went into the dead process's memory, the restarted engine served wrong tokens, and the DE persisted
wrong KV that poisoned later turns. The cluster case failed on commit 997d14d for both victims; the
unit cases pin the pieces: incarnations on every backend, bound grants, malformed logins.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import time
import urllib.request

import pytest
import torch

from dualpath.engine.buffers import BufferPool
from dualpath.engine.weights import load_pretrained
from dualpath.launcher import LocalCluster, complete
from dualpath.transport.control import Server
from dualpath.transport.dataplane import TransferError
from dualpath.transport.framing import LOGIN_MAX_FRAME, pack, recv_frame_blocking
from dualpath.transport.shm import ShmDataPlane
from tests.conftest import until
from tests.test_serving import BT, cluster_config, greedy_reference

TOKEN = "test-token"
POLICIES = ["pe-read", "de-read", "dualpath", "dualpath-split"]
READER = {"pe-read": {"A"}, "de-read": {"B"}, "dualpath": {"A", "B"},  # the path of a turn with hits
          "dualpath-split": {"A", "B", "A+B"}}


# ------------------------------------------------------------------------------ a cluster, killed

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """1P1D (every request meets the engine that restarts) on the default backend (shm here)."""
    cfg = cluster_config(1, "tiny-gqa", str(tmp_path_factory.mktemp("store")))
    assert cfg.transport.backend == "auto"
    with LocalCluster(cfg, str(tmp_path_factory.mktemp("run"))) as c:
        c.model = load_pretrained("tiny-gqa")
        yield c


def _engines(c) -> dict:
    with urllib.request.urlopen(c.url + "/v1/cluster", timeout=10) as r:
        return json.load(r)["engines"]


def _lives(c, name: str) -> int:
    """How many processes of engine `name` have come up (each logs one "ready" line; restarts append)."""
    return (c.workdir / f"{name}.log").read_text(errors="replace").count(f"{name} ready")


def kill_and_restart(c, name: str, timeout: float = 60) -> None:
    """kill -9 an engine, restart it as `dualpath up` does (LocalCluster.supervise), and wait until
    the restarted process has registered (it logs "ready" after that) and heartbeated."""
    old, lives, before = c.procs[name], _lives(c, name), _engines(c)[name]
    os.kill(old.pid, signal.SIGKILL)
    old.wait(30)
    assert c.supervise() == [name]
    deadline = time.monotonic() + timeout
    while _lives(c, name) == lives or "free_buffer_blocks" not in _engines(c).get(name, {}):
        assert c.procs[name].poll() is None and time.monotonic() < deadline, f"{name} did not come back: " \
            f"{c.log_tail(name)}"
        time.sleep(0.1)
    assert _engines(c)[name].get("incarnation") != before.get("incarnation", "(not reported)")


def turn(c, tokens: list[int], policy: str, n: int = 6) -> dict:
    """One request; its tokens must be the no-cache reference's."""
    r = complete(c.url, {"prompt": tokens, "max_tokens": n, "temperature": 0, "dualpath_policy": policy},
                 timeout=120)
    got = r["choices"][0]["token_ids"]
    assert got == greedy_reference(c.model, tokens, n), (
        f"{policy}: {len(tokens)}-token prompt (cached {r['usage']['prompt_tokens_details']['cached_tokens']}, "
        f"path {r['dualpath']['path']}) diverged from the reference")
    return r


def conversation_start(c, policy: str, gen: torch.Generator) -> list[int]:
    """A first turn; returns the context a next turn extends (prompt + answer)."""
    tokens = torch.randint(0, 256, (57,), generator=gen).tolist()
    return tokens + turn(c, tokens, policy)["choices"][0]["token_ids"]


def next_turn(c, context: list[int], policy: str, gen: torch.Generator) -> list[int]:
    """A turn extending `context`: every full block of it is a hit, read on the policy's path."""
    tokens = context + torch.randint(0, 256, (19,), generator=gen).tolist()
    r = turn(c, tokens, policy)
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == (len(context) - 1) // BT * BT
    assert r["dualpath"]["path"] in READER[policy]
    return tokens + r["choices"][0]["token_ids"]


@pytest.mark.parametrize("victim", ["de1", "pe0"])
@pytest.mark.cluster
def test_a_killed_and_restarted_engine_serves_reference_tokens_and_persists_the_right_kv(cluster, victim):
    """Before the fault each policy has a conversation of two turns (the second reads hits, so the
    writers of both paths have mapped their peer's buffer); after kill -9 and restart of `victim`,
    (1) the cached conversations go on, (2) new prompts are served, and (3) a next turn of each new
    prompt reads the KV the restarted engines persisted: all exactly the reference greedy tokens."""
    gen = torch.Generator().manual_seed(sum(map(ord, victim)))  # each victim its own prompts
    before = {p: next_turn(cluster, conversation_start(cluster, p, gen), p, gen) for p in POLICIES}
    kill_and_restart(cluster, victim)
    for p in POLICIES:
        next_turn(cluster, before[p], p, gen)
        fresh = conversation_start(cluster, p, gen)
        next_turn(cluster, fresh, p, gen)


# ------------------------------------------------------------------------------ incarnations

def _links_closed(plane) -> bool:
    """Whether the writer has seen every one of its links close (as after its peer's kill -9)."""
    return not any(link.alive for link in plane._links.values())


async def _pair(plane: type = ShmDataPlane, buffer_blocks: int = 4) -> tuple:
    """Two planes a (writer) and b (receiver, its completions in `done`), and a shared buffer."""
    done: list = []
    a, b = plane("a", TOKEN), plane("b", TOKEN, on_complete=done.append)
    await a.start("127.0.0.1")
    await b.start("127.0.0.1")
    buf = BufferPool(n_blocks=buffer_blocks, n_layers=2, bytes_per_layer=1 << 14, pin=False, shared=True)
    return a, b, buf, done


@pytest.mark.parametrize("backend", ["shm", "tcp"])
async def test_a_restarted_peer_is_a_new_peer_and_the_old_ones_handles_are_refused(backend):
    """b restarts on the same address (as `dualpath up` restarts an engine): a's writes with b's
    old handle are refused naming the incarnation, and writes with the new one land in the new
    buffer. (shm once wrote the new handle's bytes into the old buffer, mapped once per address.)"""
    from dualpath.transport.dataplane import StaleIncarnation, TcpDataPlane

    plane = ShmDataPlane if backend == "shm" else TcpDataPlane
    a, b, buf, done = await _pair(plane)
    b2 = None
    try:
        old = b.register(buf.host, share_path=buf.share_path, granted_only=True)
        old_grant = b.grant(old, 0, 4096, peer="a")
        src = torch.full((4096,), 7, dtype=torch.uint8)
        await a.write(src, old_grant, 0, 4096, "latency", notify="old")
        assert done == ["old"] and int(buf.host[:4096].sum()) == 7 * 4096
        port = b.port
        await b.close()
        await until(lambda: _links_closed(a), "a sees b's close")  # as after a kill -9 (a restart takes seconds)
        done2: list = []
        b2 = plane("b", TOKEN, on_complete=done2.append)  # same name, same port: a new incarnation
        await b2.start("127.0.0.1", port)
        buf2 = BufferPool(n_blocks=4, n_layers=2, bytes_per_layer=1 << 14, pin=False, shared=True)
        new = b2.register(buf2.host, share_path=buf2.share_path, granted_only=True)
        assert new["inc"] != old["inc"] and new["region"] == old["region"]
        with pytest.raises(StaleIncarnation, match="incarnation"):
            await a.write(src, old_grant, 0, 4096, "latency", notify="stale")
        new_grant = b2.grant(new, 0, 4096, peer="a")
        src2 = torch.full((4096,), 9, dtype=torch.uint8)
        await a.write(src2, new_grant, 0, 4096, "latency", notify="new")
        assert done2 == ["new"] and torch.equal(buf2.host[:4096], src2)  # the new buffer, not the old one
        assert int(buf.host[:4096].sum()) == 7 * 4096
        if backend == "shm":  # the old buffer's mapping was dropped, not kept beside the new one
            assert {k[2] for k in a._mapped} == {new["inc"]}
        with pytest.raises(StaleIncarnation, match="incarnation"):  # again, once the new one is known
            await a.write(src, old_grant, 0, 4096, "bulk")
    finally:
        await a.close()
        if b2 is not None:
            await b2.close()


async def test_a_new_handle_is_written_even_before_the_old_peers_close_is_seen():
    """Right after a restart our link may still look alive (its close not read yet) and name the old
    incarnation: a handle of the new one makes the writer ask the address afresh, not refuse it."""
    a, b, buf, done = await _pair()
    b2 = None
    try:
        granted = b.grant(b.register(buf.host, share_path=buf.share_path, granted_only=True), 0, 4096, peer="a")
        await a.write(torch.ones(4096, dtype=torch.uint8), granted, 0, 4096, "latency", notify="old")
        port = b.port
        await b.close()  # no pause: a's link to b is still in its table, and may look alive
        done2: list = []
        b2 = ShmDataPlane("b", TOKEN, on_complete=done2.append)
        await b2.start("127.0.0.1", port)
        buf2 = BufferPool(n_blocks=4, n_layers=2, bytes_per_layer=1 << 14, pin=False, shared=True)
        new = b2.grant(b2.register(buf2.host, share_path=buf2.share_path, granted_only=True), 0, 4096, peer="a")
        src = torch.full((4096,), 3, dtype=torch.uint8)
        await a.write(src, new, 0, 4096, "latency", notify="new")
        assert done2 == ["new"] and torch.equal(buf2.host[:4096], src)
    finally:
        await a.close()
        if b2 is not None:
            await b2.close()


async def test_verbs_queue_pairs_of_an_old_incarnation_are_closed_and_its_rkeys_refused_fake_device():
    """The verbs plane (fake device layer of tests/test_verbs.py; no RDMA here): a restarted receiver
    gets a new QP and the old one is closed; an old handle's rkey is refused before anything is
    posted; a restarted writer's QPs on the receiver are closed once it logs in again."""
    pytest.importorskip("pyverbs", reason="python3-pyverbs (rdma-core) is not installed")
    from dualpath.transport.dataplane import StaleIncarnation
    from dualpath.transport.verbs import VerbsDataPlane, enums
    from tests.test_verbs import FakeDevice, FakeFabric

    e, fabric, done = enums(), FakeFabric(), []

    def plane(name: str, **kw) -> VerbsDataPlane:
        return VerbsDataPlane(name, TOKEN, device_layer=FakeDevice(fabric, e.IBV_MTU_4096), **kw)

    a, b = plane("a"), plane("b")
    await a.start("127.0.0.1")
    port = await b.start("127.0.0.1")
    running = [a, b]
    try:
        old = b.register(torch.zeros(4096, dtype=torch.uint8))
        await a.write(torch.ones(10, dtype=torch.uint8), old, 0, 10, "bulk")
        (first_qp,) = a.dev.made
        await running.pop().close()  # b
        await until(lambda: _links_closed(a), "a sees b's close")
        b2 = plane("b", on_complete=done.append)
        running.append(b2)
        await b2.start("127.0.0.1", port)
        new = b2.register(torch.zeros(4096, dtype=torch.uint8))
        with pytest.raises(StaleIncarnation, match="incarnation"):
            await a.write(torch.ones(10, dtype=torch.uint8), old, 0, 10, "bulk")
        assert len(a.dev.made) == 1  # nothing posted, no QP made for the old handle
        await a.write(torch.ones(10, dtype=torch.uint8), new, 0, 10, "bulk", notify="new")
        assert done == ["new"] and first_qp.closed and list(a.qps) == [(("127.0.0.1", port), "bulk", new["inc"])]
        (accepted,) = b2.accepted.values()
        await running.pop(0).close()  # a restarts: its QP on b2 is closed once the new one logs in
        await until(lambda: not b2._writers, "b2 sees a's connections close")
        a2 = plane("a")
        running.append(a2)
        await a2.start("127.0.0.1")
        await a2.write(torch.ones(10, dtype=torch.uint8), new, 0, 10, "bulk", notify="again")
        assert done == ["new", "again"] and accepted.closed and len(b2.accepted) == 1
    finally:
        for p in running:
            await p.close()


async def test_a_notify_naming_an_old_incarnation_is_refused_by_the_receiver():
    """The receiver checks too (a writer that skipped its own check, or raced the restart)."""
    a, b, buf, done = await _pair()
    try:
        region = b.register(buf.host, share_path=buf.share_path, granted_only=True)
        granted = b.grant(region, 0, 4096, peer="a")
        msg = {"op": "n", "region": granted["region"], "grant": granted["grant"], "off": 0, "n": 0, "moved": 4096,
               "last": True, "notify": "stale"}
        for inc in ("0123456789abcdef", None):
            with pytest.raises(TransferError, match="incarnation"):
                await a.ask(("127.0.0.1", b.port), "latency", {**msg, "inc": inc})
        assert done == [] and b.refused == 2
        await a.ask(("127.0.0.1", b.port), "latency", {**msg, "inc": region["inc"]})  # the live one: fine
        assert done == ["stale"]
    finally:
        await a.close()
        await b.close()


async def test_grant_ids_are_unguessable_and_bound_to_the_writers_incarnation():
    """A connection logging in as `a` (the secret is all it needs) finds no grant by counting, and
    cannot use a's grant: the grant is bound to a's incarnation, which it is not."""
    a, b, buf, done = await _pair()
    impostor = ShmDataPlane("a", TOKEN)
    await impostor.start("127.0.0.1")
    try:
        region = b.register(buf.host, share_path=buf.share_path, granted_only=True)
        grants = [b.grant(region, 0, 4096, peer="a", peer_incarnation=a.incarnation) for _ in range(50)]
        ids = [g["grant"] for g in grants]
        assert len(set(ids)) == 50 and all(isinstance(i, str) and len(i) >= 22 for i in ids)
        ones = torch.ones(4096, dtype=torch.uint8)
        for guess in (1, 2, "1"):
            with pytest.raises(TransferError, match="no grant"):
                await impostor.write(ones, {**region, "grant": guess}, 0, 4096, "latency")
        with pytest.raises(TransferError, match="no grant"):
            await impostor.write(ones, grants[0], 0, 4096, "latency")
        await a.write(ones, grants[0], 0, 4096, "latency", notify="a")
        assert done == ["a"]
        # a grant made before its writer's incarnation was known is bound by its first use
        late = b.grant(region, 4096, 4096, peer="a")
        await a.write(ones, late, 4096, 4096, "latency", notify="bound")
        with pytest.raises(TransferError, match="no grant"):
            await impostor.write(ones, late, 4096, 4096, "latency")
        assert done == ["a", "bound"]
    finally:
        await impostor.close()
        await a.close()
        await b.close()


# ------------------------------------------------------------------------------ malformed logins

MALFORMED = [5, [1, 2], {"v": 1, "name": "x", "mac": "not bytes"}, {"v": 1, "name": 7, "mac": b"x" * 32},
             "hello", None]


def _login_with(port: int, hello) -> dict | None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.settimeout(5)
        first = recv_frame_blocking(s, LOGIN_MAX_FRAME)
        assert isinstance(first, dict) and "nonce" in first
        s.sendall(pack(hello))
        try:
            return recv_frame_blocking(s, LOGIN_MAX_FRAME)  # the refusal, if any, then the close
        except ConnectionError:
            return None


async def test_malformed_control_logins_are_refused_counted_and_logged_in_one_line(caplog):
    async def handler(conn, method, params):
        return params

    server = Server(TOKEN, handler)
    port = await server.start("127.0.0.1", 0)
    caplog.set_level(logging.WARNING)
    loop = asyncio.get_running_loop()
    try:
        for hello in MALFORMED:
            reply = await loop.run_in_executor(None, _login_with, port, hello)
            assert reply is not None and reply["ok"] is False and "malformed login" in reply["error"], reply
        assert server.refused == server.malformed == len(MALFORMED)
        lines = [r for r in caplog.records if "refused control connection" in r.getMessage()]
        assert len(lines) == len(MALFORMED) and all("malformed login" in r.getMessage() for r in lines)
        assert all(r.exc_info is None for r in caplog.records) and "Traceback" not in caplog.text
        assert len(caplog.records) == len(MALFORMED), caplog.text
    finally:
        await server.close()


async def test_malformed_data_plane_logins_are_refused_counted_and_logged_in_one_line(caplog):
    b = ShmDataPlane("b", TOKEN)
    await b.start("127.0.0.1")
    caplog.set_level(logging.WARNING)
    loop = asyncio.get_running_loop()
    try:
        for hello in MALFORMED:
            reply = await loop.run_in_executor(None, _login_with, b.port, hello)
            assert reply is not None and reply["ok"] is False and "malformed login" in reply["error"], reply
        assert b.refused == b.malformed == len(MALFORMED)
        assert all(r.exc_info is None for r in caplog.records) and "Traceback" not in caplog.text
        assert len([r for r in caplog.records if "malformed login" in r.getMessage()]) == len(MALFORMED)
    finally:
        await b.close()
