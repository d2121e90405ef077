"""Every thread of an engine that may touch CUDA makes the engine's GPU current.

CUDA's current device is per thread and starts as device 0: an engine on cuda:1 whose compute or
copy thread forgot to set it captures and launches its work on device 0 (a two-GPU host crashed in
the first graph capture). These checks need no GPU: they record the calls instead of making them."""

import threading

import torch

from dualpath import device
from dualpath.config import local_cluster
from dualpath.engine import runtime
from dualpath.engine.buffers import BufferPool
from dualpath.engine.decode import DecodeEngine
from dualpath.engine.prefill import PrefillEngine
from dualpath.transport.cuda import CudaDataPlane

TOKEN = "device-test"


def record_set_device(monkeypatch) -> list[tuple[str, torch.device]]:
    calls: list[tuple[str, torch.device]] = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append((threading.current_thread().name, d)))
    return calls


def test_make_current_sets_a_cuda_device_and_leaves_the_cpu_alone(monkeypatch):
    calls = record_set_device(monkeypatch)
    device.make_current("cpu")
    device.make_current("cuda:1")
    assert calls == [(threading.current_thread().name, torch.device("cuda", 1))]


def test_device_threads_make_the_device_current_before_their_first_task(monkeypatch):
    calls = record_set_device(monkeypatch)
    pool = device.device_threads(2, "worker", "cuda:1")
    try:
        ran_on = {pool.submit(threading.current_thread).result().name for _ in range(8)}
    finally:
        pool.shutdown(wait=True)
    assert {name for name, _ in calls} >= ran_on
    assert {d for _, d in calls} == {torch.device("cuda", 1)}


async def test_every_engine_thread_makes_the_engines_device_current(monkeypatch, tmp_path):
    """Built in this process on the CPU: the thread that builds an engine (its event loop) and
    every thread named after it (compute, data-plane copies) made the engine's device current."""
    bound: dict[str, list[str]] = {}  # thread name -> devices it made current

    def recording(d):
        bound.setdefault(threading.current_thread().name, []).append(str(torch.device(d)))

    monkeypatch.setattr(runtime, "make_current", recording)
    monkeypatch.setattr(device, "make_current", recording)  # what device_threads' threads call
    monkeypatch.setattr(CudaDataPlane, "inline_copy_bytes", 0)  # every write on the copy threads, small ones too
    cfg = local_cluster(1, 1)
    cfg.model.preset, cfg.store.root = "tiny-gqa", str(tmp_path)
    cfg.engine.hbm_blocks, cfg.engine.buffer_blocks = 64, 32
    engines = [PrefillEngine(cfg, cfg.engines[0]), DecodeEngine(cfg, cfg.engines[1])]
    planes = [CudaDataPlane(e.name, TOKEN, device=e.device) for e in engines]
    try:
        await planes[0].start("127.0.0.1")
        await planes[1].start("127.0.0.1")
        buf = BufferPool(n_blocks=2, n_layers=2, bytes_per_layer=4096, pin=False, shared=True)
        handle = planes[1].register(buf.host, share_path=buf.share_path)
        for tc in ("latency", "bulk"):  # a copy thread per traffic class
            await planes[0].write(torch.ones(4096, dtype=torch.uint8), handle, 0, 4096, tc)
        for e in engines:
            await e.in_compute(lambda: None)
        assert bound[threading.current_thread().name] == ["cpu", "cpu"]  # both built on this thread
        engine_threads = [t.name for t in threading.enumerate() if t.name.startswith(("pe0", "de1"))]
        assert {"pe0-compute_0", "de1-compute_0", "pe0-copy-latency_0", "pe0-copy-bulk_0"} <= set(engine_threads)
        for name in engine_threads:
            assert bound.get(name) == ["cpu"], f"{name} never made its engine's device current"
    finally:
        for p in planes:
            await p.close()
        for e in engines:
            e.compute.shutdown(wait=True)
