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
from tests.conftest import loop_turns, until

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


def test_a_full_file_system_evicts_blocks_though_the_store_is_within_its_capacity(tmp_path):
    """Another tenant fills the disk: the store gives way, least recently used first, so that the file
    system keeps min_free bytes free and writes go on succeeding. The free space is a model of a
    10-block disk (what the store's files take, and the tenant's), not a disk really filled."""
    block, tenant = SHAPE.file_bytes, [0]

    def free_bytes(root: str) -> int:
        used = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
        return max(0, 10 * block - used - tenant[0])

    store = FileStore(str(tmp_path), SHAPE, capacity_bytes=1 << 40, min_free_bytes=2 * block, free_bytes=free_bytes)
    keys = block_chain(list(range(64 * 6)), FP, 64)
    for i in range(4):
        store.write(keys[i], layers_for(i))
    assert store.stats.evictions == 0  # 6 blocks free
    assert store.read_into(keys[0], empty())  # key 0 becomes most recently used
    tenant[0] = 4 * block  # 2 blocks free: one more block would leave less than min_free
    store.write(keys[4], layers_for(4))
    assert [store.contains(k) for k in keys[:5]] == [True, False, True, True, True]
    assert store.stats.evictions == 1 and free_bytes(str(tmp_path)) == 2 * block
    tenant[0] = 6 * block  # the tenant takes every byte left: the disk is full
    assert free_bytes(str(tmp_path)) == 0
    store.write(keys[5], layers_for(5))  # three blocks make way: min_free again once it is written
    assert [store.contains(k) for k in keys] == [False, False, False, False, True, True]
    assert free_bytes(str(tmp_path)) == 2 * block and store.stats.evictions == 4


def test_the_engines_store_keeps_the_configured_default_free_space():
    """open_store (the engines') evicts by free space by default, as store.min_free_gb says."""
    import inspect

    from dualpath.config import StoreConfig
    from dualpath.storage.store import DEFAULT_MIN_FREE_BYTES

    assert inspect.signature(open_store).parameters["min_free_bytes"].default == DEFAULT_MIN_FREE_BYTES
    assert DEFAULT_MIN_FREE_BYTES == StoreConfig().min_free_gb * 1e9 > 0


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


@pytest.mark.cluster
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


def test_the_emulated_nic_queues_each_io_behind_the_last_at_its_rate(tmp_path, monkeypatch):
    """The storage-NIC emulation's arithmetic, on a fake clock: an I/O of n bytes holds the NIC for
    n / rate seconds after the I/O before it (a FIFO queue), and the backlog is what is still queued."""
    from dualpath.storage import snic

    now = [100.0]
    monkeypatch.setattr(snic.time, "monotonic", lambda: now[0])
    nic = snic.SnicBucket(str(tmp_path), node=0, direction="read", gbps=0.05)
    assert nic.reserve(50_000_000) == 101.0  # idle: from now, 1 s for 50 MB at 50 MB/s
    assert nic.reserve(25_000_000) == 101.5  # behind the first
    assert nic.backlog_bytes() == 75_000_000
    now[0] = 101.25
    assert nic.backlog_bytes() == 12_500_000
    now[0] = 200.0  # idle since 101.5: the next I/O starts now, not in the past
    assert nic.backlog_bytes() == 0 and nic.reserve(5_000_000) == 200.1
    other = snic.SnicBucket(str(tmp_path), node=0, direction="read", gbps=0.05)  # another engine of node 0
    assert other.reserve(5_000_000) == pytest.approx(200.2)  # shares the NIC
    assert snic.SnicBucket(str(tmp_path), node=1, direction="read", gbps=0.05).reserve(5_000_000) == 200.1
    for bucket in (nic, other):
        bucket.close()


@pytest.mark.cluster
async def test_throttled_writes_and_reads_wait_for_the_emulated_nic(tmp_path):
    """Through the throttled store the blocks arrive whole, and no write or read returns before the
    emulated NIC has carried its bytes: the queue is empty when they are all done. (No bound on how
    long they took: a busy host may take longer, never less.)"""
    shape = BlockShape(2, 1 << 20, "uint8", FP)  # 2 MiB blocks
    astore = open_store(str(tmp_path), shape, 1 << 33, node=0, read_gbps=0.5, write_gbps=0.5)
    keys = block_chain(list(range(64 * 10)), FP, 64)
    data = layers_for(0, shape)
    t0 = time.monotonic()
    await asyncio.gather(*(astore.write(k, data) for k in keys))
    assert astore.write_bucket.backlog_bytes() == 0
    assert time.monotonic() - t0 >= 0.999 * 10 * shape.file_bytes / 0.5e9  # never faster than the NIC
    buf, run = await attached(astore, shape, 10)
    oks = await asyncio.gather(*(astore.read_many([k], buf.slot_dests(run, i)) for i, k in enumerate(keys)))
    assert astore.read_bucket.backlog_bytes() == 0 and astore.read_queue_bytes() == 0
    await astore.close()
    assert all(ok == [True] for ok in oks)
    assert all((o == e).all() for o, e in zip(blocks_in(buf, run)[7], data))


def test_layer_spans_cover_every_layer_once_with_layer_0_first_and_alone():
    for n_layers in (1, 2, 3, 24, 27, 61):
        for n_spans in (1, 2, 4, 8, 100):
            spans = layer_spans(n_layers, n_spans)
            assert [l for sp in spans for l in sp] == list(range(n_layers))
            assert len(spans) == min(n_spans, n_layers) and all(len(sp) for sp in spans)
            if n_spans > 1:
                assert spans[0] == range(1)


@pytest.mark.cluster
async def test_layerwise_read_announces_each_layer_as_it_lands_and_stops_at_a_corrupt_one(tmp_path):
    shape = BlockShape(4, 1 << 18, "uint8", FP)  # 4 layers of 256 KiB per block
    astore = open_store(str(tmp_path), shape, 1 << 33, node=0, read_gbps=0.1, readers=2)
    keys = stored(astore.store, 6)
    buf, run = await attached(astore, shape, 6)
    seen = []
    ok = await astore.read_many(keys, buf.slot_dests(run, 0), seen.append)
    assert ok == [True] * 6 and seen == [0, 1, 2, 3]
    assert all((o == e).all() for i, out in enumerate(blocks_in(buf, run)) for o, e in zip(out, layers_for(i, shape)))
    with open(astore.store.path(keys[3]), "r+b") as f:  # corrupt layer 2 of block 3
        f.seek(HEADER_BYTES + 2 * shape.bytes_per_layer + 5)
        f.write(b"\xff\x00\xff")
    seen.clear()
    ok = await astore.read_many(keys, buf.slot_dests(run, 0), seen.append)
    assert ok == [True, True, True, False, True, True]
    assert seen in ([], [0], [0, 1])  # never the corrupt layer or any after it
    assert astore.store.stats.corrupt == 1 and not os.path.exists(astore.store.path(keys[3]))
    await astore.close()


@pytest.mark.cluster
async def test_layer_0_is_announced_while_the_later_layers_are_still_on_the_nic(tmp_path, monkeypatch):
    """Compute starts on layer 0 before the rest of the blocks have come through the storage NIC. The
    emulated NIC is held after the first span of layers (one span let through per release): layer 0
    is announced all the same, and each later layer only once the NIC has carried it."""
    from dualpath.storage import store as store_module

    nic = asyncio.Semaphore(0)

    async def held_nic(end: float) -> None:
        await nic.acquire()

    monkeypatch.setattr(store_module, "_nic_done", held_nic)
    shape = BlockShape(4, 1 << 12, "uint8", FP)  # spans: layer 0, 1, 2, 3
    astore = open_store(str(tmp_path), shape, 1 << 33, readers=2)
    keys = stored(astore.store, 6)
    buf, run = await attached(astore, shape, 6)
    seen, layer0 = [], asyncio.Event()

    def on_layer(layer: int) -> None:
        seen.append(layer)
        layer0.set()

    reading = asyncio.create_task(astore.read_many(keys, buf.slot_dests(run, 0), on_layer))
    nic.release()
    await asyncio.wait_for(layer0.wait(), 60)  # a bound on a hang only
    await loop_turns()  # whatever else could run now does
    assert seen == [0] and not reading.done()
    for _ in range(3):
        nic.release()
    assert await asyncio.wait_for(reading, 60) == [True] * 6 and seen == [0, 1, 2, 3]
    await astore.close()


@pytest.mark.cluster
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


@pytest.mark.cluster
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


@pytest.mark.cluster
async def test_read_queue_is_visible_while_throttled(tmp_path):
    shape = BlockShape(1, 1 << 20, "uint8", FP)
    astore = open_store(str(tmp_path), shape, 1 << 33, node=3, read_gbps=0.02)
    keys = block_chain(list(range(64 * 10)), FP, 64)
    for k in keys:
        astore.store.write(k, layers_for(1, shape))
    buf, run = await attached(astore, shape, 10)
    reads = [asyncio.create_task(astore.read_many([k], buf.slot_dests(run, i))) for i, k in enumerate(keys)]
    # the queue shows the reads waiting for the throttled NIC (2.5 MB/s: 10 MiB take about 4 s)
    await until(lambda: astore.read_queue_bytes() > 5 * shape.file_bytes, "more than 5 blocks queued to read")
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
    await loop_turns()  # nothing frees a block: the waiter must still be waiting after it had every chance to run
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
    await loop_turns()  # nothing frees a block: the waiter must still be waiting after it had every chance to run
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
