"""The block KV store: one file per block in a directory (local disk or a shared-FS mount).

- Writes are atomic (temp file, fsync, rename): readers in other processes see a whole block or none.
- Reads land each layer straight in the caller's buffers (no extra copy) and verify every
  layer's checksum; a request's blocks are read in spans of layers, so compute can start early.
  A bad block is a miss: the file is removed and counted, and no exception reaches the caller
  (DESIGN.md §5: never wrong tokens).
- Least-recently-used blocks are evicted past a capacity limit, and also while the file system has
  less than ``min_free_bytes`` free (another tenant, logs or a second store can fill the disk first).
- The store is private to the cluster's user: directories 0700, block files 0600, whatever the umask
  (a block another user could read or even list tells which prompts were served; docs/SECURITY.md).
- A temp file left by a crash is ignored by readers and removed at start.

``FileStore`` is the synchronous core (thread safe). ``AsyncStore`` is the engines' asynchronous
view: reads run in reader processes that write into the engine's shared DRAM buffer
(``readers.py``), writes on a thread pool, both behind the storage-NIC emulation (``snic.py``).
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from dualpath.storage.blockfile import (HEADER_BYTES, BlockFormatError, BlockShape, checksum, decode_header,
                                        encode_header)
from dualpath.storage.private import DIR_MODE, FILE_MODE, private_dir, private_file, tighten
from dualpath.storage.readers import Reader, ReaderLost
from dualpath.storage.snic import SnicBucket

TMP_SUFFIX = ".tmp"
_HOST = socket.gethostname().replace(".", "_")
STALE_TMP_S = 3600.0
OK, ABSENT, CORRUPT = 0, 1, 2  # the outcome of reading a block (or a span of its layers)
DEFAULT_MIN_FREE_BYTES = 1_000_000_000  # = StoreConfig.min_free_gb's default


def filesystem_free_bytes(root: str) -> int:
    """Bytes an unprivileged writer may still use on root's file system (root's reserve excluded)."""
    st = os.statvfs(root)
    return st.f_bavail * st.f_frsize


def _abandoned(path: str, name: str) -> bool:
    """A temp file is torn (its writer crashed) if its writer process on this host is gone, or,
    for writers on other hosts of a shared file system, if it is older than STALE_TMP_S.
    A live writer's temp file is left alone."""
    parts = name.split(TMP_SUFFIX + ".", 1)[-1].split(".")
    if len(parts) == 3 and parts[0] == _HOST and parts[1].isdigit():
        try:
            os.kill(int(parts[1]), 0)
            return False
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    try:
        return time.time() - os.stat(path).st_mtime > STALE_TMP_S
    except FileNotFoundError:
        return False


@dataclass(frozen=True)
class SlotDests:
    """Where read_many puts a request's blocks in the attached buffer: layer l of block i at
    ``offset + i * bytes_per_layer + l * layer_stride`` (a buffer run is layer-major)."""

    offset: int
    layer_stride: int


@dataclass
class StoreStats:
    reads: int = 0
    read_bytes: int = 0  # whole files, headers included: what the storage NIC carries
    misses: int = 0
    corrupt: int = 0
    writes: int = 0
    write_bytes: int = 0
    evictions: int = 0
    torn_cleaned: int = 0


def _preadv(path: str, reads: list[tuple[int, list]]) -> int | None:
    """Scatter-read (offset, buffers) pieces of a file; total bytes read, or None if it is absent."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return sum(os.preadv(fd, bufs, off) for off, bufs in reads)
    finally:
        os.close(fd)


class FileStore:
    """min_free_bytes: evict while the file system has less free than this (0: by capacity only).
    free_bytes(root) says how much it has (injectable: tests do not fill a disk)."""

    def __init__(self, root: str, shape: BlockShape, capacity_bytes: int, fsync: bool = True, scan: bool = True,
                 min_free_bytes: int = 0, free_bytes: Callable[[str], int] = filesystem_free_bytes):
        self.root, self.shape, self.capacity, self.fsync = root, shape, capacity_bytes, fsync
        self.min_free, self._free_bytes = min_free_bytes, free_bytes
        self.stats = StoreStats()
        self._lock = threading.Lock()
        self._lru: OrderedDict[bytes, int] = OrderedDict()  # key -> file bytes, oldest first
        self._used = 0
        private_dir(root)
        if scan:  # a reader process (reads only) skips the index
            self._scan()

    # -- layout --

    def path(self, key: bytes) -> str:
        h = key.hex()
        return os.path.join(self.root, h[:2], h + ".kv")

    def _scan(self) -> None:
        """Index the blocks already on disk (oldest first) and remove torn temp files."""
        found = []
        for sub in os.scandir(self.root):
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            tighten(sub.path, sub.stat().st_mode, DIR_MODE)
            for f in os.scandir(sub.path):
                if TMP_SUFFIX in f.name:
                    if _abandoned(f.path, f.name):
                        try:
                            os.unlink(f.path)
                            self.stats.torn_cleaned += 1
                        except FileNotFoundError:
                            pass
                elif f.name.endswith(".kv"):
                    st = f.stat()
                    tighten(f.path, st.st_mode, FILE_MODE)
                    found.append((st.st_mtime, bytes.fromhex(f.name[:-3]), st.st_size))
        for _, key, size in sorted(found):
            self._lru[key] = size
            self._used += size

    # -- queries --

    def contains(self, key: bytes) -> bool:
        return os.path.exists(self.path(key))

    def lookup(self, chain: list[bytes]) -> int:
        """How many leading blocks of the chain are stored."""
        n = 0
        for key in chain:
            if not self.contains(key):
                break
            n += 1
        return n

    @property
    def used_bytes(self) -> int:
        return self._used

    # -- reads --

    def _miss(self, key: bytes, path: str, corrupt: bool) -> int:
        if corrupt:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        code = CORRUPT if corrupt else ABSENT
        self.account(key, code, 0)
        return code

    def account(self, key: bytes, code: int, nbytes: int) -> None:
        """Count a read's outcome (also for reads a reader process did on this store's behalf). A
        block found corrupt has been removed; one found absent was evicted by another process:
        either way it leaves the index."""
        with self._lock:
            self.stats.read_bytes += nbytes
            if code == OK:
                self.stats.reads += 1
                if key in self._lru:
                    self._lru.move_to_end(key)
                return
            self.stats.misses += 1
            self.stats.corrupt += code == CORRUPT
            self._used -= self._lru.pop(key, 0)

    def read_into(self, key: bytes, dests: list) -> bool:
        """Read all layers of a block; dests[l] is a writable buffer of bytes_per_layer bytes.
        Returns False (a miss) if the block is absent, of another model/format, or corrupt."""
        s = self.shape
        assert len(dests) == s.n_layers
        path = self.path(key)
        header = bytearray(HEADER_BYTES)
        n = _preadv(path, [(0, [header, *dests])])
        if n is None:
            self._miss(key, path, corrupt=False)
            return False
        try:
            if n != s.file_bytes:
                raise BlockFormatError(f"size {n}, expected {s.file_bytes}")
            crcs = decode_header(header, s, key)
            for l, d in enumerate(dests):
                if checksum(d) != crcs[l]:
                    raise BlockFormatError(f"layer {l} checksum mismatch")
        except BlockFormatError:
            self._miss(key, path, corrupt=True)
            return False
        self.account(key, OK, n)
        return True

    def read_checksums(self, key: bytes) -> tuple[int, list[int] | None]:
        """A block's header: (OK, its per-layer checksums), or (ABSENT or CORRUPT, None)."""
        path = self.path(key)
        header = bytearray(HEADER_BYTES)
        if _preadv(path, [(0, [header])]) is None:
            return self._miss(key, path, corrupt=False), None
        try:
            return OK, decode_header(bytes(header), self.shape, key)
        except BlockFormatError:
            return self._miss(key, path, corrupt=True), None

    def read_layers(self, key: bytes, first: int, dests: list, sums: list[int]) -> int:
        """Read layers [first, first + len(dests)) only: one contiguous slice of the file, one
        preadv, checked against the header's checksums. OK, or ABSENT / CORRUPT (a miss)."""
        path, bpl = self.path(key), self.shape.bytes_per_layer
        n = _preadv(path, [(HEADER_BYTES + first * bpl, dests)])
        if n is None:
            return self._miss(key, path, corrupt=False)
        if n != len(dests) * bpl or any(checksum(d) != sums[first + i] for i, d in enumerate(dests)):
            return self._miss(key, path, corrupt=True)
        return OK

    def read_layer(self, key: bytes, layer: int, dest) -> bool:
        code, sums = self.read_checksums(key)
        return code == OK and self.read_layers(key, layer, [dest], sums) == OK

    # -- writes --

    def write(self, key: bytes, layers: list) -> None:
        """Atomically store a block; layers[l] holds bytes_per_layer bytes."""
        s = self.shape
        assert len(layers) == s.n_layers
        views = [memoryview(x).cast("B") for x in layers]
        assert all(len(v) == s.bytes_per_layer for v in views), "layer slice of the wrong size"
        path = self.path(key)
        private_dir(os.path.dirname(path))
        self._evict(self._space_short(s.file_bytes))  # room on the file system first, or the write fails
        tmp = f"{path}{TMP_SUFFIX}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        header = encode_header(s, key, [checksum(v) for v in views])
        fd = private_file(tmp, os.O_WRONLY | os.O_EXCL)
        try:
            written, todo = 0, [header, *views]
            while todo:  # writev may write less than asked on some file systems
                n = os.writev(fd, todo)
                written += n
                while todo and n >= len(todo[0]):
                    n -= len(todo[0])
                    todo.pop(0)
                if todo and n:
                    todo[0] = memoryview(todo[0])[n:]
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, path)
        with self._lock:
            self.stats.writes += 1
            self.stats.write_bytes += written
            self._used += s.file_bytes - self._lru.pop(key, 0)
            self._lru[key] = s.file_bytes
        self._evict()

    def _space_short(self, incoming: int) -> int:
        """Bytes to free so that the file system still has min_free bytes free once `incoming` more
        are written. A cache gives way to everything else on its disk: full, every write would fail."""
        if not self.min_free:
            return 0
        return max(0, self.min_free + incoming - self._free_bytes(self.root))

    def _evict(self, short: int = 0) -> None:
        """Drop least-recently-used blocks until the store is within its capacity and `short` bytes
        are freed. The bytes freed are counted by block size, not by reading the file system again
        after each unlink: one that frees space late would otherwise lose the whole store."""
        while True:
            with self._lock:
                if (self._used <= self.capacity and short <= 0) or not self._lru:
                    return
                key, size = self._lru.popitem(last=False)
                self._used -= size
                self.stats.evictions += 1
            short -= size
            try:
                os.unlink(self.path(key))
            except FileNotFoundError:
                pass


def layer_spans(n_layers: int, n_spans: int) -> list[range]:
    """How read_many groups a block's layers: layer 0 alone first, so that compute can start as soon as
    possible, then the rest in n_spans - 1 nearly equal spans (fewer spans: fewer syscalls and
    messages; more: each layer announced closer to when it lands)."""
    if n_spans <= 1 or n_layers == 1:
        return [range(n_layers)]
    rest, k = n_layers - 1, min(n_spans - 1, n_layers - 1)
    return [range(1)] + [range(1 + rest * i // k, 1 + rest * (i + 1) // k) for i in range(k)]


async def _nic_done(end: float) -> None:
    """Wait until the emulated NIC's reservation ends: the real I/O may have been faster."""
    delay = end - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


class BusyClock:
    """Seconds during which at least one piece of some work was under way (overlaps count once):
    what drain rates are measured over (an engine's storage reads; a DE's path-B deliveries)."""

    def __init__(self) -> None:
        self.active, self.since, self.total = 0, 0.0, 0.0

    def enter(self) -> None:
        if not self.active:
            self.since = time.monotonic()
        self.active += 1

    def leave(self) -> None:
        assert self.active > 0, "BusyClock.leave() without enter()"
        self.active -= 1
        if not self.active:
            self.total += time.monotonic() - self.since

    def seconds(self) -> float:
        return self.total + (time.monotonic() - self.since if self.active else 0.0)


class AsyncStore:
    """The engines' view: reads by reader processes straight into the engine's shared buffer
    (readers.py), writes on a thread pool; both throttled by the emulated SNIC."""

    def __init__(self, store: FileStore, read_bucket: SnicBucket, write_bucket: SnicBucket, readers: int = 4,
                 read_spans: int = 8, write_threads: int = 4):
        self.store, self.read_bucket, self.write_bucket = store, read_bucket, write_bucket
        self._pool = ThreadPoolExecutor(write_threads, thread_name_prefix="store-write")
        self._n_readers = readers
        self._readers: list[Reader] = []
        self._buffer_bytes = 0
        self._spans = read_spans  # see layer_spans
        self.pending_read_bytes = 0
        # How fast this engine drains its read queue, whatever bounds it (the NIC, the readers, the
        # event loop): verified bytes over the time reads were outstanding, cumulative.
        self.read_done_bytes = 0
        self.reading = BusyClock()

    @property
    def stats(self) -> StoreStats:
        return self.store.stats

    def contains(self, key: bytes) -> bool:
        return self.store.contains(key)

    async def attach(self, buffer_path: str, buffer_bytes: int) -> None:
        """Start the reader processes over the engine's DRAM buffer (a mappable shared file)."""
        s = self.store.shape
        hello = {"root": self.store.root, "shape": [s.n_layers, s.bytes_per_layer, s.dtype, s.fingerprint],
                 "buffer": buffer_path, "buffer_bytes": buffer_bytes}
        self._readers = [Reader(hello) for _ in range(self._n_readers)]
        self._buffer_bytes = buffer_bytes
        await self._live_readers()

    async def _live_readers(self) -> list[Reader]:
        """The readers, each restarted if its process died (its reads then counted as misses)."""
        if not self._readers:
            raise RuntimeError("the store has no buffer attached: call attach() first")
        await asyncio.gather(*(r.ensure_running() for r in self._readers if not r.alive))
        return self._readers

    async def read_many(self, keys: list[bytes], dest: SlotDests, on_layer=None) -> list[bool]:
        """Read a request's blocks into the attached buffer, layer by layer: the headers and the
        first span of layers of every block, then the next span, ... (each a contiguous slice of
        its file). ``on_layer(l)`` is called as soon as layer l of every block is in place and
        verified, so the PE can compute layer 0 while later layers still load (path A, DESIGN.md
        §2). After a miss no further layer is announced. The blocks are split into one contiguous
        group per reader process; every span is one reservation on the emulated NIC."""
        if not keys:
            return []
        shape, bpl = self.store.shape, self.store.shape.bytes_per_layer
        readers = await self._live_readers()
        end = dest.offset + (len(keys) - 1) * bpl + (shape.n_layers - 1) * dest.layer_stride + bpl
        if dest.offset < 0 or dest.layer_stride < len(keys) * bpl or end > self._buffer_bytes:
            # checked here: a reader would see a short read, take it for a corrupt block and delete it
            raise ValueError(f"{len(keys)} blocks at {dest} do not fit the {self._buffer_bytes}-byte buffer")
        spans = layer_spans(shape.n_layers, self._spans)
        groups = min(len(keys), len(readers))
        bounds = [(len(keys) * g // groups, len(keys) * (g + 1) // groups) for g in range(groups)]
        codes = bytearray(len(keys))  # OK until a span says otherwise
        nbytes = shape.file_bytes * len(keys)
        self.reading.enter()
        self.pending_read_bytes += nbytes
        try:
            ends = [self.read_bucket.reserve(bpl * len(sp) * len(keys) + (HEADER_BYTES * len(keys) if k == 0 else 0))
                    for k, sp in enumerate(spans)]
            futures = []  # [group][span]
            for r, (lo, hi) in zip(readers, bounds):
                try:
                    futures.append(r.submit(keys[lo:hi], dest.offset + lo * bpl, dest.layer_stride, spans))
                except ReaderLost:
                    futures.append([])
                    codes[lo:hi] = bytes([ABSENT]) * (hi - lo)
            for k, sp in enumerate(spans):
                for (lo, hi), fs in zip(bounds, futures):
                    if fs:  # a reader's codes are cumulative: a block that failed keeps its code
                        try:
                            codes[lo:hi] = await fs[k]
                        except ReaderLost:
                            codes[lo:hi] = bytes([ABSENT]) * (hi - lo)
                if any(codes):  # a miss: wait for the other spans (their bytes still land), announce no more
                    continue
                await _nic_done(ends[k])
                if on_layer is not None:
                    for l in sp:
                        on_layer(l)
            for key, code in zip(keys, codes):
                self.store.account(key, code, shape.file_bytes if code == OK else 0)
            self.read_done_bytes += shape.file_bytes * codes.count(OK)
            return [c == OK for c in codes]
        finally:
            self.pending_read_bytes -= nbytes
            self.reading.leave()

    async def write(self, key: bytes, layers: list) -> None:
        end = self.write_bucket.reserve(self.store.shape.file_bytes)
        await asyncio.get_running_loop().run_in_executor(self._pool, self.store.write, key, layers)
        await _nic_done(end)

    @property
    def reader_busy_s(self) -> float:
        """Seconds the reader processes spent reading and checking blocks, summed over readers."""
        return sum(r.busy_s for r in self._readers)

    def read_busy_s(self) -> float:
        """Seconds during which this engine had reads outstanding (so far, the current stretch included)."""
        return self.reading.seconds()

    def read_queue_bytes(self) -> int:
        """Storage read queue for the scheduler: the node's emulated NIC backlog when emulation is on
        (it includes the other engines of the node), else this process's outstanding reads."""
        return max(self.read_bucket.backlog_bytes(), self.pending_read_bytes)

    async def close(self) -> None:
        await asyncio.gather(*(r.stop() for r in self._readers))
        self._pool.shutdown(wait=True)
        self.read_bucket.close()
        self.write_bucket.close()


def open_store(root: str, shape: BlockShape, capacity_bytes: int, node: int = 0, read_gbps: float = 0.0,
               write_gbps: float = 0.0, readers: int = 4, fsync: bool = True, read_spans: int = 8,
               write_threads: int = 4, min_free_bytes: int = DEFAULT_MIN_FREE_BYTES) -> AsyncStore:
    return AsyncStore(FileStore(root, shape, capacity_bytes, fsync, min_free_bytes=min_free_bytes),
                      SnicBucket(root, node, "read", read_gbps), SnicBucket(root, node, "write", write_gbps),
                      readers, read_spans, write_threads)
