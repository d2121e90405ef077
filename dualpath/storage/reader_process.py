"""A storage reader process: reads blocks into an engine's shared buffer (protocol: readers.py).

It imports no torch (only transport/framing.py), so it starts in a few tens of milliseconds."""

from __future__ import annotations

import mmap
import os
import socket
import sys
import time

from dualpath.storage.blockfile import BlockShape
from dualpath.storage.store import OK, FileStore
from dualpath.transport.framing import pack, recv_frame_blocking

MAX_FRAME = 16 << 20  # one request's message: its keys and spans


def serve(sock: socket.socket) -> None:
    hello = recv_frame_blocking(sock, MAX_FRAME)
    if hello is None:
        return
    try:
        shape = BlockShape(*hello["shape"])
        store = FileStore(hello["root"], shape, capacity_bytes=1 << 62, scan=False)  # reads only: no index
        fd = os.open(hello["buffer"], os.O_RDWR)
        mem = memoryview(mmap.mmap(fd, hello["buffer_bytes"]))
        os.close(fd)
    except (OSError, ValueError, TypeError) as e:
        sock.sendall(pack({"error": f"{type(e).__name__}: {e}"}))
        return
    sock.sendall(pack({"ready": True}))
    try:
        _read_requests(sock, store, mem)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the engine went away mid-read: nobody is waiting for the rest


def _read_requests(sock: socket.socket, store: FileStore, mem: memoryview) -> None:
    bpl = store.shape.bytes_per_layer
    while (msg := recv_frame_blocking(sock, MAX_FRAME)) is not None:
        keys, offset, stride = msg["keys"], msg["offset"], msg["stride"]
        t0 = time.perf_counter()
        codes, sums = bytearray(len(keys)), [None] * len(keys)
        for i, key in enumerate(keys):
            codes[i], sums[i] = store.read_checksums(key)
        for k, (first, count) in enumerate(msg["spans"]):
            for i, key in enumerate(keys):
                if codes[i] == OK:
                    at = offset + i * bpl + first * stride
                    dests = [mem[at + j * stride : at + j * stride + bpl] for j in range(count)]
                    codes[i] = store.read_layers(key, first, dests, sums[i])
            busy, t0 = time.perf_counter() - t0, time.perf_counter()
            sock.sendall(pack({"id": msg["id"], "span": k, "codes": bytes(codes), "busy_s": busy}))


if __name__ == "__main__":
    serve(socket.socket(fileno=int(sys.argv[1])))
