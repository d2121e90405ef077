"""`dualpath bench store`: block-file read/write GB/s next to a raw sequential read of the same bytes.

Both reads come from the page cache (files are read once before timing), so the ratio measures the
store's own overhead: headers, per-layer checksums, one preadv per block and span, the reader
processes and their messages.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time

import numpy as np

from dualpath.bench.common import write_json
from dualpath.engine.buffers import BufferPool
from dualpath.storage.blockfile import BlockShape
from dualpath.storage.keys import block_chain
from dualpath.storage.store import open_store


def _raw_read(path: str, nbytes: int, chunk: int) -> float:
    buf = bytearray(chunk)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return nbytes / (time.perf_counter() - t0)


async def _store_rates(root: str, shape: BlockShape, n_blocks: int, readers: int) -> tuple[float, float]:
    astore = open_store(root, shape, 1 << 40, readers=readers, fsync=False, write_threads=readers)
    keys = block_chain(list(range(64 * n_blocks)), shape.fingerprint, 64)
    rng = np.random.default_rng(0)
    data = [rng.integers(0, 256, shape.bytes_per_layer, dtype=np.uint8) for _ in range(shape.n_layers)]
    sem = asyncio.Semaphore(readers)

    async def bounded(coro):
        async with sem:
            return await coro

    t0 = time.perf_counter()
    await asyncio.gather(*(bounded(astore.write(k, data)) for k in keys))
    write_rate = n_blocks * shape.n_layers * shape.bytes_per_layer / (time.perf_counter() - t0)
    # Reads go as engines issue them: one request's blocks at a time (batches of 32 blocks), into a
    # shared buffer run that the reader processes map.
    batch = 32
    buf = BufferPool(batch, shape.n_layers, shape.bytes_per_layer, pin=False, shared=True)
    run_ = buf.try_alloc(batch)
    await astore.attach(buf.share_path, buf.host.numel())

    async def read_all() -> None:
        for i in range(0, n_blocks, batch):
            group = keys[i : i + batch]
            assert all(await astore.read_many(group, buf.slot_dests(run_, 0)))

    await read_all()  # warm the page cache
    t0 = time.perf_counter()
    await read_all()
    read_rate = n_blocks * shape.n_layers * shape.bytes_per_layer / (time.perf_counter() - t0)
    await astore.close()
    return read_rate, write_rate


def run(directory: str, block_mib: float, blocks: int, layers: int, readers: int, out: str) -> dict:
    root = os.path.join(directory, "dualpath-bench-store")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    bpl = int(block_mib * (1 << 20)) // layers
    shape = BlockShape(layers, bpl, "uint8", b"bench-store-fp!!")
    total = blocks * layers * bpl
    read_rate, write_rate = asyncio.run(_store_rates(os.path.join(root, "blocks"), shape, blocks, readers))
    raw = os.path.join(root, "raw.bin")
    with open(raw, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(total >> 20):
            f.write(chunk)
    raw_bytes = (total >> 20) << 20
    _raw_read(raw, raw_bytes, 1 << 22)  # warm
    raw_rate = max(_raw_read(raw, raw_bytes, 1 << 22) for _ in range(2))
    shutil.rmtree(root, ignore_errors=True)
    result = {"bench": "store", "dir": directory, "block_bytes": layers * bpl, "blocks": blocks,
              "layers": layers, "readers": readers, "store_read_GBps": read_rate / 1e9,
              "store_write_GBps": write_rate / 1e9, "raw_sequential_read_GBps": raw_rate / 1e9,
              "read_ratio": read_rate / raw_rate}
    write_json(out, result)
    return result
