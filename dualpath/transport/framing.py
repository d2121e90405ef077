"""The one wire format of every DualPath connection: frames, and the login that proves the secret.

Frame: a 4-byte big-endian length, then a msgpack body. The control plane, the data plane's
headers and the store's reader processes all speak it; a frame longer than the reader's limit is
refused before any of it is buffered.

Login (control and data planes), both ends knowing the cluster secret:

    server -> {"v": PROTOCOL, "nonce": 16 random bytes}
    client -> {"v": PROTOCOL, "name": ..., "mac": HMAC-SHA256(secret, nonce)}
    server -> {"ok": true}, or {"ok": false, "error": ...} and close

The secret never travels. Frames before login are capped at LOGIN_MAX_FRAME bytes.

No torch here: reader processes import this and start in tens of milliseconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import socket
import struct
from typing import Any

import msgpack

PROTOCOL = 1
LENGTH = struct.Struct(">I")
LOGIN_MAX_FRAME = 4096


class ProtocolError(ConnectionError):
    """The peer broke the protocol (bad frame, oversize, wrong version, failed authentication)."""


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

def challenge() -> tuple[bytes, bytes]:
    """A fresh nonce and the server's first frame carrying it."""
    nonce = os.urandom(16)
    return nonce, pack({"v": PROTOCOL, "nonce": nonce})


def _mac(secret: str, nonce: bytes) -> bytes:
    return hmac.new(secret.encode(), nonce, hashlib.sha256).digest()


def answer(secret: str, name: str, first: dict) -> bytes:
    """The client's reply to the server's first frame: our name and proof of the secret."""
    if first.get("v") != PROTOCOL:
        raise ProtocolError(f"the server speaks protocol {first.get('v')!r}, we speak {PROTOCOL}")
    return pack({"v": PROTOCOL, "name": name, "mac": _mac(secret, first["nonce"])})


def verify(secret: str, nonce: bytes, hello: dict) -> str:
    """The name a client logged in with, once its reply proves the secret; ProtocolError if not."""
    if hello.get("v") != PROTOCOL:
        raise ProtocolError(f"protocol version {hello.get('v')!r}, expected {PROTOCOL}")
    if not hmac.compare_digest(hello.get("mac") or b"", _mac(secret, nonce)):
        raise ProtocolError("bad cluster secret")
    return str(hello.get("name", "?"))
