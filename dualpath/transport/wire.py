"""The data plane's own messages: what a writer sends on its link to a peer's data plane, and the ack.

Every message is one frame (framing.py) whose map has an ``op`` naming its kind and an ``id`` the
ack repeats. A writer sends, on the link of a traffic class (dataplane.py):

    WriteChunk  op "w"   a piece of a write: this header, then `n` payload bytes into the region
    Notify      op "n"   the bytes (`moved` of them) went another way (a shm copy, CUDA IPC, RDMA):
                         check their range and grant, wait for them (``event``), fire on_complete
    ConnectQp   op "qp"  a verbs writer's request for a queue pair to connect its own to

and the receiver answers each write (its last chunk) and notify, and every request, with an Ack:
``{"id"}``, ``{"id", "err"}`` (refused; the link stays usable) or ``{"id", "answer"}``.

The short op strings stay on the wire (one byte per header matters for small writes); code names
them through ``Op``. ``parse`` is the one place a header from a peer is checked: the peer proved
the secret, but one bad frame must cost its connection only (ProtocolError), not a traceback.

No torch here, as in framing.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from dualpath.transport.framing import ProtocolError

TRAFFIC_CLASSES = ("latency", "bulk")


class Op:
    """The ``op`` of each data-plane message on the wire."""

    WRITE = "w"
    NOTIFY = "n"
    CONNECT_QP = "qp"


def _count(v: Any) -> bool:
    """A byte count or offset: an int >= 0 (msgpack gives bools for true/false, which are ints too)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


@dataclass(frozen=True)
class WriteChunk:
    """Bytes [off, off + n) of region `region` of incarnation `inc` follow this header. Only the last
    chunk of a write carries `notify` and is acked. grant: the grant id a granted_only region needs."""

    op: ClassVar[str] = Op.WRITE
    id: int
    region: int
    off: int
    n: int
    inc: Any  # the receiver's incarnation as the writer's handle names it; checked by the receiver
    grant: Any = None
    last: bool = True
    notify: Any = None

    def to_wire(self) -> dict:
        return {"op": self.op, "id": self.id, "region": self.region, "grant": self.grant, "off": self.off,
                "n": self.n, "last": self.last, "notify": self.notify, "inc": self.inc}


@dataclass(frozen=True)
class Notify:
    """`moved` bytes from `off` of region `region` were put in place by the writer itself; once they
    have landed (``event``: what the backend waits on, e.g. a CUDA IPC event or an RDMA sequence
    number) the receiver fires on_complete(notify). Their whole range is checked against the grant."""

    op: ClassVar[str] = Op.NOTIFY
    id: int
    region: int
    off: int
    moved: int
    inc: Any
    grant: Any = None
    notify: Any = None
    event: Any = None
    last: ClassVar[bool] = True  # a notify is one frame

    def to_wire(self) -> dict:
        out = {"op": self.op, "id": self.id, "region": self.region, "grant": self.grant, "off": self.off,
               "moved": self.moved, "notify": self.notify, "inc": self.inc}
        if self.event is not None:
            out["event"] = self.event
        return out


@dataclass(frozen=True)
class ConnectQp:
    """A writer's RDMA queue pair (`info`: its number, LID, GID, MTU) wants one of the receiver's,
    for traffic class `tc`; the Ack's answer is the receiver's (verbs.py)."""

    op: ClassVar[str] = Op.CONNECT_QP
    what: ClassVar[str] = "an RDMA queue pair"  # for a refusal: "<plane> cannot take an RDMA queue pair"
    id: int
    tc: str
    info: dict = field(default_factory=dict)

    def to_wire(self) -> dict:
        return {"op": self.op, "id": self.id, "tc": self.tc, "info": self.info}


Landing = WriteChunk | Notify  # the messages that put bytes in a region (and fire on_complete)
Request = ConnectQp  # the messages answered with a value rather than a landing


@dataclass(frozen=True)
class Ack:
    """The receiver's answer to message `id`: err if refused, answer for a request."""

    id: int
    err: str | None = None
    answer: dict | None = None

    def to_wire(self) -> dict:
        out: dict = {"id": self.id}
        if self.err is not None:
            out["err"] = self.err
        if self.answer is not None:
            out["answer"] = self.answer
        return out


def parse(msg: Any) -> Landing | Request:
    """The typed message a header frame from a peer carries; ProtocolError naming what is wrong."""
    if not isinstance(msg, dict) or not isinstance(msg.get("id"), int):
        raise ProtocolError(f"malformed data-plane header: {str(msg)[:200]}")
    op = msg.get("op")
    if op == Op.CONNECT_QP:
        if not isinstance(msg.get("info"), dict) or msg.get("tc") not in TRAFFIC_CLASSES:
            raise ProtocolError(f"malformed queue-pair request: {str(msg)[:200]}")
        return ConnectQp(msg["id"], msg["tc"], msg["info"])
    if op not in (Op.WRITE, Op.NOTIFY):
        raise ProtocolError(f"unknown data-plane op {op!r}")
    region, off, n, moved = msg.get("region"), msg.get("off", 0), msg.get("n", 0), msg.get("moved", 0)
    if not (_count(region) and _count(off) and _count(n) and _count(moved)):  # (no generator: once per write)
        raise ProtocolError(f"malformed data-plane header: {str(msg)[:200]}")
    if op == Op.WRITE:
        return WriteChunk(msg["id"], region, off, n, msg.get("inc"), msg.get("grant"), bool(msg.get("last", True)),
                          msg.get("notify"))
    if n:  # a notify carries no payload: bytes after it would put the stream out of step
        raise ProtocolError(f"a notify header announcing {n} payload bytes")
    return Notify(msg["id"], region, off, moved, msg.get("inc"), msg.get("grant"), msg.get("notify"), msg.get("event"))


def parse_ack(msg: Any) -> Ack:
    if not isinstance(msg, dict) or not isinstance(msg.get("id"), int):
        raise ProtocolError(f"malformed data-plane ack: {str(msg)[:200]}")
    err, answer = msg.get("err"), msg.get("answer")
    return Ack(msg["id"], str(err) if err else None, answer if isinstance(answer, dict) else None)
