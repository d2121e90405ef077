"""Storage reads in helper processes, straight into an engine's shared DRAM buffer.

Why processes: reading a block is a preadv (which releases the GIL) and a checksum per layer (which,
at tens of KiB per layer, does not). On threads of the engine process those steps contend for the
GIL with the event loop and with the model's kernel launches, so loading and compute slow each other
down instead of overlapping (a 32K-token prefill took 162 ms on an H200 with reader threads, 41 ms
on an H100 with reader processes; runs/gpu/). A reader process has a GIL of its own; the engine
sends it one small message per request and gets one back per span of layers. The bytes never pass
through the engine: the reader maps the engine's buffer (memfd shared memory, engine/buffers.py) and
preadv writes into it.

Protocol: length-prefixed msgpack frames (transport/control.py's framing) over a socketpair.

    engine -> reader  {"root", "shape": [layers, bytes/layer, dtype, fingerprint], "buffer", "buffer_bytes"}
    reader -> engine  {"ready": true} once it has mapped the buffer, or {"error": why}
    engine -> reader  {"id", "keys", "offset", "stride", "spans": [[first layer, count], ...]}
    reader -> engine  {"id", "span": k, "codes": one byte per key (OK, ABSENT, CORRUPT), "busy_s"}   once per span

(busy_s: the reader's time on that span, reads and checksums: bench ingest's profile sums it.)

Block i of a read lands at ``offset + i * bytes_per_layer + l * stride`` for layer l (a run of the
buffer is layer-major). A block that failed is not read in later spans; its code stays. The reader
exits when the engine closes the socket (or dies). The process itself is reader_process.py.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import subprocess
import sys

from dualpath.transport.framing import pack, read_frame

REPLY_MAX_FRAME = 1 << 20  # a reader's reply: one status byte per block of a span

log = logging.getLogger(__name__)


class ReaderLost(ConnectionError):
    """A reader process is not running: it could not start, or it died (its outstanding reads fail)."""


class Reader:
    """The engine's end of one reader process."""

    def __init__(self, hello: dict):
        self.hello = hello
        self._ids = itertools.count()
        self._pending: dict[int, list[asyncio.Future]] = {}
        self._starting = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self.alive = False
        self.busy_s = 0.0  # seconds this reader spent reading and checking (its replies say)

    async def ensure_running(self) -> None:
        """Start the process, or start a new one if it died (the old one's reads have failed)."""
        async with self._starting:
            if not self.alive:
                if self._task is not None:
                    await asyncio.gather(self._task, return_exceptions=True)
                await self._start()

    async def _start(self) -> None:
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen([sys.executable, "-m", "dualpath.storage.reader_process", str(theirs.fileno())],
                                     pass_fds=(theirs.fileno(),))
        theirs.close()
        self._reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        self._writer.write(pack(self.hello))
        try:  # ready once it has mapped the buffer, so a read's time never includes the start
            ready = await asyncio.wait_for(read_frame(self._reader, REPLY_MAX_FRAME), 60)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError) as e:
            ready = {"error": f"no answer ({type(e).__name__})"}
        if "error" in ready:
            self._writer.close()
            await asyncio.get_running_loop().run_in_executor(None, self._reap)
            raise ReaderLost(f"storage reader process could not start: {ready['error']}")
        self.alive = True
        self._task = asyncio.create_task(self._replies())

    def submit(self, keys: list[bytes], offset: int, stride: int, spans: list[range]) -> list[asyncio.Future]:
        """Queue a read; one future per span, each resolving to the keys' codes once that span is in."""
        if not self.alive:
            raise ReaderLost("reader process is not running")
        rid = next(self._ids)
        loop = asyncio.get_running_loop()
        futures = self._pending[rid] = [loop.create_future() for _ in spans]
        self._writer.write(pack({"id": rid, "keys": keys, "offset": offset, "stride": stride,
                                 "spans": [[sp.start, len(sp)] for sp in spans]}))
        return futures

    async def _replies(self) -> None:
        try:
            while True:
                msg = await read_frame(self._reader, REPLY_MAX_FRAME)
                futures = self._pending[msg["id"]]
                self.busy_s += msg.get("busy_s", 0.0)
                futures[msg["span"]].set_result(msg["codes"])
                if msg["span"] == len(futures) - 1:
                    del self._pending[msg["id"]]
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            if self.alive:
                log.error("storage reader process %d stopped (%s); outstanding reads count as misses",
                          self.proc.pid, e)
        finally:
            self.alive = False
            for futures in self._pending.values():
                for f in futures:
                    if not f.done():
                        f.set_exception(ReaderLost("storage reader process stopped"))
            self._pending.clear()
            self._writer.close()
            await asyncio.get_running_loop().run_in_executor(None, self._reap)

    def _reap(self) -> None:
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self.alive = False
            self._writer.close()  # the reader sees EOF and exits
            await asyncio.gather(self._task, return_exceptions=True)
