"""The data plane's TCP link: non-blocking sockets on the event loop, one per peer and traffic class.

Every backend keeps one: tcp sends its payload on it; shm, cuda and verbs send their notify frames
(and their fallback writes) on it, and verbs its queue-pair handshake. Frames are framing.py's,
messages wire.py's.
"""

from __future__ import annotations

import asyncio
import socket

from dualpath.transport.framing import LENGTH, ProtocolError, frame_length, unpack
from dualpath.transport.wire import Ack, parse_ack

HEADER_LIMIT = 1 << 16
_SOCK_BUF = 4 << 20
_RECV_SLICE = 256 << 10

# Each traffic class's connections carry a DSCP mark in their IP header (EF for latency, CS1, "lower
# effort", for bulk), so a link that schedules by class (a switch's priority queues, or tc on a
# host, as bench/netns.py sets up) sends a handoff ahead of queued path-B bytes: the role InfiniBand
# virtual lanes play in the paper, on any IP network.
DSCP_TOS = {"latency": 46 << 2, "bulk": 8 << 2}


class TransferError(ConnectionError):
    """A write failed: refused by the peer (bad handle, out of range) or the peer was lost."""


class Refused(TransferError):
    """The peer answered, and said no (its Ack's err): the link itself is fine."""


async def recv_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview) -> None:
    while len(view):
        # At most _RECV_SLICE per call: one huge copy would hold the event loop for a millisecond,
        # and latency-class messages on the other connection would wait behind it.
        n = await loop.sock_recv_into(sock, view[:_RECV_SLICE])
        if n == 0:
            raise ConnectionError("peer closed the connection")
        view = view[n:]
        if len(view):  # likewise: data waiting means no suspension, so let the other connections in
            await asyncio.sleep(0)


async def discard(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int, scratch: memoryview) -> None:
    """Read and drop n payload bytes (of a refused write), so the stream stays in step."""
    while n:
        k = min(n, len(scratch))
        await recv_exact(loop, sock, scratch[:k])
        n -= k


async def recv_frame(loop: asyncio.AbstractEventLoop, sock: socket.socket, max_frame: int = HEADER_LIMIT):
    """One frame (framing.py) from a non-blocking socket: a header, an ack, a login step."""
    head = bytearray(LENGTH.size)
    await recv_exact(loop, sock, memoryview(head))
    body = bytearray(frame_length(head, max_frame))
    await recv_exact(loop, sock, memoryview(body))
    return unpack(body)


def peer_of(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


def tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, _SOCK_BUF)


class PeerLink:
    """One outgoing connection (per peer and traffic class) and the messages waiting for acks;
    ``incarnation``: the peer process's, as its login said."""

    def __init__(self, sock: socket.socket, incarnation: str | None):
        self.sock, self.incarnation = sock, incarnation
        self.lock = asyncio.Lock()  # one message's frames at a time
        self.pending: dict[int, asyncio.Future[Ack]] = {}
        self.closed = False
        self.reader = asyncio.create_task(self._read_acks())

    async def _read_acks(self) -> None:
        loop = asyncio.get_running_loop()
        err: Exception = TransferError("peer lost")
        try:
            while True:
                ack = parse_ack(await recv_frame(loop, self.sock))
                fut = self.pending.pop(ack.id, None)
                if fut is not None and not fut.done():
                    if ack.err:
                        fut.set_exception(Refused(ack.err))
                    else:
                        fut.set_result(ack)
        except (ConnectionError, OSError, ProtocolError, asyncio.IncompleteReadError) as e:
            err = TransferError(f"peer lost mid-transfer: {e}")
        finally:
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(err)
            self.pending.clear()
            self.sock.close()

    @property
    def alive(self) -> bool:
        return not self.closed and not self.reader.done()

    def close(self) -> None:
        self.closed = True
        self.reader.cancel()
        self.sock.close()
