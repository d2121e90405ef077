"""The data plane as an interface: every backend implements DataPlane side by side, and the link's
messages are typed (wire.py), each checked before the receiver acts on it."""

import asyncio

import pytest
import torch

from dualpath.transport import make_dataplane
from dualpath.transport.cuda import CudaDataPlane
from dualpath.transport.dataplane import DataPlane, TransferError
from dualpath.transport.framing import ProtocolError, pack
from dualpath.transport.shm import ShmDataPlane
from dualpath.transport.tcp import TcpDataPlane
from dualpath.transport.verbs import VerbsDataPlane
from dualpath.transport.wire import Ack, ConnectQp, Notify, Op, WriteChunk, parse, parse_ack

TOKEN = "test-token"
BACKENDS = {"tcp": TcpDataPlane, "shm": ShmDataPlane, "cuda": CudaDataPlane, "verbs": VerbsDataPlane}


# ------------------------------------------------------------------------------ the class map

def test_every_backend_is_a_data_plane_named_after_itself():
    for name, plane in BACKENDS.items():
        assert issubclass(plane, DataPlane) and plane.backend == name


def test_no_backend_extends_another_except_cuda_the_shm_plane_plus_gpu_memory():
    for name, plane in BACKENDS.items():
        parents = {b for b in BACKENDS.values() if b is not plane and issubclass(plane, b)}
        assert parents == ({ShmDataPlane} if name == "cuda" else set()), name


def test_the_shared_base_knows_no_backend_and_cannot_be_made_itself():
    assert not [n for n in vars(DataPlane) if "qp" in n.lower() or "rdma" in n.lower() or "verbs" in n.lower()]
    with pytest.raises(TypeError, match="abstract"):
        DataPlane("x", TOKEN)

    class NoWrite(DataPlane):
        backend = "none"

    with pytest.raises(TypeError, match="write"):
        NoWrite("x", TOKEN)


def test_the_old_import_of_tcp_from_dataplane_still_works():
    from dualpath.transport.dataplane import TcpDataPlane as Old

    assert Old is TcpDataPlane


# ------------------------------------------------------------------------------ messages

@pytest.mark.parametrize("msg", [
    WriteChunk(7, 1, 4096, 512, "inc0", grant="g", last=False),
    WriteChunk(8, 2, 0, 0, "inc0", notify={"rid": "r", "layer": 3}),
    Notify(9, 1, 100, 4096, "inc0", grant="g", notify="n", event=[0, b"ipc"]),
    Notify(10, 1, 0, 0, "inc0"),
    ConnectQp(11, "bulk", {"qpn": 5, "lid": 0, "gid": "::1", "mtu": 5}),
])
def test_each_message_reads_back_as_it_was_sent(msg):
    assert parse(msg.to_wire()) == msg


def test_acks_read_back_with_their_error_or_answer():
    for ack in (Ack(1), Ack(2, err="refused"), Ack(3, answer={"qpn": 4})):
        assert parse_ack(ack.to_wire()) == ack


def test_ops_keep_their_one_or_two_byte_wire_names():
    assert (Op.WRITE, Op.NOTIFY, Op.CONNECT_QP) == ("w", "n", "qp")


@pytest.mark.parametrize("header, why", [
    ([1, 2], "malformed"),
    ({"op": "w", "region": 1}, "malformed"),  # no id
    ({"op": "x", "id": 1}, "unknown data-plane op"),
    ({"op": "w", "id": 1, "region": 1, "off": -1, "n": 4}, "malformed"),
    ({"op": "w", "id": 1, "region": True, "n": 4}, "malformed"),  # a bool is no region number
    ({"op": "n", "id": 1, "region": 1, "moved": 4, "n": 4}, "payload"),  # a notify carries none
    ({"op": "qp", "id": 1, "tc": "express", "info": {}}, "queue-pair"),
    ({"op": "qp", "id": 1, "tc": "bulk", "info": "qpn=1"}, "queue-pair"),
])
def test_a_malformed_header_is_a_protocol_error_naming_it(header, why):
    with pytest.raises(ProtocolError, match=why):
        parse(header)


async def test_a_malformed_header_costs_its_connection_only():
    """The receiver closes the link that sent it; the writer's next write dials afresh and lands."""
    done: list = []
    a, b = make_dataplane("tcp", "a", TOKEN), make_dataplane("tcp", "b", TOKEN, on_complete=done.append)
    await a.start("127.0.0.1")
    await b.start("127.0.0.1")
    try:
        handle = b.register(torch.zeros(4096, dtype=torch.uint8))
        with pytest.raises(TransferError, match="peer lost"):
            await a.ask(("127.0.0.1", b.port), "bulk", {"op": "n", "region": 1, "moved": 4, "n": 4})
        await a.write(torch.ones(16, dtype=torch.uint8), handle, 0, 16, "bulk", notify="after")
        assert done == ["after"]
    finally:
        await a.close()
        await b.close()


async def test_a_plane_without_an_answer_refuses_a_request_and_keeps_the_link():
    done: list = []
    a, b = make_dataplane("shm", "a", TOKEN), make_dataplane("shm", "b", TOKEN, on_complete=done.append)
    await a.start("127.0.0.1")
    await b.start("127.0.0.1")
    try:
        with pytest.raises(TransferError, match="b cannot take an RDMA queue pair: it runs the shm data plane"):
            await a.ask(("127.0.0.1", b.port), "latency", ConnectQp(0, "latency", {"qpn": 1}))
        (link,) = a._links.values()
        handle = b.register(torch.zeros(64, dtype=torch.uint8))
        await a.write(torch.ones(8, dtype=torch.uint8), handle, 0, 8, "latency", notify="kept")
        assert done == ["kept"] and link.alive and list(a._links.values()) == [link]
    finally:
        await a.close()
        await b.close()


async def test_forged_frames_through_ask_use_the_same_wire():
    """``ask`` with a dict sends it as it is (tests forge headers so): the receiver reads it as the
    typed message it spells."""
    seen: list = []
    b = make_dataplane("tcp", "b", TOKEN, on_complete=seen.append)
    a = make_dataplane("tcp", "a", TOKEN)
    await b.start("127.0.0.1")
    try:
        handle = b.register(torch.zeros(64, dtype=torch.uint8))
        note = Notify(0, handle["region"], 0, 0, handle["inc"], notify="forged").to_wire()
        ack = await asyncio.wait_for(a.ask(("127.0.0.1", b.port), "latency", note), 10)
        assert seen == ["forged"] and ack.err is None
        assert pack(note)  # msgpack-able as sent
    finally:
        await a.close()
        await b.close()
