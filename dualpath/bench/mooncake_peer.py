"""The Mooncake Transfer Engine's TCP transport as `bench transport`'s side-by-side peer (issue #34).

Mooncake (``pip install 'dualpath[mooncake]'``: mooncake-transfer-engine-non-cuda, the engine SGLang
and vLLM use for PD transfers) is optional: ``version()`` is None where it does not import, and the
bench then runs dualpath alone. As dualpath's, the receiver is a process of its own (``serve``): it
registers a host region and publishes the session id ("host:rpc_port", the P2PHANDSHAKE form: no
metadata server) and the region's address; the writer (``MooncakeWriter``, in the bench's process)
writes into it with transfer_sync_write (one write) and batch_transfer_sync_write (many at once).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import tempfile
from collections.abc import Iterator

import torch

PACKAGE = "mooncake-transfer-engine-non-cuda"
HOST = "127.0.0.1"  # loopback only
# Mooncake logs through glog at INFO by default: a screenful per engine. ERROR keeps real failures.
os.environ.setdefault("MC_LOG_LEVEL", "ERROR")


def version() -> str | None:
    """The installed Mooncake's version ("0.3.13.post1"), or None if mooncake.engine does not import."""
    try:
        importlib.import_module("mooncake.engine")
    except Exception:  # ImportError, or a wheel built for another platform (OSError from the .so)
        return None
    for dist in (PACKAGE, "mooncake-transfer-engine"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(dist)
    return "unknown"


@contextlib.contextmanager
def _stderr_kept_unless(failed: list[bool]) -> Iterator[None]:
    """Hold back what the C++ side writes to fd 2 meanwhile (glog's "logging before InitGoogleLogging"
    banner and a benign "Local segment descriptor not found" on every start), and let it through
    only if failed[0] was set: an engine that did not start says why."""
    with tempfile.TemporaryFile() as held:
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if failed[0]:
                held.seek(0)
                os.write(2, held.read())


def _engine():
    """A TransferEngine on loopback: TCP transport, P2P handshake (no metadata server), no devices."""
    from mooncake.engine import TransferEngine

    engine, failed = TransferEngine(), [False]
    with _stderr_kept_unless(failed):
        failed[0] = engine.initialize(HOST, "P2PHANDSHAKE", "tcp", "") != 0
    if failed[0]:
        raise RuntimeError("Mooncake TransferEngine.initialize(tcp, P2PHANDSHAKE) failed")
    return engine


def _register(engine, t: torch.Tensor) -> int:
    """Register a host tensor's bytes with the engine; its address."""
    if engine.register_memory(t.data_ptr(), t.numel()) != 0:
        raise RuntimeError(f"Mooncake register_memory of {t.numel()} bytes failed")
    return t.data_ptr()


def serve(q, stop, region_bytes: int) -> None:
    """The receiving process: a zeroed host region of region_bytes registered with its own engine;
    puts {"session", "addr", "nbytes", "version"} (or {"error"}), waits for stop, then puts
    {"landed_bytes"}: the region's nonzero bytes (the bench writes ones), proof the writes landed."""
    try:
        engine = _engine()
        region = torch.zeros(region_bytes, dtype=torch.uint8)
        addr = _register(engine, region)
        q.put({"session": f"{HOST}:{engine.get_rpc_port()}", "addr": addr, "nbytes": region_bytes,
               "version": version()})
    except Exception as e:  # the bench goes on without Mooncake and says why
        q.put({"error": f"{type(e).__name__}: {e}"})
        return
    stop.wait()
    q.put({"landed_bytes": int(region.count_nonzero())})
    engine.unregister_memory(addr)


class MooncakeWriter:
    """The writing end: its own engine, a registered host source of src_bytes (all ones), and the
    receiver's region (serve's published dict). Calls block: Mooncake's Python API is synchronous."""

    def __init__(self, peer: dict, src_bytes: int):
        self.engine = _engine()
        self.src = torch.ones(src_bytes, dtype=torch.uint8)
        self.src_addr = _register(self.engine, self.src)
        self.session, self.dst_addr, self.dst_bytes = peer["session"], peer["addr"], peer["nbytes"]

    def write(self, src_off: int, dst_off: int, nbytes: int) -> None:
        self._check(src_off, dst_off, nbytes)
        ret = self.engine.transfer_sync_write(self.session, self.src_addr + src_off, self.dst_addr + dst_off, nbytes)
        if ret != 0:
            raise RuntimeError(f"Mooncake transfer_sync_write of {nbytes} bytes returned {ret}")

    def write_batch(self, pieces: list[tuple[int, int, int]]) -> None:
        """(source offset, destination offset, bytes) pieces as one batch: all in flight, one wait."""
        for src_off, dst_off, n in pieces:
            self._check(src_off, dst_off, n)
        ret = self.engine.batch_transfer_sync_write(self.session, [self.src_addr + s for s, _, _ in pieces],
                                                    [self.dst_addr + d for _, d, _ in pieces],
                                                    [n for _, _, n in pieces])
        if ret != 0:
            raise RuntimeError(f"Mooncake batch_transfer_sync_write of {len(pieces)} pieces returned {ret}")

    def _check(self, src_off: int, dst_off: int, nbytes: int) -> None:
        if min(src_off, dst_off) < 0 or dst_off + nbytes > self.dst_bytes or src_off + nbytes > self.src.numel():
            raise ValueError(f"write of {nbytes} bytes at {dst_off} outside the registered regions")

    def close(self) -> None:
        self.engine.unregister_memory(self.src_addr)
