"""The control plane: length-prefixed msgpack frames over TCP, with a cluster token checked at connect.

Frame: 4-byte big-endian length, then a msgpack map. A frame longer than ``max_frame`` is refused
and the connection closed. Connect handshake (both ends know the cluster token):

    server -> {"v": PROTOCOL, "nonce": 16 random bytes}
    client -> {"v": PROTOCOL, "name": ..., "mac": HMAC-SHA256(token, nonce)}
    server -> {"ok": true} or {"ok": false, "error": ...} and close

After it, either side may send requests ``{"id", "m", "p"}`` (answered by ``{"id", "r"}`` or
``{"id", "e"}``) and one-way events ``{"m", "p"}``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import logging
import os
import struct
from typing import Any, Awaitable, Callable

import msgpack

PROTOCOL = 1
MAX_FRAME = 64 << 20
# Frames before login: a handshake is under 100 bytes, and a peer that has not proved the secret
# must not make us buffer megabytes (four 64 MiB frames once doubled the coordinator's memory).
LOGIN_MAX_FRAME = 4096
_LEN = struct.Struct(">I")
log = logging.getLogger(__name__)

Handler = Callable[["Connection", str, dict], Awaitable[Any]]


class ProtocolError(ConnectionError):
    """The peer broke the protocol (bad frame, oversize, wrong version, failed authentication)."""


class RemoteError(RuntimeError):
    """The peer's handler raised; the message is the peer's."""


def pack(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return _LEN.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader, max_frame: int = MAX_FRAME) -> Any:
    (n,) = _LEN.unpack(await reader.readexactly(4))
    if n > max_frame:
        raise ProtocolError(f"frame of {n} bytes exceeds the limit of {max_frame}")
    try:
        return msgpack.unpackb(await reader.readexactly(n), raw=False)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as e:
        raise ProtocolError(f"malformed frame: {e}") from e


def _mac(token: str, nonce: bytes) -> bytes:
    return hmac.new(token.encode(), nonce, hashlib.sha256).digest()


class Connection:
    """One authenticated control connection; symmetric once open."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: Handler | None,
                 peer_name: str, max_frame: int = MAX_FRAME):
        self.reader, self.writer, self.handler = reader, writer, handler
        self.peer_name, self.max_frame = peer_name, max_frame
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._tasks: set[asyncio.Task] = set()
        self.closed = asyncio.Event()
        self._reader_task = asyncio.create_task(self._read_loop())

    async def request(self, method: str, timeout: float | None = 30.0, **params: Any) -> Any:
        if self.closed.is_set():
            raise ConnectionError(f"connection to {self.peer_name} is closed")
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            self.writer.write(pack({"id": rid, "m": method, "p": params}))
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"{method} to {self.peer_name} timed out after {timeout}s") from None
        finally:
            self._pending.pop(rid, None)

    def event(self, method: str, **params: Any) -> None:
        """Fire-and-forget; silently dropped if the connection is closed (the peer is gone)."""
        if not self.closed.is_set():
            self.writer.write(pack({"m": method, "p": params}))

    async def _read_loop(self) -> None:
        try:
            while True:
                msg = await read_frame(self.reader, self.max_frame)
                if "r" in msg or "e" in msg:
                    fut = self._pending.get(msg.get("id"))
                    if fut is not None and not fut.done():
                        if "e" in msg:
                            fut.set_exception(RemoteError(msg["e"]))
                        else:
                            fut.set_result(msg["r"])
                elif "m" in msg:
                    t = asyncio.create_task(self._dispatch(msg))
                    self._tasks.add(t)
                    t.add_done_callback(self._tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            if isinstance(e, ProtocolError):
                log.warning("closing connection to %s: %s", self.peer_name, e)
        finally:
            self._fail_pending(ConnectionError(f"connection to {self.peer_name} lost"))
            self.closed.set()
            self.writer.close()

    async def _dispatch(self, msg: dict) -> None:
        rid = msg.get("id")
        try:
            if self.handler is None:
                raise RemoteError("no handler")
            result = await self.handler(self, msg["m"], msg.get("p") or {})
            if rid is not None:
                self.writer.write(pack({"id": rid, "r": result}))
        except Exception as e:  # report to the caller; the connection stays up
            if rid is not None and not self.closed.is_set():
                self.writer.write(pack({"id": rid, "e": f"{type(e).__name__}: {e}"}))
            else:
                log.warning("event %s from %s failed: %s", msg.get("m"), self.peer_name, e)

    def _fail_pending(self, exc: Exception) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)

    async def close(self) -> None:
        self._reader_task.cancel()
        try:
            await self._reader_task
        except (asyncio.CancelledError, Exception):
            pass
        self.writer.close()


async def _server_handshake(reader, writer, token: str, max_frame: int) -> str:
    nonce = os.urandom(16)
    writer.write(pack({"v": PROTOCOL, "nonce": nonce}))
    hello = await asyncio.wait_for(read_frame(reader, LOGIN_MAX_FRAME), 10)
    if hello.get("v") != PROTOCOL:
        raise ProtocolError(f"protocol version {hello.get('v')!r}, expected {PROTOCOL}")
    if not hmac.compare_digest(hello.get("mac") or b"", _mac(token, nonce)):
        raise ProtocolError("bad cluster token")
    writer.write(pack({"ok": True}))
    return str(hello.get("name", "?"))


async def connect(host: str, port: int, token: str, name: str, handler: Handler | None = None,
                  max_frame: int = MAX_FRAME, timeout: float = 10.0) -> Connection:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        challenge = await asyncio.wait_for(read_frame(reader, LOGIN_MAX_FRAME), timeout)
        if challenge.get("v") != PROTOCOL:
            raise ProtocolError(f"server speaks protocol {challenge.get('v')!r}, we speak {PROTOCOL}")
        writer.write(pack({"v": PROTOCOL, "name": name, "mac": _mac(token, challenge["nonce"])}))
        reply = await asyncio.wait_for(read_frame(reader, LOGIN_MAX_FRAME), timeout)
        if not reply.get("ok"):
            raise ProtocolError(f"{host}:{port} refused us: {reply.get('error')}")
    except BaseException:
        writer.close()
        raise
    return Connection(reader, writer, handler, f"{host}:{port}", max_frame)


class Server:
    """Accepts authenticated control connections; ``on_connect`` sees each new Connection."""

    def __init__(self, token: str, handler: Handler, on_connect: Callable[[Connection], None] | None = None,
                 max_frame: int = MAX_FRAME):
        self.token, self.handler, self.on_connect, self.max_frame = token, handler, on_connect, max_frame
        self.connections: set[Connection] = set()
        self.refused = 0
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._accept, host, port)
        return self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader, writer) -> None:
        peer = writer.get_extra_info("peername")
        try:
            name = await _server_handshake(reader, writer, self.token, self.max_frame)
        except (ProtocolError, asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError) as e:
            self.refused += 1
            log.warning("refused control connection from %s: %s", peer, e)
            try:
                writer.write(pack({"ok": False, "error": str(e)}))
            except Exception:
                pass
            writer.close()
            return
        conn = Connection(reader, writer, self.handler, name, self.max_frame)
        self.connections.add(conn)
        if self.on_connect:
            self.on_connect(conn)
        await conn.closed.wait()
        self.connections.discard(conn)

    async def close(self) -> None:
        if self._server:
            self._server.close()
        for c in list(self.connections):
            await c.close()
