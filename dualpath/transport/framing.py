"""The one wire format of every DualPath connection: frames, and the login that proves the secret.

Frame: a 4-byte big-endian length, then a msgpack body. The control plane, the data plane's
headers and the store's reader processes all speak it; a frame longer than the reader's limit is
refused before any of it is buffered.

Login (control and data planes), both ends knowing the cluster secret:

    server -> {"v": PROTOCOL, "nonce": 16 random bytes, "inc": the server's incarnation}
    client -> {"v": PROTOCOL, "name": ..., "mac": HMAC-SHA256(secret, nonce), "inc": the client's incarnation}
    server -> {"ok": true}, or {"ok": false, "error": ...} and close

The secret never travels. Frames before login are capped at LOGIN_MAX_FRAME bytes, and a login
frame of any other shape (not a map, a `mac` that is not bytes, ...) is refused as malformed.

An incarnation is a random id an engine process draws at start (``new_incarnation``): an engine
restarted under the same name and address is a new peer, and whatever its predecessor handed out
(buffer handles, grants, mappings, queue pairs) is never used again (transport/dataplane.py).

No torch here: reader processes import this and start in tens of milliseconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import socket
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

PROTOCOL = 1
LENGTH = struct.Struct(">I")
LOGIN_MAX_FRAME = 4096


class ProtocolError(ConnectionError):
    """The peer broke the protocol (bad frame, oversize, wrong version, failed authentication)."""


class MalformedLogin(ProtocolError):
    """A login frame of the wrong shape: not a map, or a field of the wrong type."""


MAX_NAME = 256  # characters of a logged-in name (it goes into logs and metrics labels)


def new_incarnation() -> str:
    """A random id for one life of one process: 64 bits, never reused by a restart."""
    return secrets.token_hex(8)


@dataclass(frozen=True)
class Login:
    """Who a connection's peer proved to be: the name it logged in with and its incarnation (None
    for clients that are not engines, such as tests and tools, which send none)."""

    name: str
    incarnation: str | None


def pack(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return LENGTH.pack(len(body)) + body


def frame_length(head: bytes, max_frame: int) -> int:
    (n,) = LENGTH.unpack(head)
    if n > max_frame:
        raise ProtocolError(f"frame of {n} bytes exceeds the limit of {max_frame}")
    return n


def unpack(body: bytes | bytearray) -> Any:
    try:
        return msgpack.unpackb(body, raw=False)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as e:
        raise ProtocolError(f"malformed frame: {e}") from e


async def read_frame(reader: asyncio.StreamReader, max_frame: int) -> Any:
    """One frame from an asyncio stream (the control plane)."""
    n = frame_length(await reader.readexactly(LENGTH.size), max_frame)
    return unpack(await reader.readexactly(n))


def recv_frame_blocking(sock: socket.socket, max_frame: int) -> Any | None:
    """One frame from a blocking socket (a reader process); None once the peer has closed it."""
    head = sock.recv(LENGTH.size, socket.MSG_WAITALL)
    if len(head) < LENGTH.size:
        return None
    body = bytearray(frame_length(head, max_frame))
    view, got = memoryview(body), 0
    while got < len(body):
        k = sock.recv_into(view[got:])
        if not k:
            return None
        got += k
    return unpack(body)


# -- login --

def challenge(incarnation: str | None = None) -> tuple[bytes, bytes]:
    """A fresh nonce and the server's first frame carrying it (and the server's incarnation)."""
    nonce = os.urandom(16)
    return nonce, pack({"v": PROTOCOL, "nonce": nonce, "inc": incarnation})


def _mac(secret: str, nonce: bytes) -> bytes:
    return hmac.new(secret.encode(), nonce, hashlib.sha256).digest()


def _incarnation_field(frame: dict) -> str | None:
    inc = frame.get("inc")
    if inc is not None and not (isinstance(inc, str) and 0 < len(inc) <= 64):
        raise MalformedLogin(f"malformed login: 'inc' must be a short string, got {type(inc).__name__}")
    return inc


def answer(secret: str, name: str, first: Any, incarnation: str | None = None) -> bytes:
    """The client's reply to the server's first frame: our name, our incarnation, proof of the secret."""
    if not isinstance(first, dict) or not isinstance(first.get("nonce"), bytes):
        raise MalformedLogin(f"malformed challenge from the server: {type(first).__name__}")
    if first.get("v") != PROTOCOL:
        raise ProtocolError(f"the server speaks protocol {first.get('v')!r}, we speak {PROTOCOL}")
    return pack({"v": PROTOCOL, "name": name, "mac": _mac(secret, first["nonce"]), "inc": incarnation})


def server_incarnation(first: dict) -> str | None:
    """The incarnation a server's first frame (``challenge``) names; None from one that names none."""
    return _incarnation_field(first)


def verify(secret: str, nonce: bytes, hello: Any, need_incarnation: bool = False) -> Login:
    """Who a client is, once its reply proves the secret; ProtocolError if it does not, and
    MalformedLogin (a ProtocolError) if the reply is not a login frame at all."""
    if not isinstance(hello, dict):
        raise MalformedLogin(f"malformed login: a {type(hello).__name__}, not a map")
    if hello.get("v") != PROTOCOL:
        raise ProtocolError(f"protocol version {hello.get('v')!r}, expected {PROTOCOL}")
    mac, name = hello.get("mac"), hello.get("name", "?")
    if not isinstance(mac, bytes):
        raise MalformedLogin(f"malformed login: 'mac' must be bytes, got {type(mac).__name__}")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
        raise MalformedLogin(f"malformed login: 'name' must be a string of 1 to {MAX_NAME} characters")
    inc = _incarnation_field(hello)
    if not hmac.compare_digest(mac, _mac(secret, nonce)):
        raise ProtocolError("bad cluster secret")
    if need_incarnation and inc is None:
        raise MalformedLogin("malformed login: no incarnation ('inc'), which every data-plane writer sends")
    return Login(name, inc)
