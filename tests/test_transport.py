"""Transport conformance: control plane, and the one-sided data plane on every backend this host has."""

import asyncio

import pytest
import torch

from dualpath.transport import available_backends, make_dataplane
from dualpath.transport.control import MAX_FRAME, ProtocolError, RemoteError, Server, connect, pack
from dualpath.transport.dataplane import TransferError
from dualpath.transport.link import PeerLink
from dualpath.transport.wire import ConnectQp
from tests.conftest import until

TOKEN = "test-token"


# ------------------------------------------------------------------------------------------ control plane

async def _echo(conn, method, params):
    if method == "echo":
        return params
    if method == "slow":
        await asyncio.sleep(params["s"])  # the behaviour under test: an answer later than the caller waits
        return "late"
    raise ValueError(f"unknown method {method!r}")


async def test_control_request_response_events_and_errors():
    events = []

    async def handler(conn, method, params):
        if method == "ev":
            events.append(params)
            return None
        return await _echo(conn, method, params)

    server = Server(TOKEN, handler)
    port = await server.start("127.0.0.1", 0)
    conn = await connect("127.0.0.1", port, TOKEN, "client")
    assert await conn.request("echo", a=1, b=[1, 2]) == {"a": 1, "b": [1, 2]}
    with pytest.raises(RemoteError, match="unknown method 'nope'"):
        await conn.request("nope")
    with pytest.raises(TimeoutError):
        await conn.request("slow", timeout=0.05, s=1)
    conn.event("ev", x=3)
    await until(lambda: events, "the event reached the server's handler")
    assert events == [{"x": 3}]
    await conn.close()
    await server.close()


async def test_control_refuses_a_peer_without_the_token():
    server = Server(TOKEN, _echo)
    port = await server.start("127.0.0.1", 0)
    with pytest.raises(ProtocolError, match="refused"):
        await connect("127.0.0.1", port, "wrong-token", "intruder")
    assert server.refused == 1
    await server.close()


async def test_control_oversize_frame_is_refused_and_closed():
    server = Server(TOKEN, _echo, max_frame=1024)
    port = await server.start("127.0.0.1", 0)
    conn = await connect("127.0.0.1", port, TOKEN, "client", max_frame=1 << 20)
    conn.writer.write(pack({"id": 1, "m": "echo", "p": {"blob": b"x" * 4096}}))
    with pytest.raises(ConnectionError):
        await conn.request("echo", timeout=2, a=1)
    await server.close()
    assert MAX_FRAME > 1024


# ------------------------------------------------------------------------------------------ data plane

AVAILABLE = available_backends()
WHY_NOT = {"verbs": "no RDMA device on this host (pyverbs finds none)", "cuda": "no CUDA device on this host"}


@pytest.fixture(params=["tcp", "verbs", "cuda"])
async def pair(request):
    if request.param not in AVAILABLE:
        pytest.skip(f"{request.param} backend: {WHY_NOT[request.param]}")
    done = []
    a = make_dataplane(request.param, "a", TOKEN)
    b = make_dataplane(request.param, "b", TOKEN, on_complete=done.append)
    await a.start("127.0.0.1")
    await b.start("127.0.0.1")
    yield a, b, done, request.param
    await a.close()
    await b.close()


def _dest(backend: str, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.uint8, device="cuda" if backend == "cuda" else "cpu")


async def test_write_lands_in_place_then_completes(pair):
    a, b, done, backend = pair
    dst = _dest(backend, 1 << 20)
    handle = b.register(dst)
    src = torch.arange(300_000, dtype=torch.int32).view(torch.uint8)[: 600_000]
    await a.write(src, handle, 1000, 600_000, "bulk", notify={"req": 7, "layer": 3})
    assert done == [{"req": 7, "layer": 3}]
    assert torch.equal(dst[1000:601000].cpu(), src) and int(dst[:1000].sum()) == 0


async def test_write_to_unknown_or_released_handle_or_out_of_range_is_refused(pair):
    a, b, done, backend = pair
    handle = b.register(_dest(backend, 4096))
    with pytest.raises(TransferError, match="outside"):
        await a.write(torch.ones(100, dtype=torch.uint8), handle, 4050, 100, "latency")
    b.release(handle)
    with pytest.raises(TransferError, match="unknown or released"):
        await a.write(torch.ones(100, dtype=torch.uint8), handle, 0, 100, "latency")
    handle2 = b.register(_dest(backend, 4096))  # the link is still usable afterwards
    await a.write(torch.ones(100, dtype=torch.uint8), handle2, 0, 100, "latency", notify="ok")
    assert done == ["ok"]


async def test_a_granted_only_region_takes_writes_only_inside_a_live_grant_to_that_writer(pair):
    """An engine's DRAM buffer: a peer writes only the run granted to it for one request, and not
    after the grant is revoked (an authenticated peer once could write any offset of the buffer)."""
    a, b, done, backend = pair
    dst = _dest(backend, 8192)
    region = b.register(dst, granted_only=True)
    ones = torch.ones(100, dtype=torch.uint8)
    with pytest.raises(TransferError, match="no grant"):  # the bare region
        await a.write(ones, region, 0, 100, "latency")
    to_a, to_other = b.grant(region, 1024, 1024, peer="a"), b.grant(region, 4096, 1024, peer="someone-else")
    await a.write(ones, to_a, 1024, 100, "latency", notify="in")
    assert done == ["in"] and int(dst[1024:1124].sum()) == 100
    for handle, off in [(to_a, 2000), (to_a, 1000), (to_other, 4096)]:  # past its end, before it, not ours
        with pytest.raises(TransferError, match="no grant"):
            await a.write(ones, handle, off, 100, "latency")
    b.revoke(to_a)
    with pytest.raises(TransferError, match="no grant"):
        await a.write(ones, to_a, 1024, 100, "latency")
    assert done == ["in"]  # no refused write completed
    if backend == "tcp":  # the receiver itself lands tcp bytes: nothing refused landed (docs/SECURITY.md)
        assert int(dst.sum()) == 100


CHUNK = 256 << 10


@pytest.fixture
async def tcp_pair():
    """Two tcp data planes; bulk yields to latency traffic with a share so close to 1 that it waits
    for the latency writes themselves, however long they take on a busy host."""
    done = []
    a = make_dataplane("tcp", "a", TOKEN, latency_share=1 - 1e-9, bulk_chunk_bytes=CHUNK)
    b = make_dataplane("tcp", "b", TOKEN, on_complete=done.append)
    await a.start("127.0.0.1")
    await b.start("127.0.0.1")
    yield a, b, done
    await a.close()
    await b.close()


def count_sends(monkeypatch) -> dict:
    """Bytes the writer hands to each of its links' sockets (PeerLink.send, wrapped: every message's
    frames go through it)."""
    sent = {}
    send = PeerLink.send

    async def counted(link, *frames):
        sent[link.sock] = sent.get(link.sock, 0) + sum(len(f) for f in frames)
        return await send(link, *frames)

    monkeypatch.setattr(PeerLink, "send", counted)
    return sent


async def test_a_latency_write_overtakes_bulk_and_bulk_holds_back_while_it_is_in_flight(tcp_pair, monkeypatch):
    """Link sharing by order and by bytes, not by time: a latency-class write issued while a 64 MiB
    bulk write is under way completes first, and while it is in flight the bulk write puts at most
    one more chunk on the link (one it was already about to send). Without the hold, bulk sent about
    as many bytes as the latency write meanwhile (18 MB of 64 when tried). How long a latency write
    takes under bulk is a benchmark's figure, not a test's: a busy host changes it, not the order."""
    a, b, done = tcp_pair
    sent = count_sends(monkeypatch)
    bulk_dst, lat_dst = b.register(_dest("tcp", 64 << 20)), b.register(_dest("tcp", 16 << 20))

    def links_to_b() -> list:  # the writer's connections to b, one per traffic class
        return [sock for sock in sent if sock.fileno() >= 0 and sock.getpeername()[1] == b.port]

    await a.write(torch.ones(16, dtype=torch.uint8), lat_dst, 0, 16, "latency", notify="warm")  # its link is up
    (latency_sock,) = links_to_b()
    bulk = asyncio.create_task(a.write(torch.ones(64 << 20, dtype=torch.uint8), bulk_dst, 0, 64 << 20, "bulk",
                                       notify="bulk"))
    await until(lambda: b.bytes_received > 16, "the bulk write is under way", every=0.001)
    (bulk_sock,) = [sock for sock in links_to_b() if sock is not latency_sock]
    before = sent[bulk_sock]
    await a.write(torch.ones(16 << 20, dtype=torch.uint8), lat_dst, 0, 16 << 20, "latency", notify="latency")
    during = sent[bulk_sock] - before
    await bulk
    assert done == ["warm", "latency", "bulk"]
    assert during <= 2 * (CHUNK + 1024), during  # two chunks and their headers, of the 64 MiB
    assert b.bytes_received == (64 << 20) + (16 << 20) + 16


async def test_peer_dying_mid_transfer_fails_fast_and_reconnect_works():
    done = []
    a = make_dataplane("tcp", "a", TOKEN)
    b = make_dataplane("tcp", "b", TOKEN, on_complete=done.append)
    await a.start("127.0.0.1")
    port = await b.start("127.0.0.1")
    dst = torch.zeros(256 << 20, dtype=torch.uint8)
    handle = b.register(dst)
    writing = asyncio.create_task(a.write(torch.ones(256 << 20, dtype=torch.uint8), handle, 0, 256 << 20,
                                          "bulk", notify="never", timeout=3600))
    await until(lambda: b.bytes_received > 0, "the write is under way")
    await b.close()  # the peer dies mid-transfer
    with pytest.raises(TransferError):  # the loss is noticed: the write's own hour-long ack timeout is not
        await asyncio.wait_for(writing, 60)  # what ended it (60 s: a bound on a hang, not a measurement)
    assert done == []  # half-written: never reported complete
    b2 = make_dataplane("tcp", "b", TOKEN, on_complete=done.append)  # the peer restarts
    await b2.start("127.0.0.1", port)
    h2 = b2.register(torch.zeros(1024, dtype=torch.uint8))
    await a.write(torch.ones(1024, dtype=torch.uint8), h2, 0, 1024, "latency", notify="back")
    assert done == ["back"]
    await a.close()
    await b2.close()


async def test_data_plane_refuses_a_peer_without_the_token():
    a = make_dataplane("tcp", "a", "other-token")
    b = make_dataplane("tcp", "b", TOKEN)
    await b.start("127.0.0.1")
    handle = b.register(torch.zeros(16, dtype=torch.uint8))
    with pytest.raises(TransferError):
        await a.write(torch.ones(16, dtype=torch.uint8), handle, 0, 16, "latency")
    await until(lambda: b.refused, "the receiver counted the refusal")
    assert b.refused == 1
    await a.close()
    await b.close()


def test_unavailable_backend_falls_back_to_tcp(caplog):
    dp = make_dataplane("verbs", "x", TOKEN) if "verbs" not in available_backends() else None
    if dp is None:
        pytest.skip("this host has an RDMA device")
    assert dp.backend == "tcp" and "not available" in caplog.text


@pytest.mark.parametrize("backend", ["shm", "cuda"])
async def test_same_host_buffers_are_written_by_memory_copy(backend):
    """The shm backend, and the cuda backend's host path (neither needs a GPU): a peer's shared DRAM
    buffer is mapped and written with one copy, no payload crosses the socket; a buffer of another
    host goes over tcp."""
    from dualpath.engine.buffers import BufferPool
    from dualpath.transport.cuda import CudaDataPlane
    from dualpath.transport.shm import ShmDataPlane

    plane = {"shm": ShmDataPlane, "cuda": CudaDataPlane}[backend]
    done = []
    a, b = plane("a", TOKEN), plane("b", TOKEN, on_complete=done.append)
    await a.start("127.0.0.1")
    await b.start("127.0.0.1")
    try:
        buf = BufferPool(n_blocks=4, n_layers=2, bytes_per_layer=1 << 16, pin=False, shared=True)
        handle = b.register(buf.host, share_path=buf.share_path)
        src = torch.randint(0, 256, (100_000,), dtype=torch.uint8)
        await a.write(src, handle, 4096, 100_000, "bulk", notify={"layer": 1})
        assert done == [{"layer": 1}] and torch.equal(buf.host[4096:104096], src)
        assert b.bytes_received == 0  # the bytes did not travel over the socket
        assert a.links() == {f"127.0.0.1:{b.port}": backend}
        with pytest.raises(TransferError, match="outside"):
            await a.write(src, handle, buf.host.numel() - 10, 100_000, "latency")
        granted_region = b.register(buf.host, share_path=buf.share_path, granted_only=True)
        granted = b.grant(granted_region, 8192, 4096, peer="a")
        await a.write(src[:4096], granted, 8192, 4096, "bulk", notify="granted")
        assert done[-1] == "granted"
        with pytest.raises(TransferError, match="no grant"):  # starts inside the grant, ends past it
            await a.write(src[:4096], granted, 10240, 4096, "bulk", notify="past")
        assert done[-1] == "granted"
        elsewhere = {**handle, "shm": {**handle["shm"], "host": "another-host"}}
        await a.write(src[:5000], elsewhere, 0, 5000, "latency", notify="tcp")
        assert done[-1] == "tcp" and b.bytes_received == 5000 and torch.equal(buf.host[:5000], src[:5000])
    finally:
        await a.close()
        await b.close()


async def test_rdma_queue_pair_request_to_a_tcp_peer_is_refused_clearly(pair):
    """The verbs handshake travels on the data-plane link; a peer without an RDMA device answers
    with an error (the writer then knows to use its tcp path), and the link stays usable."""
    a, b, done, backend = pair
    if backend == "verbs":
        pytest.skip("this peer has an RDMA device")
    with pytest.raises(TransferError, match=f"cannot take an RDMA queue pair: it runs the {backend} data plane"):
        await a.ask(("127.0.0.1", b.port), "bulk", ConnectQp(0, "bulk", {"qpn": 1, "lid": 0, "gid": "::"}))
    handle = b.register(_dest(backend, 4096))
    await a.write(torch.ones(100, dtype=torch.uint8), handle, 0, 100, "bulk", notify="after")
    assert done == ["after"]
