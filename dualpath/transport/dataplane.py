"""The data plane: one-sided, RDMA-style writes of KV bytes between engines.

    handle = dp.register(tensor)        # a serialisable descriptor of a local buffer
    await dp.write(src, handle, offset, nbytes, "bulk", notify=...)   # on the peer: bytes land in
                                                                        # place, then on_complete(notify)

``TcpDataPlane`` is the backend that always works. Its receiver reads a write's payload straight
into the registered destination (``sock_recv_into`` on a memoryview of the region: no
intermediate copy) and reports completion only once every byte is in place, so a half-written
destination is never reported complete. ``CudaDataPlane`` (cuda.py) and ``VerbsDataPlane``
(verbs.py) reuse its connections for completions and move the bytes their own way.

Incarnations: every plane has one (framing.py; an engine passes its own), named in each handle it
registers and in its logins. A writer learns the incarnation at an address from the login of its
link there; a handle naming another one belongs to a process that is gone (an engine restarted on
the same address) and is refused (``StaleIncarnation``), and what the writer kept for the old one
(links; the shm mappings, CUDA IPC handles and verbs queue pairs of the other backends) is dropped
(``_peer_restarted``). The receiver refuses a write or notify naming an incarnation other than its
own, and grants are bound to the writer's name and incarnation (``Grant``).

Traffic classes: ``latency`` (PE→DE handoff, control-sized messages) and ``bulk`` (path-B KV
loading) use separate connections. Bulk is sent in chunks and, while latency traffic is in flight
from this process, waits between chunks so latency traffic keeps ``latency_share`` of the link
(the paper reserves 99% through InfiniBand virtual lanes; this is the TCP analogue).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import socket
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch

from dualpath.transport.framing import (LENGTH, LOGIN_MAX_FRAME, Login, MalformedLogin, ProtocolError, answer,
                                        challenge, frame_length, new_incarnation, pack, server_incarnation, unpack,
                                        verify)

log = logging.getLogger(__name__)
TRAFFIC_CLASSES = ("latency", "bulk")
_HEADER_LIMIT = 1 << 16
_SOCK_BUF = 4 << 20
_RECV_SLICE = 256 << 10


class TransferError(ConnectionError):
    """A write failed: refused by the peer (bad handle, out of range) or the peer was lost."""


class StaleIncarnation(TransferError):
    """The handle belongs to an earlier incarnation of the engine at its address (it restarted)."""


@dataclass
class Region:
    id: int
    tensor: torch.Tensor  # 1-D uint8
    view: memoryview | None  # host regions only
    granted_only: bool = False  # writes need a grant (below) that covers them


@dataclass
class Grant:
    """Leave for one peer to write bytes [lo, hi) of one region, for one request (like an RDMA
    memory window): an engine's DRAM buffer takes writes only into runs granted to their writer,
    and the grant is revoked when the request ends. Its id is random (not guessable by counting)
    and it is bound to the writer's name and incarnation: given at grant time, or else taken from
    the first write through it, so a restarted writer (or another process logged in under its
    name) cannot use it."""

    region: int
    lo: int
    hi: int
    peer: str
    peer_incarnation: str | None = None

    def admits(self, region_id: int, lo: int, hi: int, writer: Login) -> bool:
        if self.region != region_id or self.peer != writer.name or not self.lo <= lo <= hi <= self.hi:
            return False
        if self.peer_incarnation is None:  # the first write binds it to its writer's incarnation
            self.peer_incarnation = writer.incarnation
        return self.peer_incarnation == writer.incarnation


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (no copy)."""
    assert t.is_contiguous(), "registered/sent tensors must be contiguous"
    return t.view(-1).view(torch.uint8) if t.dtype != torch.uint8 else t.view(-1)


def host_view(t: torch.Tensor) -> memoryview:
    return memoryview(as_bytes(t).numpy())


async def _recv_exact(loop, sock: socket.socket, view: memoryview) -> None:
    while len(view):
        # At most _RECV_SLICE per call: one huge copy would hold the event loop for a millisecond,
        # and latency-class messages on the other connection would wait behind it.
        n = await loop.sock_recv_into(sock, view[:_RECV_SLICE])
        if n == 0:
            raise ConnectionError("peer closed the connection")
        view = view[n:]
        if len(view):  # likewise: data waiting means no suspension, so let the other connections in
            await asyncio.sleep(0)


async def _recv_frame(loop, sock: socket.socket, max_frame: int = _HEADER_LIMIT) -> dict:
    """One frame (framing.py) from a non-blocking socket: a write's header, an ack, a login step."""
    head = bytearray(LENGTH.size)
    await _recv_exact(loop, sock, memoryview(head))
    body = bytearray(frame_length(head, max_frame))
    await _recv_exact(loop, sock, memoryview(body))
    return unpack(body)


# Each traffic class's connections carry a DSCP mark in their IP header (EF for latency, CS1, "lower
# effort", for bulk), so a link that schedules by class (a switch's priority queues, or tc on a
# host, as bench/netns.py sets up) sends a handoff ahead of queued path-B bytes: the role InfiniBand
# virtual lanes play in the paper, on any IP network.
DSCP_TOS = {"latency": 46 << 2, "bulk": 8 << 2}


def _peer_of(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


def _well_formed(msg: Any) -> bool:
    """A data-plane header has the fields and types the receiver relies on (it comes from a peer
    that proved the secret, but one bad frame must cost its connection only, not a traceback)."""
    if not isinstance(msg, dict) or msg.get("op") not in ("w", "n", "qp") or not isinstance(msg.get("id"), int):
        return False
    if msg["op"] == "qp":
        return isinstance(msg.get("info"), dict) and msg.get("tc") in TRAFFIC_CLASSES
    ints = [msg.get("region"), msg.get("off", 0), msg.get("n", 0), msg.get("moved", 0)]
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints)


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, _SOCK_BUF)


def check_write(dst: dict, dst_offset: int, nbytes: int, traffic_class: str) -> None:
    """What every backend refuses before moving a byte: an unknown class, a range outside the handle."""
    if traffic_class not in TRAFFIC_CLASSES:
        raise ValueError(f"traffic_class {traffic_class!r}: expected one of {TRAFFIC_CLASSES}")
    if dst_offset < 0 or ("nbytes" in dst and dst_offset + nbytes > dst["nbytes"]):
        raise TransferError(f"write [{dst_offset}, {dst_offset + nbytes}) outside the "
                            f"{dst.get('nbytes')}-byte destination")


class _PeerLink:
    """One outgoing connection (per peer and traffic class) and the writes waiting for acks;
    ``incarnation``: the peer process's, as its login said."""

    def __init__(self, sock: socket.socket, incarnation: str | None):
        self.sock, self.incarnation = sock, incarnation
        self.lock = asyncio.Lock()
        self.pending: dict[int, asyncio.Future] = {}
        self.closed = False
        self.reader = asyncio.create_task(self._read_acks())

    async def _read_acks(self) -> None:
        loop = asyncio.get_running_loop()
        err: Exception = TransferError("peer lost")
        try:
            while True:
                ack = await _recv_frame(loop, self.sock)
                fut = self.pending.pop(ack["id"], None)
                if fut is not None and not fut.done():
                    if ack.get("err"):
                        fut.set_exception(TransferError(ack["err"]))
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


class TcpDataPlane:
    backend = "tcp"

    def __init__(self, name: str, token: str, on_complete: Callable[[Any], None] | None = None,
                 bulk_chunk_bytes: int = 256 << 10, latency_share: float = 0.99, host: str = "127.0.0.1",
                 device: torch.device | str = "cpu", incarnation: str | None = None):
        self.name, self.token, self.on_complete = name, token, on_complete or (lambda notify: None)
        self.incarnation = incarnation or new_incarnation()  # the owning engine's (one per process life)
        self.device = torch.device(device)  # the owning engine's: threads we start make it current
        self.chunk, self.latency_share, self.host = bulk_chunk_bytes, latency_share, host
        self.port = 0
        self.regions: dict[int, Region] = {}
        self.grants: dict[str, Grant] = {}
        self._region_ids = itertools.count(1)
        self._write_ids = itertools.count(1)
        self._links: dict[tuple[str, int, str], _PeerLink] = {}
        self._link_locks: dict[tuple[str, int, str], asyncio.Lock] = {}
        # Writing side: the incarnation last met at each peer address, and those known to be gone.
        self._peer_incarnations: dict[tuple[str, int], str | None] = {}
        self._gone: set[tuple[tuple[str, int], str]] = set()
        # Receiving side: live data connections per writer login, and every incarnation seen per name.
        self._writers: Counter[Login] = Counter()
        self._writer_incarnations: dict[str, set[str | None]] = {}
        self._latency_inflight = 0
        self._latency_idle = asyncio.Event()
        self._latency_idle.set()
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task] = set()
        self.bytes_received = 0
        self.sent_bytes: Counter[str] = Counter()  # by traffic class, acknowledged writes only
        self.refused = 0  # logins and writes refused
        self.malformed = 0  # of those, logins of the wrong shape (framing.MalformedLogin)

    # -- registration --

    def register(self, tensor: torch.Tensor, share_path: str | None = None, granted_only: bool = False) -> dict:
        """share_path: where another process of this host can map the (host) tensor; the cuda
        backend copies into such regions directly, tcp always sends over its socket. A
        granted_only region takes writes only through a grant (``grant``)."""
        flat = as_bytes(tensor)
        region_id = next(self._region_ids)
        view = host_view(flat) if flat.device.type == "cpu" else None
        self.regions[region_id] = Region(region_id, flat, view, granted_only)
        return {"backend": self.backend, "addr": [self.host, self.port], "region": region_id, "nbytes": flat.numel(),
                "device": str(flat.device), "inc": self.incarnation}

    def release(self, handle: dict) -> None:
        self.regions.pop(handle["region"], None)

    def links(self) -> dict[str, str]:
        """The backend carrying each peer link ("host:port" -> backend), for the load report."""
        return {f"{h}:{p}": "tcp" for h, p, _ in self._links}

    def grant(self, handle: dict, offset: int, nbytes: int, peer: str, peer_incarnation: str | None = None) -> dict:
        """A handle through which only `peer` may write bytes [offset, offset + nbytes) of the region:
        only the incarnation of `peer` given here or, if None, the one that writes through it first."""
        gid = secrets.token_urlsafe(16)  # 128 random bits: found by no one who was not given it
        self.grants[gid] = Grant(handle["region"], offset, offset + nbytes, peer, peer_incarnation)
        return {**handle, "grant": gid}

    def revoke(self, granted: dict) -> None:
        gid = granted.get("grant")
        if isinstance(gid, str):
            self.grants.pop(gid, None)

    def _check(self, region_id: int, off: int, n: int, need_host: bool = True, grant: Any = None,
               peer: Login | None = None) -> Region:
        region = self.regions.get(region_id)
        if region is None:
            raise TransferError(f"unknown or released region {region_id} on {self.name}")
        if off < 0 or n < 0 or off + n > region.tensor.numel():
            raise TransferError(f"write [{off}, {off + n}) outside region {region_id} of {region.tensor.numel()} bytes")
        if need_host and region.view is None:
            raise TransferError(f"region {region_id} is device memory; the tcp backend writes host memory only")
        if region.granted_only:
            g = self.grants.get(grant) if isinstance(grant, str) else None
            if g is None or peer is None or not g.admits(region_id, off, off + n, peer):
                who = f"{peer.name} (incarnation {peer.incarnation})" if peer else "an unknown writer"
                raise TransferError(f"{who} holds no grant for bytes [{off}, {off + n}) of region {region_id} on "
                                    f"{self.name} (unknown, revoked, another peer's or incarnation's, or out of "
                                    "its range)")
        return region

    def _check_incarnation(self, named: Any) -> None:
        """A write or notify must name our incarnation: a handle of the process that was here before
        us (same address, same region numbers) is not a handle of ours."""
        if named != self.incarnation:
            raise TransferError(f"the write names incarnation {named!r} of {self.name}, which now runs incarnation "
                                f"{self.incarnation}: its handle is of an engine that has restarted since")

    def _writer_logged_in(self, writer: Login) -> None:
        """A writer's data connection is up. Incarnations of the same name without a live connection
        are gone (the engine restarted): their grants are dropped (bound to them, they could never be
        used again anyway), and so is what a subclass kept for them (``_writer_restarted``). An old
        incarnation that is still connected is left alone: a newcomer cannot revoke a live peer's grants."""
        self._writers[writer] += 1
        seen = self._writer_incarnations.setdefault(writer.name, set())
        seen.add(writer.incarnation)
        for old in [i for i in seen if i != writer.incarnation and not self._writers[Login(writer.name, i)]]:
            seen.discard(old)
            dropped = [gid for gid, g in self.grants.items() if g.peer == writer.name and g.peer_incarnation == old]
            for gid in dropped:
                del self.grants[gid]
            log.info("%s: %s is a new incarnation (%s, was %s): %d grant(s) of the old one dropped", self.name,
                     writer.name, writer.incarnation, old, len(dropped))
            self._writer_restarted(writer.name, old)

    def _writer_restarted(self, name: str, old_incarnation: str | None) -> None:
        """Drop what we keep for a writer's earlier incarnation (the cuda and verbs planes keep some)."""

    # -- receiving side --

    async def start(self, host: str | None = None, port: int = 0) -> int:
        self.host = host or self.host
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, port))
        sock.listen(64)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._listener = sock
        self._accept_task = asyncio.create_task(self._accept_loop())
        return self.port

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            conn.setblocking(False)
            _tune(conn)
            t = asyncio.create_task(self._serve(conn))
            self._conns.add(t)
            t.add_done_callback(self._conns.discard)

    async def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        writer: Login | None = None
        try:
            nonce, first = challenge(self.incarnation)
            await loop.sock_sendall(sock, first)
            try:
                hello = await asyncio.wait_for(_recv_frame(loop, sock, LOGIN_MAX_FRAME), 10)
                # proved with the secret: grants are checked against this name and incarnation
                login = verify(self.token, nonce, hello, need_incarnation=True)
            except ProtocolError as e:  # one line per refusal, never a traceback
                self.refused += 1
                self.malformed += isinstance(e, MalformedLogin)
                log.warning("%s: refused data connection from %s: %s", self.name, _peer_of(sock), e)
                await loop.sock_sendall(sock, pack({"ok": False, "error": str(e)}))
                return
            await loop.sock_sendall(sock, pack({"ok": True}))
            writer = login
            self._writer_logged_in(writer)
            scratch = memoryview(bytearray(1 << 20))
            while True:
                msg = await _recv_frame(loop, sock)
                if not _well_formed(msg):
                    raise ProtocolError(f"malformed data-plane header from {writer.name}: {str(msg)[:200]}")
                if msg["op"] == "qp":  # a verbs writer's queue-pair handshake (verbs.py)
                    try:
                        reply = {"id": msg["id"], "qp": self.accept_qp(msg["info"], msg["tc"], writer)}
                    except Exception as e:
                        reply = {"id": msg["id"], "err": f"{self.name} cannot take an RDMA queue pair: {e}"}
                    await loop.sock_sendall(sock, pack(reply))
                    continue
                n = msg.get("n", 0)
                try:
                    self._check_incarnation(msg.get("inc"))
                    # a notify ("n") stands for bytes the writer moved itself: check their whole range
                    span = n if msg["op"] == "w" else msg.get("moved", 0)
                    region = self._check(msg["region"], msg.get("off", 0), span, need_host=msg["op"] == "w",
                                         grant=msg.get("grant"), peer=writer)
                except TransferError as e:
                    self.refused += 1
                    while n:  # drain the payload so the stream stays in step
                        k = min(n, len(scratch))
                        await _recv_exact(loop, sock, scratch[:k])
                        n -= k
                    await loop.sock_sendall(sock, pack({"id": msg["id"], "err": str(e)}))
                    continue
                if msg["op"] == "w" and n:
                    await _recv_exact(loop, sock, region.view[msg["off"] : msg["off"] + n])
                    self.bytes_received += n
                if msg.get("last", True):
                    await self._landed(msg, writer)
                    self.on_complete(msg.get("notify"))  # every byte is in place
                    await loop.sock_sendall(sock, pack({"id": msg["id"]}))
        except ProtocolError as e:
            log.warning("%s: closed a data connection from %s: %s", self.name, _peer_of(sock), e)
        except (ConnectionError, OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            pass  # the peer went away; nothing half-written was reported complete
        finally:
            if writer is not None:
                self._writers[writer] -= 1
                if not self._writers[writer]:
                    del self._writers[writer]
            sock.close()

    async def _landed(self, msg: dict, writer: Login) -> None:
        """Return once the bytes of the write that `msg` ends are in place. Over tcp they came in the
        frames themselves; the cuda plane waits for the writer's copy (cuda.py)."""

    def accept_qp(self, info: dict, traffic_class: str, writer: Login) -> dict:
        """A peer's RDMA queue pair wants one of ours (verbs.py overrides this)."""
        raise TransferError(f"{self.name} runs the {self.backend} data plane, without an RDMA device")

    # -- sending side --

    async def ask(self, addr: tuple[str, int], traffic_class: str, msg: dict, timeout: float = 10.0) -> dict:
        """A request on the data-plane link to the peer at addr; returns its reply frame."""
        link = await self._link(tuple(addr), traffic_class)
        wid = next(self._write_ids)
        fut = link.pending[wid] = asyncio.get_running_loop().create_future()
        try:
            async with link.lock:
                await asyncio.get_running_loop().sock_sendall(link.sock, pack({**msg, "id": wid}))
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise TransferError(f"{addr} did not answer {msg.get('op')!r} within {timeout}s") from None
        finally:
            link.pending.pop(wid, None)

    async def _link(self, addr: tuple[str, int], tc: str) -> _PeerLink:
        """Our live link to addr for class tc, connecting if there is none."""
        key = (addr[0], addr[1], tc)
        async with self._link_locks.setdefault(key, asyncio.Lock()):
            link = self._links.get(key)
            if link is None or not link.alive:
                link = self._links[key] = await self._dial(addr, tc)
                self._met(addr, link.incarnation)
            return link

    async def _dial(self, addr: tuple[str, int], tc: str) -> _PeerLink:
        """A new, logged-in connection to the data plane at addr (not yet one of our links)."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        _tune(sock)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, DSCP_TOS[tc])
        try:
            await asyncio.wait_for(loop.sock_connect(sock, addr), 5)
            first = await asyncio.wait_for(_recv_frame(loop, sock, LOGIN_MAX_FRAME), 5)
            await loop.sock_sendall(sock, answer(self.token, self.name, first, self.incarnation))
            theirs = server_incarnation(first)
            reply = await asyncio.wait_for(_recv_frame(loop, sock, LOGIN_MAX_FRAME), 5)
            if not isinstance(reply, dict) or not reply.get("ok"):
                why = reply.get("error") if isinstance(reply, dict) else reply
                raise TransferError(f"{addr} refused the data connection: {why}")
        except (OSError, asyncio.TimeoutError, ProtocolError, ConnectionError) as e:
            sock.close()
            raise TransferError(f"cannot reach data plane at {addr[0]}:{addr[1]}: {e}") from e
        return _PeerLink(sock, theirs)

    def _met(self, addr: tuple[str, int], incarnation: str | None) -> None:
        """A login at addr named `incarnation`. If the last one there named another, that process is
        gone (one address, one process at a time): forget what we kept for it."""
        old = self._peer_incarnations.get(addr, incarnation)
        self._peer_incarnations[addr] = incarnation
        if old != incarnation:
            if old is not None:
                self._gone.add((addr, old))
            log.info("%s: the engine at %s:%d is a new incarnation (%s, was %s); dropping what we kept for the "
                     "old one", self.name, addr[0], addr[1], incarnation, old)
            self._peer_restarted(addr, incarnation)

    def _peer_restarted(self, addr: tuple[str, int], incarnation: str | None) -> None:
        """The process at addr is now `incarnation`: close links to an earlier one (subclasses drop
        their mappings, opened IPC handles and queue pairs too)."""
        for key, link in list(self._links.items()):
            if key[:2] == addr and link.incarnation != incarnation:
                link.close()
                del self._links[key]

    async def _link_to(self, dst: dict, tc: str) -> _PeerLink:
        """Our link to the peer that registered `dst`, checked to be that very process: StaleIncarnation
        if the handle names an incarnation that no longer runs at its address. Every backend calls
        this before it moves a byte (shm, cuda and verbs before touching the peer's memory)."""
        addr, named = tuple(dst["addr"]), dst.get("inc")
        if not isinstance(named, str):
            raise TransferError(f"the handle of {addr} names no incarnation (a handle made by an older version?)")
        if (addr, named) in self._gone:
            raise self._stale(addr, named)
        link = await self._link(addr, tc)
        if link.incarnation != named:
            # The handle may be newer than our link: a restart whose close we have not read yet. Ask the
            # address afresh; keep our link if it is still current (writes under way on it stay).
            fresh = await self._dial(addr, tc)
            if fresh.incarnation != named:
                fresh.close()
                self._gone.add((addr, named))
                raise self._stale(addr, named)
            key = (addr[0], addr[1], tc)
            async with self._link_locks.setdefault(key, asyncio.Lock()):
                link.close()  # to the process that was there before
                self._links[key] = link = fresh
                self._met(addr, fresh.incarnation)
        return link

    def _stale(self, addr: tuple[str, int], named: str) -> StaleIncarnation:
        now = self._peer_incarnations.get(addr)
        return StaleIncarnation(f"the handle names incarnation {named} of the engine at {addr[0]}:{addr[1]}, which "
                                f"now runs incarnation {now} (it restarted): the handle, its grant and anything "
                                "mapped through it are of a process that is gone")

    async def _yield_to_latency(self, chunk_seconds: float) -> None:
        """Between bulk chunks: while latency traffic is in flight, hold back long enough that bulk
        uses at most (1 - latency_share) of the link."""
        if self._latency_inflight:
            pause = chunk_seconds * self.latency_share / (1.0 - self.latency_share)
            try:
                await asyncio.wait_for(self._latency_idle.wait(), pause)
            except asyncio.TimeoutError:
                pass
        else:
            # sock_sendall returns without suspending while the socket has room: yield, so that a
            # latency write that is about to start is not held behind a run of bulk chunks.
            await asyncio.sleep(0)

    async def _send(self, src: memoryview, dst: dict, off: int, tc: str, notify: Any, op: str,
                    timeout: float, landed_event: Any = None, moved: int | None = None) -> None:
        """Send a write's frames (op "w": header and bytes) or a notify-only frame (op "n", after the
        bytes went another way: `moved` of them) and wait for the peer's ack."""
        link = await self._link_to(dst, tc)
        loop = asyncio.get_running_loop()
        wid = next(self._write_ids)
        fut = loop.create_future()
        link.pending[wid] = fut
        n = len(src)
        step = self.chunk if tc == "bulk" else max(n, 1)
        pos = 0
        try:
            while True:
                k = min(step, n - pos)
                last = pos + k >= n
                header = {"op": op, "id": wid, "region": dst["region"], "grant": dst.get("grant"), "off": off + pos,
                          "n": k if op == "w" else 0, "last": last, "notify": notify if last else None,
                          "inc": dst["inc"]}
                if op == "n":  # the bytes went another way: their range still has to be within a grant
                    header["moved"] = moved or 0
                if last and landed_event is not None:
                    header["event"] = landed_event
                t0 = time.perf_counter()
                async with link.lock:
                    await loop.sock_sendall(link.sock, pack(header))
                    if k and op == "w":
                        await loop.sock_sendall(link.sock, src[pos : pos + k])
                pos += k
                if last:
                    break
                if tc == "bulk":
                    await self._yield_to_latency(time.perf_counter() - t0)
            await asyncio.wait_for(fut, timeout)
            self.sent_bytes[tc] += n if moved is None else moved
        except TransferError:  # refused by the peer (bad handle/range): the link itself is fine
            raise
        except (OSError, ConnectionError) as e:
            link.close()
            raise TransferError(f"write to {dst['addr']} failed: {e}") from e
        except asyncio.TimeoutError:
            link.close()
            raise TransferError(f"write to {dst['addr']} not acknowledged within {timeout}s") from None
        finally:
            link.pending.pop(wid, None)

    async def write(self, src: torch.Tensor | memoryview, dst: dict, dst_offset: int, nbytes: int,
                    traffic_class: str = "bulk", notify: Any = None, timeout: float = 60.0) -> None:
        """Write nbytes from src into the peer's region dst at dst_offset; returns once the bytes are
        in place on the peer and its on_complete(notify) has run."""
        check_write(dst, dst_offset, nbytes, traffic_class)
        view = self._source_view(src, nbytes)
        if traffic_class == "latency":
            self._latency_inflight += 1
            self._latency_idle.clear()
        try:
            await self._send(view, dst, dst_offset, traffic_class, notify, "w", timeout)
        finally:
            if traffic_class == "latency":
                self._latency_inflight -= 1
                if not self._latency_inflight:
                    self._latency_idle.set()

    def _source_view(self, src: torch.Tensor | memoryview, nbytes: int) -> memoryview:
        if isinstance(src, torch.Tensor):
            flat = as_bytes(src)
            if flat.device.type != "cpu":  # tcp moves host bytes: stage device data through host memory
                flat = flat[:nbytes].cpu()
            src = memoryview(flat.numpy())
        src = memoryview(src).cast("B") if not isinstance(src, memoryview) else src.cast("B")
        if len(src) < nbytes:
            raise ValueError(f"source has {len(src)} bytes, {nbytes} requested")
        return src[:nbytes]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in [getattr(self, "_accept_task", None), *self._conns]:
            if t is not None:
                t.cancel()
        for link in self._links.values():
            link.close()
        if hasattr(self, "_listener"):
            self._listener.close()
