"""The data plane: one-sided, RDMA-style writes of KV bytes between engines.

    handle = dp.register(tensor)        # a serialisable descriptor of a local buffer
    granted = dp.grant(handle, off, n, peer="pe0")      # leave for one writer to write [off, off + n)
    await dp.write(src, granted, off, n, "bulk", notify=...)   # on the peer: bytes land in place,
                                                                 # then its on_complete(notify) runs
    dp.revoke(granted); dp.release(handle); dp.links(); dp.backend; await dp.close()

``DataPlane`` names that interface and holds what every backend shares; the backends implement it
side by side, each moving the bytes its own way:

    tcp.py    TcpDataPlane    payload frames on the link below (the backend that always works)
    shm.py    ShmDataPlane    one memory copy into a same-host peer's mapped DRAM buffer
    cuda.py   CudaDataPlane   CUDA IPC copies into a peer's GPU memory; host regions as shm does
    verbs.py  VerbsDataPlane  RDMA WRITE WITH IMMEDIATE into a peer's registered memory

What they share, here: regions and grants (the receiving side's checks), logins and incarnations
(both sides), and the TCP link (link.py) with its messages (wire.py). Every backend needs the link:
the receiver's completion fires on a frame from it (a write's last chunk, or a notify after bytes
moved another way), a peer of another host is reached only through it, and a receiver takes
payload writes on it whatever its own backend (a shm engine from one of another host).

The receiver reads a connection with the event loop's own callbacks (``_Inbound``): a small
write's header and payload, usually one segment, are placed, completed and acked in the callback
that read them; a larger payload is read straight into the registered destination (a memoryview of
the region: no intermediate copy). It reports completion only once every byte is in place, so a
half-written destination is never reported complete. The writer's acks are read the same way
(link.py's PeerLink): a small write costs one turn of each side's loop, not a task per frame.

Incarnations: every plane has one (framing.py; an engine passes its own), named in each handle it
registers and in its logins. A writer learns the incarnation at an address from the login of its
link there; a handle naming another one belongs to a process that is gone (an engine restarted on
the same address) and is refused (``StaleIncarnation``), and what the writer kept for the old one
(links; the shm mappings, CUDA IPC handles and verbs queue pairs of the backends) is dropped
(``_peer_restarted``). The receiver refuses a write or notify naming an incarnation other than its
own, and grants are bound to the writer's name and incarnation (``Grant``).

Traffic classes: ``latency`` (PE→DE handoff, control-sized messages) and ``bulk`` (path-B KV
loading) use separate connections. Bulk is sent in chunks and, while latency traffic is in flight
from this process, waits between chunks so latency traffic keeps ``latency_share`` of the link
(the paper reserves 99% through InfiniBand virtual lanes; this is the TCP analogue).
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
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
from dualpath.transport.link import (DSCP_TOS, HEADER_LIMIT, RECV_SLICE, PeerLink, Refused, TransferError, peer_of,
                                     recv_frame, tune)
from dualpath.transport.wire import TRAFFIC_CLASSES, Ack, Landing, Notify, Request, WriteChunk, parse

log = logging.getLogger(__name__)
# A connection's read buffer: room for the largest header (HEADER_LIMIT) and a small write's payload
# with it; a larger payload's rest goes straight into its region.
_INBOX_BYTES = 2 * HEADER_LIMIT
_STREAM_READ = 4 << 10  # what is read into that buffer between the chunks of a large write
__all__ = ["DataPlane", "TransferError", "Refused", "StaleIncarnation", "Region", "Grant", "TRAFFIC_CLASSES",
           "as_bytes", "check_write", "host_view"]


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


def check_write(dst: dict, dst_offset: int, nbytes: int, traffic_class: str) -> None:
    """What every backend refuses before moving a byte: an unknown class, a range outside the handle."""
    if traffic_class not in TRAFFIC_CLASSES:
        raise ValueError(f"traffic_class {traffic_class!r}: expected one of {TRAFFIC_CLASSES}")
    if dst_offset < 0 or ("nbytes" in dst and dst_offset + nbytes > dst["nbytes"]):
        raise TransferError(f"write [{dst_offset}, {dst_offset + nbytes}) outside the "
                            f"{dst.get('nbytes')}-byte destination")


def source_view(src: torch.Tensor | memoryview, nbytes: int) -> memoryview:
    """The first nbytes of src as host bytes (device data staged through host memory). A flat uint8
    tensor (the common source) skips as_bytes: its views cost microseconds a small write notices."""
    if isinstance(src, torch.Tensor):
        if not src.is_cpu:
            src = as_bytes(src)[:nbytes].cpu()
        elif src.dtype != torch.uint8 or src.dim() != 1:
            src = as_bytes(src)
        else:
            assert src.is_contiguous(), "registered/sent tensors must be contiguous"
        src = memoryview(src.numpy())
    src = memoryview(src).cast("B") if not isinstance(src, memoryview) else src.cast("B")
    if len(src) < nbytes:
        raise ValueError(f"source has {len(src)} bytes, {nbytes} requested")
    return src[:nbytes]


class DataPlane(abc.ABC):
    """One engine's data plane. A backend gives its ``backend`` name and ``write``; it may extend
    register/release/links/close, and the hooks ``_landed`` (wait for bytes that moved another
    way), ``_answer`` (a request such as ConnectQp), ``_peer_restarted`` and ``_writer_restarted``
    (drop what it keeps for a process that is gone)."""

    # Whether a notify's landing may take long (an RDMA receive completion that may never come): then
    # it is awaited beside the connection's reading, so that one lost landing does not hold up every
    # frame behind it; acks then go out in the order landings end (the writer matches them by id).
    slow_landings = False

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
        self._links: dict[tuple[str, int, str], PeerLink] = {}
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
        self._listeners: list[socket.socket] = []  # the TCP one, and any a backend adds (shm: a local one)
        self._accept_tasks: list[asyncio.Task] = []
        self._conns: set[asyncio.Task] = set()
        self.bytes_received = 0
        self.sent_bytes: Counter[str] = Counter()  # by traffic class, acknowledged writes only
        self.refused = 0  # logins and writes refused
        self.malformed = 0  # of those, logins of the wrong shape (framing.MalformedLogin)

    # ------------------------------------------------------------------ the interface engines use

    @property
    @abc.abstractmethod
    def backend(self) -> str:
        """"tcp", "shm", "cuda" or "verbs": reported per engine in /v1/cluster and the metrics."""

    @abc.abstractmethod
    async def write(self, src: torch.Tensor | memoryview, dst: dict, dst_offset: int, nbytes: int,
                    traffic_class: str = "bulk", notify: Any = None, timeout: float = 60.0) -> None:
        """Write nbytes from src into the peer's region dst (a handle, or a grant of one) at
        dst_offset; return once the bytes are in place on the peer and its on_complete(notify) has
        run. TransferError if the peer refused it or was lost (StaleIncarnation: it restarted)."""

    def register(self, tensor: torch.Tensor, share_path: str | None = None, granted_only: bool = False) -> dict:
        """A handle (msgpack-able) through which peers write `tensor`. share_path: where another
        process of this host can map the (host) tensor, for the backends that copy into it
        directly. A granted_only region takes writes only through a grant (``grant``)."""
        flat = as_bytes(tensor)
        region_id = next(self._region_ids)
        view = host_view(flat) if flat.device.type == "cpu" else None
        self.regions[region_id] = Region(region_id, flat, view, granted_only)
        return {"backend": self.backend, "addr": [self.host, self.port], "region": region_id, "nbytes": flat.numel(),
                "device": str(flat.device), "inc": self.incarnation}

    def release(self, handle: dict) -> None:
        self.regions.pop(handle["region"], None)

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

    def links(self) -> dict[str, str]:
        """The backend carrying each peer link ("host:port" -> backend), for the load report: tcp
        for every link here; a backend names its own where it moves the bytes another way."""
        return {f"{h}:{p}": "tcp" for h, p, _ in self._links}

    async def start(self, host: str | None = None, port: int = 0) -> int:
        """Listen for peers' links; returns the port (their handles name it)."""
        self.host = host or self.host
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, port))
        sock.listen(64)
        self.port = sock.getsockname()[1]
        self._listen(sock)
        return self.port

    def _listen(self, sock: socket.socket) -> None:
        """Accept writers' connections on a bound, listening socket (closed with the plane)."""
        sock.setblocking(False)
        self._listeners.append(sock)
        self._accept_tasks.append(asyncio.create_task(self._accept_loop(sock)))

    async def close(self) -> None:
        for t in [*self._accept_tasks, *self._conns]:
            t.cancel()
        for link in self._links.values():
            link.close()
        for listener in self._listeners:
            listener.close()

    # ------------------------------------------------------------------ receiving side: checks

    def _check(self, region_id: int, off: int, n: int, need_host: bool = True, grant: Any = None,
               peer: Login | None = None) -> Region:
        region = self.regions.get(region_id)
        if region is None:
            raise TransferError(f"unknown or released region {region_id} on {self.name}")
        if off < 0 or n < 0 or off + n > region.tensor.numel():
            raise TransferError(f"write [{off}, {off + n}) outside region {region_id} of {region.tensor.numel()} bytes")
        if need_host and region.view is None:
            raise TransferError(f"region {region_id} is device memory; the tcp link writes host memory only")
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
        used again anyway), and so is what a backend kept for them (``_writer_restarted``). An old
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

    def _writer_logged_out(self, writer: Login) -> None:
        self._writers[writer] -= 1
        if not self._writers[writer]:
            del self._writers[writer]

    # ------------------------------------------------------------------ receiving side: the link

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            conn.setblocking(False)
            tune(conn)
            t = asyncio.create_task(self._serve(conn))
            self._conns.add(t)
            t.add_done_callback(self._conns.discard)

    async def _login(self, sock: socket.socket) -> Login | None:
        """The writer at the other end of sock, once it proved the secret; None (said, counted and
        answered) if it did not."""
        loop = asyncio.get_running_loop()
        nonce, first = challenge(self.incarnation)
        await loop.sock_sendall(sock, first)
        try:
            hello = await asyncio.wait_for(recv_frame(loop, sock, LOGIN_MAX_FRAME), 10)
            login = verify(self.token, nonce, hello, need_incarnation=True)
        except ProtocolError as e:  # one line per refusal, never a traceback
            self.refused += 1
            self.malformed += isinstance(e, MalformedLogin)
            log.warning("%s: refused data connection from %s: %s", self.name, peer_of(sock), e)
            await loop.sock_sendall(sock, pack({"ok": False, "error": str(e)}))
            return None
        await loop.sock_sendall(sock, pack({"ok": True}))
        return login

    async def _serve(self, sock: socket.socket) -> None:
        """One writer's connection: its login, then its messages (wire.py), read and handled in order
        by the event loop's callbacks (``_Inbound``) until it closes."""
        loop = asyncio.get_running_loop()
        writer: Login | None = None
        transport: asyncio.BaseTransport | None = None
        try:
            writer = await self._login(sock)
            if writer is None:
                return
            self._writer_logged_in(writer)
            inbound = _Inbound(self, writer, peer_of(sock))
            transport, _ = await loop.connect_accepted_socket(lambda: inbound, sock)
            await inbound.closed
        except (ConnectionError, OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            pass  # the peer went away; nothing half-written was reported complete
        finally:
            if writer is not None:
                self._writer_logged_out(writer)
            if transport is not None:
                transport.abort()
            else:
                sock.close()

    def _landed_now(self, msg: Landing) -> bool:
        """Whether msg's bytes are in place as soon as its frames are read: then the receiver completes
        it in the callback that read it, with nothing awaited. True of a write over the link, and of
        a notify after a memory copy the writer finished (shm); a backend whose ``_landed`` waits for
        bytes moving another way says False for those (cuda, verbs)."""
        return True

    def _reply(self, request: Request, writer: Login) -> Ack:
        try:
            return Ack(request.id, answer=self._answer(request, writer))
        except Exception as e:  # a refusal, said to the writer: its link stays usable
            return Ack(request.id, err=f"{self.name} cannot take {request.what}: {e}")

    async def _landed(self, msg: Landing, writer: Login) -> None:
        """Return once the bytes of the write that `msg` ends are in place (TransferError if they
        never will be). Over the link they came in the frames themselves; a backend whose writer
        moves them another way waits for them here (cuda: the writer's copy event; verbs: the RDMA
        receive completion)."""

    def _answer(self, request: Request, writer: Login) -> dict:
        """The answer to a writer's request (wire.py); a backend that takes none refuses it."""
        raise TransferError(f"it runs the {self.backend} data plane")

    def _writer_restarted(self, name: str, old_incarnation: str | None) -> None:
        """Drop what we keep for a writer's earlier incarnation (the cuda and verbs planes keep some)."""

    # ------------------------------------------------------------------ sending side: the link

    async def ask(self, addr: tuple[str, int], traffic_class: str, msg: Request | dict,
                  timeout: float = 10.0) -> Ack:
        """A request (wire.py) on our link to the peer at addr; its Ack, or TransferError if refused.
        A dict is sent as it is: tests forge headers with it that a well-behaved writer never sends."""
        link = await self._link(tuple(addr), traffic_class)
        wid = next(self._write_ids)
        frame = {**msg, "id": wid} if isinstance(msg, dict) else dataclasses.replace(msg, id=wid).to_wire()
        fut = link.pending[wid] = asyncio.get_running_loop().create_future()
        try:
            await link.send(pack(frame))
            return await _ack_within(fut, timeout)
        except asyncio.TimeoutError:
            raise TransferError(f"{addr} did not answer {frame.get('op')!r} within {timeout}s") from None
        finally:
            link.pending.pop(wid, None)

    async def _link(self, addr: tuple[str, int], tc: str, via: str | None = None) -> PeerLink:
        """Our live link to addr for class tc, connecting if there is none (via: see ``_dial``)."""
        key = (addr[0], addr[1], tc)
        link = self._links.get(key)
        if link is not None and link.alive:  # every write but a link's first: no lock to take
            return link
        async with self._link_locks.setdefault(key, asyncio.Lock()):
            link = self._links.get(key)
            if link is None or not link.alive:
                link = self._links[key] = await self._dial(addr, tc, via)
                self._met(addr, link.incarnation)
            return link

    async def _dial(self, addr: tuple[str, int], tc: str, via: str | None = None) -> PeerLink:
        """A new, logged-in connection to the data plane at addr (not yet one of our links). via: the
        name of a local (Unix) socket of that plane, for a peer of this host (shm.py); tried first,
        TCP if it cannot be reached. Whichever way, the login says which incarnation answered."""
        loop = asyncio.get_running_loop()
        sock = await self._connect_local(via) if via is not None else None
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            tune(sock)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, DSCP_TOS[tc])
        try:
            if sock.family != socket.AF_UNIX:
                await asyncio.wait_for(loop.sock_connect(sock, addr), 5)
            first = await asyncio.wait_for(recv_frame(loop, sock, LOGIN_MAX_FRAME), 5)
            await loop.sock_sendall(sock, answer(self.token, self.name, first, self.incarnation))
            theirs = server_incarnation(first)
            reply = await asyncio.wait_for(recv_frame(loop, sock, LOGIN_MAX_FRAME), 5)
            if not isinstance(reply, dict) or not reply.get("ok"):
                why = reply.get("error") if isinstance(reply, dict) else reply
                raise TransferError(f"{addr} refused the data connection: {why}")
        except (OSError, asyncio.TimeoutError, ProtocolError, ConnectionError) as e:
            sock.close()
            raise TransferError(f"cannot reach data plane at {addr[0]}:{addr[1]}: {e}") from e
        return PeerLink(sock, theirs)

    async def _connect_local(self, name: str) -> socket.socket | None:
        """A connected local (Unix) socket to the listener named `name`, or None (gone, or none here)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        tune(sock)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, name), 5)
            return sock
        except (OSError, asyncio.TimeoutError):
            sock.close()
            return None

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
        """The process at addr is now `incarnation`: close links to an earlier one (backends drop
        their mappings, opened IPC handles and queue pairs too)."""
        for key, link in list(self._links.items()):
            if key[:2] == addr and link.incarnation != incarnation:
                link.close()
                del self._links[key]

    async def _link_to(self, dst: dict, tc: str) -> PeerLink:
        """Our link to the peer that registered `dst`, checked to be that very process: StaleIncarnation
        if the handle names an incarnation that no longer runs at its address. Every backend calls
        this before it moves a byte (shm, cuda and verbs before touching the peer's memory)."""
        addr, named = tuple(dst["addr"]), dst.get("inc")
        via = self._local_link(dst)
        if not isinstance(named, str):
            raise TransferError(f"the handle of {addr} names no incarnation (a handle made by an older version?)")
        if (addr, named) in self._gone:
            raise self._stale(addr, named)
        link = await self._link(addr, tc, via)
        if link.incarnation != named:
            # The handle may be newer than our link: a restart whose close we have not read yet. Ask the
            # address afresh; keep our link if it is still current (writes under way on it stay).
            fresh = await self._dial(addr, tc, via)
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

    def _local_link(self, dst: dict) -> str | None:
        """The local (Unix) socket through which to reach the plane that registered dst, if it is of
        this host and has one (shm.py); None: TCP."""
        return None

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

    async def _write_over_link(self, src: torch.Tensor | memoryview, dst: dict, dst_offset: int, nbytes: int,
                               tc: str, notify: Any, timeout: float) -> None:
        """The write with its payload in frames on the link: tcp's way, and every backend's way to a
        peer it cannot reach otherwise (another host, memory it cannot map or register)."""
        check_write(dst, dst_offset, nbytes, tc)
        view = source_view(src, nbytes)
        if tc == "latency":
            self._latency_inflight += 1
            self._latency_idle.clear()
        try:
            await self._exchange(dst, tc, timeout, nbytes,
                                 lambda link, wid: self._send_chunks(link, wid, view, dst, dst_offset, tc, notify))
        finally:
            if tc == "latency":
                self._latency_inflight -= 1
                if not self._latency_inflight:
                    self._latency_idle.set()

    async def _notify(self, dst: dict, dst_offset: int, moved: int, tc: str, notify: Any, timeout: float,
                      event: Any = None) -> None:
        """After `moved` bytes went another way: the notify frame, and the peer's ack once they landed."""
        async def send(link: PeerLink, wid: int) -> None:
            msg = Notify(wid, dst["region"], dst_offset, moved, dst["inc"], dst.get("grant"), notify, event)
            await link.send(pack(msg.to_wire()))

        await self._exchange(dst, tc, timeout, moved, send)

    async def _exchange(self, dst: dict, tc: str, timeout: float, nbytes: int,
                        send: Callable[[PeerLink, int], Any]) -> None:
        """Send one message's frames on our link to dst's peer (send(link, id)) and wait for its ack.
        A refusal leaves the link up; a lost or silent peer closes it."""
        link = await self._link_to(dst, tc)
        wid = next(self._write_ids)
        fut = link.pending[wid] = asyncio.get_running_loop().create_future()
        try:
            await send(link, wid)
            await _ack_within(fut, timeout)
            self.sent_bytes[tc] += nbytes
        except TransferError:  # refused by the peer (bad handle/range): the link itself is fine
            raise
        except asyncio.TimeoutError:  # (before OSError: a TimeoutError is one)
            link.close()
            raise TransferError(f"write to {dst['addr']} not acknowledged within {timeout}s") from None
        except (OSError, ConnectionError) as e:
            link.close()
            raise TransferError(f"write to {dst['addr']} failed: {e}") from e
        finally:
            link.pending.pop(wid, None)

    async def _send_chunks(self, link: PeerLink, wid: int, src: memoryview, dst: dict, off: int, tc: str,
                           notify: Any) -> None:
        """A write's frames: a header and its bytes per chunk (bulk in chunks, yielding to latency
        traffic between them; latency in one)."""
        n = len(src)
        step = self.chunk if tc == "bulk" else max(n, 1)
        pos = 0
        while True:
            k = min(step, n - pos)
            last = pos + k >= n
            header = WriteChunk(wid, dst["region"], off + pos, k, dst["inc"], dst.get("grant"), last,
                                notify if last else None)
            t0 = time.perf_counter()
            await link.send(pack(header.to_wire()), src[pos : pos + k])
            pos += k
            if last:
                return
            if tc == "bulk":
                await self._yield_to_latency(time.perf_counter() - t0)


async def _ack_within(fut: asyncio.Future, timeout: float) -> Any:
    """fut's result (an ack), or asyncio.TimeoutError after `timeout` seconds. One timer per write,
    not wait_for (a second future and two more callbacks, each a turn of the loop, per ack) nor
    asyncio.timeout (twice this timer's cost): a small write's ack is waited for thousands of times a
    second."""
    timer = asyncio.get_running_loop().call_later(timeout, _time_out, fut)
    try:
        return await fut
    finally:
        timer.cancel()


def _time_out(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(asyncio.TimeoutError())


class _Inbound(asyncio.BufferedProtocol):
    """The receiving end of one writer's connection, read by the event loop's own callbacks.

    A small write's header and payload usually arrive in one segment: they are read into a buffer,
    placed, completed and acked in the one callback that read them, with no task woken and no
    reader registered per frame (issue #34: the frame-by-frame task cost the receiver 90-140 µs
    of CPU per 4 KB write). Payload bytes beyond those buffered are read straight into their region
    (no copy), at most ``RECV_SLICE`` per callback so that other connections get their turn. A
    landing that must be awaited (a CUDA event, an RDMA receive) pauses reading until it is done, so
    the connection's messages are still handled one after another, in order; verbs' landings are
    awaited beside the reading instead (``DataPlane.slow_landings``).
    """

    def __init__(self, plane: DataPlane, writer: Login, peer: str):
        self.plane, self.writer, self.peer = plane, writer, peer
        self.buf = memoryview(bytearray(_INBOX_BYTES))
        self.lo = self.hi = 0  # bytes read but not yet handled: buf[lo:hi]
        self.payload: memoryview | None = None  # the rest of a chunk's payload: read straight into its region
        self.chunk: WriteChunk | None = None  # the chunk that payload belongs to
        self.dropping = 0  # payload bytes of a refused chunk still to read and drop
        self.streaming = False  # the last chunk was not its write's last: a large payload comes next
        self.waiting = False  # a landing is awaited: the frames behind it wait, reading is paused
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()  # done once the connection is gone

    # -- asyncio.BufferedProtocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.payload is not None:
            return self.payload[:RECV_SLICE]
        if self.streaming:  # read little more than the next header: its payload goes straight to the region
            return self.buf[self.hi : self.hi + _STREAM_READ]
        return self.buf[self.hi :]  # (never empty: _handle_frames leaves room for a whole frame)

    def buffer_updated(self, nbytes: int) -> None:
        if self.payload is not None:
            self.plane.bytes_received += nbytes
            self.payload = self.payload[nbytes:]
            if len(self.payload):
                return
            chunk, self.payload, self.chunk = self.chunk, None, None
            self._chunk_in(chunk)
        else:
            self.hi += nbytes
        self._handle_frames()

    # -- messages --

    def _handle_frames(self) -> None:
        """Every whole message buffered, in order, until one must wait for more bytes or a landing."""
        try:
            while self.payload is None and not self.waiting and self.transport is not None:
                if self.dropping:
                    k = min(self.dropping, self.hi - self.lo)
                    self.lo += k
                    self.dropping -= k
                    if self.dropping:
                        break
                if self.hi - self.lo < LENGTH.size:
                    break
                end = self.lo + LENGTH.size + frame_length(self.buf[self.lo : self.lo + LENGTH.size], HEADER_LIMIT)
                if end > self.hi:
                    break
                msg = parse(unpack(self.buf[self.lo + LENGTH.size : end]))  # grants are checked against writer
                self.lo = end
                if isinstance(msg, (WriteChunk, Notify)):
                    self._take(msg)
                else:
                    self._ack(self.plane._reply(msg, self.writer))
        except ProtocolError as e:
            log.warning("%s: closed a data connection from %s: %s", self.plane.name, self.peer, e)
            self.transport.abort()
            return
        self._keep_room()

    def _keep_room(self) -> None:
        """Move what is left (a part of the next frame) to the buffer's start, so that it has room for
        the rest of a frame of any allowed size."""
        if self.lo == self.hi:
            self.lo = self.hi = 0
        elif self.lo:
            n = self.hi - self.lo
            self.buf[:n] = self.buf[self.lo : self.hi]
            self.lo, self.hi = 0, n

    def _take(self, msg: Landing) -> None:
        """A write chunk (its payload follows) or a notify: checked, its payload placed, landed."""
        plane = self.plane
        payload = msg.n if isinstance(msg, WriteChunk) else 0
        try:
            plane._check_incarnation(msg.inc)
            # a notify stands for bytes the writer moved itself: check their whole range
            span = payload if isinstance(msg, WriteChunk) else msg.moved
            region = plane._check(msg.region, msg.off, span, need_host=isinstance(msg, WriteChunk), grant=msg.grant,
                                  peer=self.writer)
        except TransferError as e:
            plane.refused += 1
            self.dropping = payload
            self._ack(Ack(msg.id, err=str(e)))
            return
        if isinstance(msg, WriteChunk):
            self.streaming = not msg.last
        if payload:
            dest = region.view[msg.off : msg.off + payload]
            k = min(payload, self.hi - self.lo)  # what came with the header: copied from the buffer
            dest[:k] = self.buf[self.lo : self.lo + k]
            self.lo += k
            plane.bytes_received += k
            if k < payload:  # the rest is read straight into the region
                self.payload, self.chunk = dest[k:], msg
                return
        self._chunk_in(msg)

    def _chunk_in(self, msg: Landing) -> None:
        """Every byte of msg is in (a chunk) or announced (a notify): the write's last message lands."""
        if not msg.last:
            return
        plane = self.plane
        if isinstance(msg, Notify) and plane.slow_landings:
            self._spawn(self._land_later(msg))
        elif plane._landed_now(msg):
            plane.on_complete(msg.notify)  # every byte is in place
            self._ack(Ack(msg.id))
        else:
            self.waiting = True
            self.transport.pause_reading()
            self._spawn(self._land_later(msg, resume=True))

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.plane._conns.add(task)  # (cancelled at close, like the connections)
        task.add_done_callback(self.plane._conns.discard)

    async def _land_later(self, msg: Landing, resume: bool = False) -> None:
        """Once msg's bytes are in place: on_complete(notify), then the ack. A landing that fails (the
        RDMA write failed, or never came) is acked with the reason; the link stays up. resume: reading
        was paused for this landing; go on with the frames behind it."""
        plane = self.plane
        try:
            await plane._landed(msg, self.writer)
        except TransferError as e:
            plane.refused += 1
            self._ack(Ack(msg.id, err=str(e)))
        except ProtocolError as e:
            log.warning("%s: closed a data connection from %s: %s", plane.name, self.peer, e)
            self.transport.abort()
            return
        else:
            plane.on_complete(msg.notify)
            self._ack(Ack(msg.id))
        if resume and not self.transport.is_closing():
            self.waiting = False
            self.transport.resume_reading()
            self._handle_frames()

    def _ack(self, ack: Ack) -> None:
        if not self.transport.is_closing():  # (closed meanwhile: the writer has failed this write already)
            self.transport.write(pack(ack.to_wire()))


def __getattr__(name: str) -> Any:
    """``from dualpath.transport.dataplane import TcpDataPlane`` as before the backends moved to their
    own modules (tcp.py imports this one, so it cannot be imported at the top)."""
    if name == "TcpDataPlane":
        from dualpath.transport.tcp import TcpDataPlane

        return TcpDataPlane
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
