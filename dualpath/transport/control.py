"""The control plane: typed requests, responses and events over framed, authenticated TCP.

Frames and the login that proves the cluster secret are framing.py's. After login either side may
send requests ``{"id", "m", "p"}`` (answered by ``{"id", "r"}`` or ``{"id", "e"}``) and one-way
events ``{"m", "p"}``; protocol.py gives the messages between coordinator and engines.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any, Awaitable, Callable

from dualpath.transport.framing import (LOGIN_MAX_FRAME, PROTOCOL, Login, MalformedLogin, ProtocolError, answer,
                                        challenge, pack, read_frame, server_incarnation, verify)

MAX_FRAME = 64 << 20
log = logging.getLogger(__name__)

Handler = Callable[["Connection", str, dict], Awaitable[Any]]


class RemoteError(RuntimeError):
    """The peer's handler raised; the message is the peer's."""


class Connection:
    """One authenticated control connection; symmetric once open. ``peer_incarnation``: the peer
    process's incarnation as its login said (framing.py); None for a peer that names none."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: Handler | None,
                 peer_name: str, max_frame: int = MAX_FRAME, peer_incarnation: str | None = None):
        self.reader, self.writer, self.handler = reader, writer, handler
        self.peer_name, self.max_frame, self.peer_incarnation = peer_name, max_frame, peer_incarnation
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._tasks: set[asyncio.Task] = set()
        self.closed = asyncio.Event()
        self._reader_task = asyncio.create_task(self._read_loop())

    async def request(self, method: str, timeout: float | None = 30.0, **params: Any) -> Any:
        if self.closed.is_set():
            raise ConnectionError(f"connection to {self.peer_name} is closed")
        msg_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        try:
            self.writer.write(pack({"id": msg_id, "m": method, "p": params}))
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"{method} to {self.peer_name} timed out after {timeout}s") from None
        finally:
            self._pending.pop(msg_id, None)

    def event(self, method: str, **params: Any) -> None:
        """Fire-and-forget; silently dropped if the connection is closed (the peer is gone)."""
        if not self.closed.is_set():
            self.writer.write(pack({"m": method, "p": params}))

    async def _read_loop(self) -> None:
        try:
            while True:
                msg = await read_frame(self.reader, self.max_frame)
                if not isinstance(msg, dict):
                    raise ProtocolError(f"a {type(msg).__name__} frame, not a message")
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
        msg_id = msg.get("id")
        try:
            if self.handler is None:
                raise RemoteError("no handler")
            result = await self.handler(self, msg["m"], msg.get("p") or {})
            if msg_id is not None:
                self.writer.write(pack({"id": msg_id, "r": result}))
        except Exception as e:  # report to the caller; the connection stays up
            if msg_id is not None and not self.closed.is_set():
                self.writer.write(pack({"id": msg_id, "e": f"{type(e).__name__}: {e}"}))
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


async def _server_handshake(reader, writer, token: str, incarnation: str | None = None) -> Login:
    nonce, first = challenge(incarnation)
    writer.write(first)
    login = verify(token, nonce, await asyncio.wait_for(read_frame(reader, LOGIN_MAX_FRAME), 10))
    writer.write(pack({"ok": True}))
    return login


async def connect(host: str, port: int, token: str, name: str, handler: Handler | None = None,
                  max_frame: int = MAX_FRAME, timeout: float = 10.0, incarnation: str | None = None) -> Connection:
    """A control connection to the server at host:port, logged in as `name` (and, for an engine,
    its incarnation); the Connection knows the server's incarnation."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        first = await asyncio.wait_for(read_frame(reader, LOGIN_MAX_FRAME), timeout)
        writer.write(answer(token, name, first, incarnation))
        theirs = server_incarnation(first)
        reply = await asyncio.wait_for(read_frame(reader, LOGIN_MAX_FRAME), timeout)
        if not isinstance(reply, dict) or not reply.get("ok"):
            raise ProtocolError(f"{host}:{port} refused us: {reply.get('error') if isinstance(reply, dict) else reply}")
    except BaseException:
        writer.close()
        raise
    return Connection(reader, writer, handler, f"{host}:{port}", max_frame, theirs)


class Server:
    """Accepts authenticated control connections; ``on_close`` hears of each one that closes."""

    def __init__(self, token: str, handler: Handler, on_close: Callable[[Connection], None] | None = None,
                 max_frame: int = MAX_FRAME, incarnation: str | None = None):
        self.token, self.handler, self.on_close, self.max_frame = token, handler, on_close, max_frame
        self.incarnation = incarnation  # ours, told to every client in the challenge
        self.connections: set[Connection] = set()
        self.refused = 0  # logins refused, for whatever reason
        self.malformed = 0  # of those, login frames of the wrong shape (framing.MalformedLogin)
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._accept, host, port)
        return self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader, writer) -> None:
        peer = writer.get_extra_info("peername")
        try:
            login = await _server_handshake(reader, writer, self.token, self.incarnation)
        except (ProtocolError, asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError) as e:
            # One line per refusal, never a traceback: whoever can reach the port can send anything.
            self.refused += 1
            self.malformed += isinstance(e, MalformedLogin)
            log.warning("refused control connection from %s: %s", peer, e or type(e).__name__)
            try:
                writer.write(pack({"ok": False, "error": str(e)}))
            except Exception:
                pass
            writer.close()
            return
        conn = Connection(reader, writer, self.handler, login.name, self.max_frame, login.incarnation)
        self.connections.add(conn)
        await conn.closed.wait()
        self.connections.discard(conn)
        if self.on_close:
            self.on_close(conn)

    async def close(self) -> None:
        if self._server:
            self._server.close()
        for c in list(self.connections):
            await c.close()


__all__ = ["MAX_FRAME", "PROTOCOL", "Connection", "Handler", "Login", "MalformedLogin", "ProtocolError", "RemoteError",
           "Server", "connect", "pack", "read_frame"]
