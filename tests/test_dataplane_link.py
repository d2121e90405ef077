"""The data plane's link, as small writes use it (issue #34): the writer's acks read by a callback
(PeerLink), the receiver's frames read by callbacks into a buffer (dataplane._Inbound), shm's small
copies made on the event loop, and same-host links on a local (Unix) socket."""

import asyncio
import socket

import pytest
import torch

from dualpath.engine.buffers import BufferPool
from dualpath.transport import make_dataplane
from dualpath.transport.dataplane import TransferError
from dualpath.transport.framing import pack
from dualpath.transport.link import PeerLink, Refused
from dualpath.transport.shm import ShmDataPlane
from dualpath.transport.tcp import TcpDataPlane
from dualpath.transport.wire import Ack, Notify, WriteChunk
from tests.conftest import until

TOKEN = "test-token"


async def _pair(plane_a=TcpDataPlane, plane_b=TcpDataPlane, **kw_b):
    done: list = []
    a, b = plane_a("a", TOKEN), plane_b("b", TOKEN, on_complete=done.append, **kw_b)
    await a.start("127.0.0.1")
    await b.start("127.0.0.1")
    return a, b, done


# ------------------------------------------------------------------------------ the writer's acks

async def test_acks_in_pieces_and_several_at_once_resolve_their_writes():
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    link = PeerLink(ours, "inc")
    loop = asyncio.get_running_loop()
    futs = {i: loop.create_future() for i in (1, 2, 3)}
    link.pending.update(futs)
    one = pack(Ack(1).to_wire())
    for k in range(len(one)):  # one byte at a time: the frame is whole only at the end
        theirs.send(one[k : k + 1])
        await asyncio.sleep(0.01)
        assert futs[1].done() == (k == len(one) - 1)
    theirs.send(pack(Ack(3, err="no").to_wire()) + pack(Ack(2).to_wire()))  # two in one segment
    await until(lambda: futs[2].done() and futs[3].done(), "both acks read")
    assert futs[1].result() == Ack(1) and futs[2].result() == Ack(2)
    with pytest.raises(Refused, match="no"):
        futs[3].result()
    assert link.alive and not link.pending
    link.close()
    theirs.close()


@pytest.mark.parametrize("what, why", [(b"", "peer closed"), (pack([1, 2]), "malformed data-plane ack")])
async def test_a_lost_peer_or_a_malformed_ack_fails_every_pending_write(what, why):
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    link = PeerLink(ours, "inc")
    fut = link.pending[7] = asyncio.get_running_loop().create_future()
    if what:
        theirs.send(what)
    else:
        theirs.close()
    with pytest.raises(TransferError, match=why):
        await asyncio.wait_for(fut, 10)
    assert not link.alive
    theirs.close()


# ------------------------------------------------------------------------------ the receiver's frames

async def _send_raw(a, b, data: bytes, cuts: list[int] | None = None, then: int = 0) -> PeerLink:
    """Bytes on a's logged-in link to b: pieces of the sizes in cuts, the rest in pieces of `then`
    bytes (0: at once), each piece read by the receiver before the next is sent."""
    link = await a._link(("127.0.0.1", b.port), "bulk")
    pos = 0
    for n in cuts or []:
        link.sock.send(data[pos : pos + n])
        pos += n
        await asyncio.sleep(0.002)
    while pos < len(data):
        n = then or len(data) - pos
        link.sock.sendall(data[pos : pos + n])
        pos += n
        await asyncio.sleep(0.002)
    return link


@pytest.mark.parametrize("cuts, then", [(None, 0), ([1] * 150, 4096), ([7] * 700, 9999), (None, 1000)],
                         ids=["at-once", "bytes", "odd", "1000s"])
async def test_frames_split_anywhere_or_sent_together_land_in_order(cuts, then):
    """Three writes and a notify in one stream, cut into pieces of any size (a header split across
    reads, a payload partly with its header, several messages in one read): every byte lands, every
    completion fires in order and every message is acked."""
    a, b, done = await _pair()
    try:
        dst = torch.zeros(3 << 16, dtype=torch.uint8)
        h = b.register(dst)
        p1, p2 = bytes(range(256)) * 16, b"\x07" * 70_000  # 4 KiB, and more than the read buffer's half
        msgs = [WriteChunk(1, h["region"], 0, len(p1), h["inc"], notify="one").to_wire(),
                WriteChunk(2, h["region"], 4096, len(p2), h["inc"], notify="two").to_wire(),
                Notify(3, h["region"], 0, 10, h["inc"], notify="three").to_wire(),
                WriteChunk(4, h["region"], 100_000, 3, h["inc"], notify="four").to_wire()]
        data = pack(msgs[0]) + p1 + pack(msgs[1]) + p2 + pack(msgs[2]) + pack(msgs[3]) + b"abc"
        loop = asyncio.get_running_loop()
        link = await a._link(("127.0.0.1", b.port), "bulk")
        futs = [link.pending.setdefault(i, loop.create_future()) for i in (1, 2, 3, 4)]
        await _send_raw(a, b, data, cuts, then)
        await asyncio.wait_for(asyncio.gather(*futs), 30)
        assert done == ["one", "two", "three", "four"]
        assert bytes(dst[:4096].numpy()) == p1 and bytes(dst[4096 : 4096 + 70_000].numpy()) == p2
        assert bytes(dst[100_000:100_003].numpy()) == b"abc"
        assert b.bytes_received == len(p1) + len(p2) + 3
    finally:
        await a.close()
        await b.close()


async def test_a_refused_writes_payload_is_dropped_and_the_next_message_in_the_same_read_lands():
    a, b, done = await _pair()
    try:
        dst = torch.zeros(4096, dtype=torch.uint8)
        h = b.register(dst)
        bad = WriteChunk(1, h["region"], 4000, 200, h["inc"], notify="bad").to_wire()  # past the region's end
        good = WriteChunk(2, h["region"], 0, 5, h["inc"], notify="good").to_wire()
        loop = asyncio.get_running_loop()
        link = await a._link(("127.0.0.1", b.port), "bulk")
        futs = [link.pending.setdefault(i, loop.create_future()) for i in (1, 2)]
        await _send_raw(a, b, pack(bad) + b"\xff" * 200 + pack(good) + b"hello")
        with pytest.raises(Refused, match="outside region"):
            await asyncio.wait_for(futs[0], 10)
        await asyncio.wait_for(futs[1], 10)
        assert done == ["good"] and bytes(dst[:5].numpy()) == b"hello" and not dst[5:].any()
        assert b.refused == 1 and link.alive
    finally:
        await a.close()
        await b.close()


class _SlowLanding(TcpDataPlane):
    """A plane whose notifies land only after an await (as a CUDA event's do)."""

    def _landed_now(self, msg) -> bool:
        return not isinstance(msg, Notify)

    async def _landed(self, msg, writer) -> None:
        if isinstance(msg, Notify):
            await asyncio.sleep(0.05)


async def test_an_awaited_landing_holds_the_messages_behind_it_and_keeps_their_order():
    a, b, done = await _pair(plane_b=_SlowLanding)
    try:
        dst = torch.zeros(64, dtype=torch.uint8)
        h = b.register(dst)
        first = Notify(1, h["region"], 0, 8, h["inc"], notify="notify").to_wire()
        then = WriteChunk(2, h["region"], 0, 4, h["inc"], notify="write").to_wire()
        loop = asyncio.get_running_loop()
        link = await a._link(("127.0.0.1", b.port), "bulk")
        futs = [link.pending.setdefault(i, loop.create_future()) for i in (1, 2)]
        await _send_raw(a, b, pack(first) + pack(then) + b"abcd")  # one segment
        await asyncio.wait_for(asyncio.gather(*futs), 10)
        assert done == ["notify", "write"] and bytes(dst[:4].numpy()) == b"abcd"
    finally:
        await a.close()
        await b.close()


# ------------------------------------------------------------------------------ shm: small writes

def _shared(n_blocks: int = 8) -> BufferPool:
    return BufferPool(n_blocks=n_blocks, n_layers=1, bytes_per_layer=1 << 20, pin=False, shared=True)


@pytest.mark.parametrize("inline", [True, False])
async def test_shm_small_writes_are_copied_on_the_loop_and_large_ones_on_the_copy_thread(inline, monkeypatch):
    """At most inline_copy_bytes: one memcpy on the event loop, then the notify; above: the copy
    thread. Either way the bytes land where asked, the notify fires once and no payload crosses
    the socket."""
    a, b, done = await _pair(ShmDataPlane, ShmDataPlane)
    threaded: list[int] = []
    on_thread = ShmDataPlane._copy_on_thread

    async def counted(self, src, mapped, off, n, tc):
        threaded.append(n)
        return await on_thread(self, src, mapped, off, n, tc)

    monkeypatch.setattr(ShmDataPlane, "_copy_on_thread", counted)
    try:
        buf = _shared()
        h = b.register(buf.host, share_path=buf.share_path)
        n = 4096 if inline else ShmDataPlane.inline_copy_bytes + 1
        src = torch.randint(0, 256, (n + 100,), dtype=torch.uint8)
        await a.write(src[100:], h, 12345, n, "latency", notify={"n": n})
        assert done == [{"n": n}] and torch.equal(buf.host[12345 : 12345 + n], src[100:])
        assert not buf.host[:12345].any() and not buf.host[12345 + n :].any()
        assert threaded == ([] if inline else [n]) and b.bytes_received == 0
        bf16 = torch.randn(64, 32, dtype=torch.bfloat16)  # a KV-shaped source of another dtype
        await a.write(bf16, h, 0, bf16.numel() * 2, "bulk", notify="bf16")
        assert done[-1] == "bf16" and torch.equal(buf.host[: bf16.numel() * 2], bf16.view(-1).view(torch.uint8))
        await a.write(memoryview(b"from a memoryview"), h, 1 << 20, 17, "bulk", notify="mv")
        assert done[-1] == "mv" and bytes(buf.host[1 << 20 : (1 << 20) + 17].numpy()) == b"from a memoryview"
    finally:
        await a.close()
        await b.close()


async def test_shm_links_to_a_peer_of_this_host_use_its_local_socket_and_fall_back_to_tcp():
    a, b, done = await _pair(ShmDataPlane, ShmDataPlane)
    try:
        buf = _shared(2)
        h = b.register(buf.host, share_path=buf.share_path)
        assert h["shm"]["link"].startswith("dualpath-")
        await a.write(torch.ones(16, dtype=torch.uint8), h, 0, 16, "latency", notify="local")
        (link,) = a._links.values()
        assert link.sock.family == socket.AF_UNIX and done == ["local"]
        assert a.links() == {f"127.0.0.1:{b.port}": "shm"}
        # a handle naming a local socket nobody listens on: the link is dialled over TCP instead
        gone = {**h, "shm": {**h["shm"], "link": "dualpath-nobody"}}
        await a.write(torch.ones(16, dtype=torch.uint8), gone, 16, 16, "bulk", notify="tcp")
        bulk = a._links[("127.0.0.1", b.port, "bulk")]
        assert bulk.sock.family == socket.AF_INET and done == ["local", "tcp"]
        assert torch.equal(buf.host[:32], torch.ones(32, dtype=torch.uint8))
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("plane", [TcpDataPlane, ShmDataPlane])
async def test_many_small_writes_in_flight_land_once_each(plane):
    """64 writes of 4 KiB at once on one link: over tcp their frames fill the receiver's read buffer
    several times over (it is reused, not grown); over shm their notifies share the link."""
    a, b, done = await _pair(plane, plane)
    try:
        buf = _shared(2)
        h = b.register(buf.host, share_path=buf.share_path)
        src = torch.arange(256, dtype=torch.uint8).repeat(16 * 64)  # 64 slots of 4 KiB, slot i starts with i
        await asyncio.gather(*(a.write(src[i * 4096 :], h, i * 4096, 4096, "bulk", notify=i) for i in range(64)))
        assert sorted(done) == list(range(64)) and torch.equal(buf.host[: 64 * 4096], src[: 64 * 4096])
    finally:
        await a.close()
        await b.close()


async def test_a_tcp_plane_reaches_a_shm_plane_over_tcp():
    """A handle with a local socket is a shm plane's: a tcp writer ignores it and writes over TCP."""
    a, b, done = await _pair(TcpDataPlane, ShmDataPlane)
    try:
        buf = _shared(2)
        h = b.register(buf.host, share_path=buf.share_path)
        await a.write(torch.full((100,), 3, dtype=torch.uint8), h, 50, 100, "bulk", notify="tcp")
        (link,) = a._links.values()
        assert link.sock.family == socket.AF_INET and done == ["tcp"] and b.bytes_received == 100
        assert int(buf.host[50:150].sum()) == 300
    finally:
        await a.close()
        await b.close()


def test_make_dataplane_still_makes_each_backend():
    for backend in ("tcp", "shm"):
        assert make_dataplane(backend, "x", TOKEN).backend == backend
