"""The data plane's TCP link: non-blocking sockets on the event loop, one per peer and traffic class.

Every backend keeps one: tcp sends its payload on it; shm, cuda and verbs send their notify frames
(and their fallback writes) on it, and verbs its queue-pair handshake. Frames are framing.py's,
messages wire.py's. A link to a shm plane of this host is a Unix socket instead (shm.py); the
receiving end of a link is dataplane.py's ``_Inbound``.
"""

from __future__ import annotations

import asyncio
import socket

from dualpath.transport.framing import LENGTH, ProtocolError, frame_length, unpack
from dualpath.transport.wire import Ack, parse_ack

HEADER_LIMIT = 1 << 16
_SOCK_BUF = 4 << 20
RECV_SLICE = 256 << 10  # bytes read into a destination per call: one huge copy would hold the event loop
_ACK_READ = 64 << 10  # bytes of acks read at once (an ack is about 10)

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
        # At most RECV_SLICE per call: one huge copy would hold the event loop for a millisecond,
        # and latency-class messages on the other connection would wait behind it.
        n = await loop.sock_recv_into(sock, view[:RECV_SLICE])
        if n == 0:
            raise ConnectionError("peer closed the connection")
        view = view[n:]
        if len(view):  # likewise: data waiting means no suspension, so let the other connections in
            await asyncio.sleep(0)


async def recv_frame(loop: asyncio.AbstractEventLoop, sock: socket.socket, max_frame: int = HEADER_LIMIT):
    """One frame (framing.py) from a non-blocking socket: a header, an ack, a login step."""
    head = bytearray(LENGTH.size)
    await recv_exact(loop, sock, memoryview(head))
    body = bytearray(frame_length(head, max_frame))
    await recv_exact(loop, sock, memoryview(body))
    return unpack(body)


def peer_of(sock: socket.socket) -> str:
    try:
        name = sock.getpeername()
    except OSError:
        return "?"
    if sock.family == socket.AF_UNIX:  # (a connecting Unix socket has no name)
        return "a process of this host"
    return f"{name[0]}:{name[1]}"


def tune(sock: socket.socket) -> None:
    if sock.family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, _SOCK_BUF)


class PeerLink:
    """One outgoing connection (per peer and traffic class) and the messages waiting for acks;
    ``incarnation``: the peer process's, as its login said.

    Acks are read by a callback the event loop keeps registered for the socket (``_on_acks``), not
    by a task awaiting each frame: an ack resolves its write's future in the very callback that
    read it, with no reader registered and removed and no task woken per ack (issue #34)."""

    def __init__(self, sock: socket.socket, incarnation: str | None):
        self.sock, self.incarnation = sock, incarnation
        self.lock = asyncio.Lock()  # one message's frames at a time
        self.pending: dict[int, asyncio.Future[Ack]] = {}
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()
        self._unread = b""  # the start of an ack whose rest has not arrived yet
        self._loop.add_reader(self._fd, self._on_acks)

    async def send(self, *frames: bytes | memoryview) -> None:
        """One message's frames back to back on the stream, no other message's between them. Tried
        at once in one sendmsg, so a small write (header and payload) is one segment, which the
        receiver reads in one callback; what the socket has no room for follows as room comes."""
        async with self.lock:
            try:
                sent = self.sock.sendmsg(frames)
            except (BlockingIOError, InterruptedError):
                sent = 0
            for frame in frames:
                if sent >= len(frame):
                    sent -= len(frame)
                    continue
                await self._loop.sock_sendall(self.sock, memoryview(frame)[sent:])
                sent = 0

    def _on_acks(self) -> None:
        """The socket is readable: every whole ack in it resolves its write (an error ack fails it
        with Refused); an EOF, error or malformed ack ends the link and fails every pending write."""
        try:
            data = self.sock.recv(_ACK_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            return self._lost(TransferError(f"peer lost mid-transfer: {e}"))
        if not data:
            return self._lost(TransferError("peer lost mid-transfer: peer closed the connection"))
        data = self._unread + data if self._unread else data
        pos = 0
        try:
            while len(data) - pos >= LENGTH.size:
                end = pos + LENGTH.size + frame_length(data[pos : pos + LENGTH.size], HEADER_LIMIT)
                if len(data) < end:
                    break
                self._resolve(parse_ack(unpack(data[pos + LENGTH.size : end])))
                pos = end
        except ProtocolError as e:
            return self._lost(TransferError(f"peer lost mid-transfer: {e}"))
        self._unread = data[pos:]

    def _resolve(self, ack: Ack) -> None:
        fut = self.pending.pop(ack.id, None)
        if fut is not None and not fut.done():
            if ack.err:
                fut.set_exception(Refused(ack.err))
            else:
                fut.set_result(ack)

    def _lost(self, err: Exception) -> None:
        """Close the link; every write still waiting for its ack fails with err."""
        if not self.closed:
            self.closed = True
            self._loop.remove_reader(self._fd)  # (before the close: the descriptor may be reused)
            self.sock.close()
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(err)
        self.pending.clear()

    @property
    def alive(self) -> bool:
        return not self.closed

    def close(self) -> None:
        self._lost(TransferError("peer lost"))
