"""The block store, its file format, the SNIC emulation, write-behind persistence, the DRAM pool."""

import asyncio
import multiprocessing as mp
import os
import time

import numpy as np
import pytest

from dualpath.engine.buffers import BufferPool, BufferTooLarge
from dualpath.engine.kvcache import BlockAllocator, OutOfBlocks
from dualpath.storage.blockfile import HEADER_BYTES, BlockShape
from dualpath.storage.keys import block_chain
from dualpath.storage.persist import Persister
from dualpath.storage.readers import ReaderLost
from dualpath.storage.store import FileStore, layer_spans, open_store

FP = b"model-A-finger!!"
SHAPE = BlockShape(n_layers=3, bytes_per_layer=4096, dtype="float32", fingerprint=FP)


def layers_for(seed: int, shape: BlockShape = SHAPE) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape.bytes_per_layer, dtype=np.uint8) for _ in range(shape.n_layers)]


def empty(shape: BlockShape = SHAPE) -> list[np.ndarray]:
    return [np.zeros(shape.bytes_per_layer, np.uint8) for _ in range(shape.n_layers)]


def stored(store: FileStore, n_blocks: int) -> list[bytes]:
    """Keys of n_blocks chained blocks, block i written with layers_for(i)."""
    keys = block_chain(list(range(64 * n_blocks)), FP, 64)
    for i, k in enumerate(keys):
        store.write(k, layers_for(i, store.shape))
    return keys


def test_chain_keys_depend_on_prefix_and_model():
    a = block_chain(list(range(200)), FP, 64)
    b = block_chain(list(range(200)), b"other-model-fp!!", 64)
    c = block_chain([7] + list(range(1, 200)), FP, 64)
    assert len(a) == 3  # the partial tail block has no key
    assert a != b and not set(a) & set(b)
    assert all(x != y for x, y in zip(a, c))  # a change in block 0 changes every later key


def test_round_trip_and_lookup(tmp_path):
    store = FileStore(str(tmp_path), SHAPE, 1 << 30)
    keys = block_chain(list(range(64 * 4)), FP, 64)
    for i, k in enumerate(keys[:3]):
        store.write(k, layers_for(i))
    assert store.lookup(keys) == 3
    out = empty()
    assert store.read_into(keys[1], out)
    assert all((o == e).all() for o, e in zip(out, layers_for(1)))
    one = np.zeros(SHAPE.bytes_per_layer, np.uint8)
    assert store.read_layer(keys[2], 2, one) and (one == layers_for(2)[2]).all()


def test_flipped_byte_is_a_counted_miss_and_the_file_is_removed(tmp_path):
    store = FileStore(str(tmp_path), SHAPE, 1 << 30)
    key = block_chain(list(range(64)), FP, 64)[0]
    store.write(key, layers_for(0))
    path = store.path(key)
    with open(path, "r+b") as f:
        f.seek(HEADER_BYTES + SHAPE.bytes_per_layer + 17)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    assert store.read_into(key, empty()) is False
    assert store.stats.corrupt == 1 and not os.path.exists(path)
    assert store.lookup([key]) == 0


def test_wrong_model_or_version_is_refused(tmp_path):
    key = block_chain(list(range(64)), FP, 64)[0]
    FileStore(str(tmp_path), SHAPE, 1 << 30).write(key, layers_for(0))
    other = BlockShape(3, 4096, "float32", b"model-B-finger!!")
    assert FileStore(str(tmp_path), other, 1 << 30).read_into(key, empty()) is False
    FileStore(str(tmp_path), SHAPE, 1 << 30).write(key, layers_for(0))
    path = FileStore(str(tmp_path), SHAPE, 1 << 30).path(key)
    with open(path, "r+b") as f:  # bump the format version field
        f.seek(4)
        f.write((99).to_bytes(2, "little"))
    store = FileStore(str(tmp_path), SHAPE, 1 << 30)
    assert store.read_into(key, empty()) is False and store.stats.corrupt == 1


def test_torn_temp_file_is_ignored_and_cleaned(tmp_path):
    store = FileStore(str(tmp_path), SHAPE, 1 << 30)
    key = block_chain(list(range(64)), FP, 64)[0]
    import socket
    dead_pid = 2 ** 22 + 12345  # above the default pid_max: no such process
    torn = store.path(key) + f".tmp.{socket.gethostname().replace('.', '_')}.{dead_pid}.abcd"
    os.makedirs(os.path.dirname(torn), exist_ok=True)
    with open(torn, "wb") as f:
        f.write(b"DPKV" + b"\x00" * 100)  # a crash mid-write
    assert store.lookup([key]) == 0 and store.read_into(key, empty()) is False
    again = FileStore(str(tmp_path), SHAPE, 1 << 30)
    assert again.stats.torn_cleaned == 1 and not os.path.exists(torn)


def test_eviction_is_lru_within_capacity(tmp_path):
    store = FileStore(str(tmp_path), SHAPE, capacity_bytes=3 * SHAPE.file_bytes)
    keys = block_chain(list(range(64 * 5)), FP, 64)
    for i in range(3):
        store.write(keys[i], layers_for(i))
    assert store.read_into(keys[0], empty())  # key 0 becomes most recently used
    store.write(keys[3], layers_for(3))  # evicts key 1, the least recently used
    assert [store.contains(k) for k in keys[:4]] == [True, False, True, True]
    assert store.used_bytes <= 3 * SHAPE.file_bytes and store.stats.evictions == 1


def _hammer(root: str, worker: int, keys: list[bytes], q) -> None:
    store = FileStore(root, SHAPE, 1 << 30)
    bad = 0
    for rnd in range(30):
        for i, k in enumerate(keys):
            if (rnd + worker + i) % 2:
                store.write(k, layers_for(i))
            else:
                out = empty()
                if store.read_into(k, out) and not all((o == e).all() for o, e in zip(out, layers_for(i))):
                    bad += 1
    q.put((bad, store.stats.corrupt))


def test_concurrent_processes_never_see_partial_blocks(tmp_path):
    keys = block_chain(list(range(64 * 4)), FP, 64)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), w, keys, q)) for w in range(4)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert results == [(0, 0)] * 4


async def attached(astore, shape: BlockShape, n_blocks: int) -> tuple[BufferPool, object]:
    """A shared DRAM buffer run of n_blocks, with the store's reader processes mapped onto it."""
    buf = BufferPool(n_blocks, shape.n_layers, shape.bytes_per_layer, pin=False, shared=True)
    await astore.attach(buf.share_path, buf.host.numel())
    return buf, buf.try_alloc(n_blocks)


def blocks_in(buf: BufferPool, run) -> list[list[np.ndarray]]:
    v = buf.view(run).numpy()
    return [[v[l, i] for l in range(v.shape[0])] for i in range(v.shape[1])]


async def test_snic_throttle_rate_is_accurate(tmp_path):
    shape = BlockShape(2, 1 << 20, "uint8", FP)  # 2 MiB blocks
    astore = open_store(str(tmp_path), shape, 1 << 33, node=0, read_gbps=0.05, write_gbps=0.05)
    keys = block_chain(list(range(64 * 30)), FP, 64)
    data = layers_for(0, shape)
    t0 = time.monotonic()
    await asyncio.gather(*(astore.write(k, data) for k in keys))
    write_rate = 30 * shape.file_bytes / (time.monotonic() - t0)
    buf, run = await attached(astore, shape, 30)
    t0 = time.monotonic()
    oks = await asyncio.gather(*(astore.read_many([k], buf.slot_dests(run, i)) for i, k in enumerate(keys)))
    read_rate = 30 * shape.file_bytes / (time.monotonic() - t0)
    await astore.close()
    assert all(ok == [True] for ok in oks)
    assert all((o == e).all() for o, e in zip(blocks_in(buf, run)[7], data))
    assert 0.9 * 0.05e9 <= write_rate <= 1.1 * 0.05e9, write_rate
    assert 0.9 * 0.05e9 <= read_rate <= 1.1 * 0.05e9, read_rate


def test_layer_spans_cover_every_layer_once_with_layer_0_first_and_alone():
    for n_layers in (1, 2, 3, 24, 27, 61):
        for n_spans in (1, 2, 4, 8, 100):
            spans = layer_spans(n_layers, n_spans)
            assert [l for sp in spans for l in sp] == list(range(n_layers))
            assert len(spans) == min(n_spans, n_layers) and all(len(sp) for sp in spans)
            if n_spans > 1:
                assert spans[0] == range(1)


async def test_layerwise_read_announces_each_layer_as_it_lands_and_stops_at_a_corrupt_one(tmp_path):
    shape = BlockShape(4, 1 << 18, "uint8", FP)  # 4 layers of 256 KiB per block
    astore = open_store(str(tmp_path), shape, 1 << 33, node=0, read_gbps=0.1, readers=2)
    keys = stored(astore.store, 6)
    buf, run = await attached(astore, shape, 6)
    seen = []
    t0 = time.monotonic()
    ok = await astore.read_many(keys, buf.slot_dests(run, 0), lambda l: seen.append((l, time.monotonic() - t0)))
    assert ok == [True] * 6 and [l for l, _ in seen] == [0, 1, 2, 3]
    assert all((o == e).all() for i, out in enumerate(blocks_in(buf, run)) for o, e in zip(out, layers_for(i, shape)))
    layer_s = 6 * shape.bytes_per_layer / 0.1e9  # ~16 ms per layer on the emulated NIC
    assert seen[0][1] < seen[-1][1] - 2 * layer_s  # layer 0 is announced well before the last one
    with open(astore.store.path(keys[3]), "r+b") as f:  # corrupt layer 2 of block 3
        f.seek(HEADER_BYTES + 2 * shape.bytes_per_layer + 5)
        f.write(b"\xff\x00\xff")
    seen.clear()
    ok = await astore.read_many(keys, buf.slot_dests(run, 0), lambda l: seen.append((l, 0)))
    assert ok == [True, True, True, False, True, True]
    assert [l for l, _ in seen] in ([], [0], [0, 1])  # never the corrupt layer or any after it
    assert astore.store.stats.corrupt == 1 and not os.path.exists(astore.store.path(keys[3]))
    await astore.close()


async def test_a_reader_process_that_dies_costs_its_reads_not_the_store(tmp_path):
    astore = open_store(str(tmp_path), SHAPE, 1 << 30, readers=2)
    keys = stored(astore.store, 4)
    buf, run = await attached(astore, SHAPE, 4)
    victim = astore._readers[0].proc
    victim.kill()
    victim.wait()
    # Its blocks (the first two) are misses if the death is noticed mid-read, never an exception;
    # then a new reader replaces it.
    ok = await astore.read_many(keys, buf.slot_dests(run, 0))
    assert ok[2:] == [True, True]
    buf.host.zero_()
    ok = await astore.read_many(keys, buf.slot_dests(run, 0))
    assert ok == [True] * 4 and astore._readers[0].proc.pid != victim.pid
    assert all((o == e).all() for i, out in enumerate(blocks_in(buf, run)) for o, e in zip(out, layers_for(i)))
    await astore.close()
    assert all(r.proc.poll() is not None for r in astore._readers)  # closing stops every reader


async def test_reads_that_do_not_fit_the_buffer_or_an_unmappable_buffer_are_refused(tmp_path):
    astore = open_store(str(tmp_path), SHAPE, 1 << 30, readers=1)
    keys = stored(astore.store, 3)
    buf, run = await attached(astore, SHAPE, 2)
    with pytest.raises(ValueError, match="do not fit"):
        await astore.read_many(keys, buf.slot_dests(run, 0))  # 3 blocks into a run of 2
    assert astore.store.lookup(keys) == 3  # nothing was taken for corrupt and deleted
    await astore.close()
    other = open_store(str(tmp_path), SHAPE, 1 << 30, readers=1)
    with pytest.raises(ReaderLost, match="could not start: FileNotFoundError"):
        await other.attach(str(tmp_path / "no-such-buffer"), 4096)
    await other.close()


async def test_read_queue_is_visible_while_throttled(tmp_path):
    shape = BlockShape(1, 1 << 20, "uint8", FP)
    astore = open_store(str(tmp_path), shape, 1 << 33, node=3, read_gbps=0.02)
    keys = block_chain(list(range(64 * 10)), FP, 64)
    for k in keys:
        astore.store.write(k, layers_for(1, shape))
    buf, run = await attached(astore, shape, 10)
    reads = [asyncio.create_task(astore.read_many([k], buf.slot_dests(run, i))) for i, k in enumerate(keys)]
    await asyncio.sleep(0.05)
    assert astore.read_queue_bytes() > 5 * shape.file_bytes
    await asyncio.gather(*reads)
    assert astore.read_queue_bytes() == 0
    await astore.close()


async def test_write_behind_persists_and_flushes(tmp_path):
    astore = open_store(str(tmp_path), SHAPE, 1 << 30)
    p = Persister(astore, max_queued=4, writers=1)
    keys = block_chain(list(range(64 * 10)), FP, 64)
    futs = [p.submit(k, layers_for(i)) for i, k in enumerate(keys)]
    accepted = [f for f in futs if f is not None]
    assert len(accepted) < len(keys) and p.dropped == len(keys) - len(accepted)  # bounded, never blocks
    await p.close()
    assert all(f.result() for f in accepted)
    assert astore.store.lookup(keys) == len(accepted)
    await astore.close()


async def test_buffer_pool_exhaustion_waits_and_release_frees():
    pool = BufferPool(n_blocks=8, n_layers=2, bytes_per_layer=256, pin=False)
    a = await pool.alloc(5)
    b = await pool.alloc(3)
    assert pool.free_blocks == 0 and pool.try_alloc(1) is None
    waiter = asyncio.create_task(pool.alloc(4))
    await asyncio.sleep(0.01)
    assert not waiter.done()  # back-pressure
    pool.release(a)
    c = await asyncio.wait_for(waiter, 1)
    assert c.n_blocks == 4
    pool.release(b)
    pool.release(c)
    assert pool.free_blocks == 8 and (await pool.alloc(8)).n_blocks == 8  # runs coalesced
    with pytest.raises(BufferTooLarge):
        pool.try_alloc(9)


async def test_hbm_blocks_wait_the_same_way_and_a_request_larger_than_the_pool_is_refused():
    """One way to wait for memory (engine/room.py): the HBM allocator waits for a release as the
    buffer pool does, instead of polling."""
    alloc = BlockAllocator(6)
    held = alloc.alloc(5)
    waiter = asyncio.create_task(alloc.alloc_wait(3))
    await asyncio.sleep(0.01)
    assert not waiter.done()  # back-pressure
    alloc.release(held[:2])
    got = await asyncio.wait_for(waiter, 1)
    assert len(got) == 3 and alloc.free == 0 and not set(got) & set(held[2:])
    with pytest.raises(OutOfBlocks, match="the pool has 6"):
        await alloc.alloc_wait(7)


def test_buffer_views_are_zero_copy_and_layer_major():
    pool = BufferPool(n_blocks=4, n_layers=3, bytes_per_layer=8, pin=False)
    pool.host.zero_()
    run = pool.try_alloc(2)
    dest = pool.slot_dests(run, 1)  # where a storage read puts slot 1
    off, n = pool.layer_range(run, 2)
    assert n == 16 and dest.offset + 2 * dest.layer_stride == off + 8
    pool.view(run)[2, 1] = 7  # views write through to the pool
    assert (pool.host[off + 8 : off + 16] == 7).all() and (pool.host[off : off + 8] == 0).all()


def test_a_key_is_blake2b_of_the_previous_key_the_model_and_the_blocks_int64_token_ids():
    """The key format is what stored blocks are named by: it must not drift with an implementation."""
    import hashlib

    tokens = list(range(64)) + [255] * 64
    first = hashlib.blake2b(b"\x00" * 16 + FP + b"".join(t.to_bytes(8, "little") for t in tokens[:64]),
                            digest_size=16).digest()
    second = hashlib.blake2b(first + FP + b"".join(t.to_bytes(8, "little") for t in tokens[64:]),
                             digest_size=16).digest()
    assert block_chain(tokens + [1, 2, 3], FP, 64) == [first, second]
