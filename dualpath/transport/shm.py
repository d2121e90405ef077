"""The `shm` data plane: engines of one host write into each other's DRAM buffers with one memory copy.

An engine's DRAM buffer is an anonymous shared-memory file (engine/buffers.py). Registered with its
``share_path`` (``/proc/<pid>/fd/<fd>``), the handle names that file and the host. A writer of the
same host maps the file once and copies the bytes in on a thread of the write's traffic class (no
GIL held, no event loop: path-B traffic does not slow the engine's decode steps the way a socket
loop in the same process does, and a handoff copy never queues behind bulk ones). Then a
notify-only frame on the tcp link carries the moved length, and the receiver checks its grant and
fires the completion. No payload crosses a socket.

A mapping belongs to one incarnation of the peer (framing.py): a peer restarted on the same address
registers a new memfd under the same region number, so mappings are keyed by incarnation too, and
those of an earlier incarnation are dropped (unmapped) as soon as its successor is met. (Keyed by
address and region only, a mapping once outlived a restart: handoffs went into the dead engine's
memory and the restarted one served, and persisted, wrong KV.)

Everything else goes over the link as tcp writes it (dataplane.py): a buffer of another host, a
region registered without a share path, a file that cannot be mapped (said once in the log and in
``links()``). The cuda backend is this one plus device memory (cuda.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

import torch

from dualpath.device import device_threads
from dualpath.transport.dataplane import TRAFFIC_CLASSES, DataPlane, as_bytes, check_write

log = logging.getLogger(__name__)


def _host_id() -> str:
    """Same host id = same kernel and same network namespace: a /proc/<pid>/fd path of one is a path
    of the other, and both are one host to the cluster (tests make hosts as network namespaces)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{socket.gethostname()}:{boot}:{os.stat('/proc/self/ns/net').st_ino}"
    except OSError:
        return socket.gethostname()


HOST_ID = _host_id()


def shm_available() -> bool:
    return hasattr(os, "memfd_create")


class ShmDataPlane(DataPlane):
    backend = "shm"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # (peer addr, region, peer incarnation) -> its buffer mapped here, or None: write over tcp
        self._mapped: dict[tuple[tuple[str, int], int, str], torch.Tensor | None] = {}
        # one copy thread per traffic class; like every thread of an engine, on the engine's device
        self._copiers = {tc: device_threads(1, f"{self.name}-copy-{tc}", self.device) for tc in TRAFFIC_CLASSES}

    def register(self, tensor: torch.Tensor, share_path: str | None = None, granted_only: bool = False) -> dict:
        handle = super().register(tensor, granted_only=granted_only)
        if share_path is not None and not self.regions[handle["region"]].tensor.is_cuda:
            handle["shm"] = {"path": share_path, "host": HOST_ID}
        return handle

    @staticmethod
    def _same_host(dst: dict) -> bool:
        shm = dst.get("shm")
        return shm is not None and shm["host"] == HOST_ID

    def _map_shared(self, dst: dict) -> torch.Tensor | None:
        """The peer's shared host region mapped here, or None (another host, or not mappable: tcp).
        Call only once ``_link_to(dst)`` has confirmed that the handle's incarnation is live."""
        if not self._same_host(dst):
            return None
        shm = dst["shm"]
        key = (tuple(dst["addr"]), dst["region"], dst["inc"])
        if key not in self._mapped:
            try:
                self._mapped[key] = torch.from_file(shm["path"], shared=True, size=dst["nbytes"], dtype=torch.uint8)
            except (OSError, RuntimeError) as e:
                log.warning("%s: cannot map %s's buffer (%s); writing to it over tcp", self.name, dst["addr"], e)
                self._mapped[key] = None
        return self._mapped[key]

    def _peer_restarted(self, addr: tuple[str, int], incarnation: str | None) -> None:
        """Unmap an earlier incarnation's buffers (a copy under way keeps its own view until it ends)."""
        super()._peer_restarted(addr, incarnation)
        for key in [k for k in self._mapped if k[0] == addr and k[2] != incarnation]:
            del self._mapped[key]

    def links(self) -> dict[str, str]:
        """Peers whose buffers we copy into directly say this backend; the others tcp."""
        out = super().links()
        for (addr, _, _), mapped in self._mapped.items():
            out[f"{addr[0]}:{addr[1]}"] = self.backend if mapped is not None else "tcp"
        return out

    async def close(self) -> None:
        await super().close()
        for pool in self._copiers.values():
            pool.shutdown(wait=False)

    async def write(self, src: torch.Tensor | memoryview, dst: dict, dst_offset: int, nbytes: int,
                    traffic_class: str = "bulk", notify: Any = None, timeout: float = 60.0) -> None:
        if not self._same_host(dst):
            return await self._write_over_link(src, dst, dst_offset, nbytes, traffic_class, notify, timeout)
        check_write(dst, dst_offset, nbytes, traffic_class)
        await self._link_to(dst, traffic_class)  # the handle's incarnation is the one at its address, or refused
        mapped = self._map_shared(dst)
        if mapped is None:
            return await self._write_over_link(src, dst, dst_offset, nbytes, traffic_class, notify, timeout)
        source = as_bytes(src) if isinstance(src, torch.Tensor) else torch.frombuffer(src, dtype=torch.uint8)
        target, source = mapped[dst_offset : dst_offset + nbytes], source[:nbytes]
        if len(source) < nbytes:
            raise ValueError(f"source has {len(source)} bytes, {nbytes} requested")
        await asyncio.get_running_loop().run_in_executor(self._copiers[traffic_class], target.copy_, source)
        await self._notify(dst, dst_offset, nbytes, traffic_class, notify, timeout)
