"""The `shm` data plane: engines of one host write into each other's DRAM buffers with one memory copy.

An engine's DRAM buffer is an anonymous shared-memory file (engine/buffers.py). Registered with its
``share_path`` (``/proc/<pid>/fd/<fd>``), the handle names that file and the host. A writer of the
same host maps the file once and copies the bytes in: a large copy on a thread of the write's
traffic class (no GIL held, no event loop: path-B traffic does not slow the engine's decode steps
the way a socket loop in the same process does, and a handoff copy never queues behind bulk ones),
a small one (``inline_copy_bytes``) on the event loop itself, since handing it to the thread costs
more than the copy. Then a notify-only frame on the link carries the moved length, and the receiver
checks its grant and fires the completion. No payload crosses a socket. The link to a peer of this
host runs over a local (Unix) socket its handle names (``link``), cheaper than loopback TCP for the
notify's round trip; TCP where that socket cannot be reached.

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
from dualpath.transport.dataplane import TRAFFIC_CLASSES, DataPlane, as_bytes, check_write, source_view

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
    # Writes of at most this many bytes are copied on the event loop itself, not on the copy thread:
    # handing a copy to the thread and back costs more time than a copy this size takes (issue #34;
    # on the 2-core VM one write took 72 µs inline vs 125 µs through the thread at 4 KiB, 107 vs
    # 193 µs at 256 KiB, whose copy holds the loop about 35 µs). Larger copies stay on the thread,
    # so that bulk copies never hold the engine's loop for longer than a handoff would.
    inline_copy_bytes = 256 << 10

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # (peer addr, region, peer incarnation) -> its buffer mapped here, or None: write over tcp
        self._mapped: dict[tuple[tuple[str, int], int, str], torch.Tensor | None] = {}
        # one copy thread per traffic class; like every thread of an engine, on the engine's device
        self._copiers = {tc: device_threads(1, f"{self.name}-copy-{tc}", self.device) for tc in TRAFFIC_CLASSES}
        self._local_name: str | None = None  # our local (Unix) listener's name, once started

    async def start(self, host: str | None = None, port: int = 0) -> int:
        """Listen on TCP and, for writers of this host, on a local (Unix) socket too: the notify that
        follows each copy makes a round trip on the link, and a Unix socket's costs less kernel time
        than loopback TCP's (issue #34: about 9 µs less per round trip on the 2-core VM)."""
        port = await super().start(host, port)
        # An abstract name (no file to clean up), unique to this plane; abstract names belong to a
        # network namespace, as HOST_ID does.
        name = f"dualpath-{self.incarnation}-{port}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind("\0" + name)
            sock.listen(64)
        except OSError as e:
            log.warning("%s: no local socket for writers of this host (%s); they use tcp", self.name, e)
            sock.close()
            return port
        self._local_name = name
        self._listen(sock)
        return port

    def register(self, tensor: torch.Tensor, share_path: str | None = None, granted_only: bool = False) -> dict:
        handle = super().register(tensor, granted_only=granted_only)
        if share_path is not None and not self.regions[handle["region"]].tensor.is_cuda:
            handle["shm"] = {"path": share_path, "host": HOST_ID}
            if self._local_name is not None:
                handle["shm"]["link"] = self._local_name
        return handle

    def _local_link(self, dst: dict) -> str | None:
        """A peer of this host is reached on its local socket (its handle names it)."""
        name = dst["shm"].get("link") if self._same_host(dst) else None
        return "\0" + name if isinstance(name, str) else None

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
        if nbytes <= self.inline_copy_bytes and not (isinstance(src, torch.Tensor) and not src.is_cpu):
            self._copy_inline(src, mapped, dst_offset, nbytes)  # (device data: copied on the thread, as before)
        else:
            await self._copy_on_thread(src, mapped, dst_offset, nbytes, traffic_class)
        await self._notify(dst, dst_offset, nbytes, traffic_class, notify, timeout)

    @staticmethod
    def _copy_inline(src: torch.Tensor | memoryview, mapped: torch.Tensor, dst_offset: int, nbytes: int) -> None:
        """A small copy on the event loop itself: a memoryview assignment (one memcpy), no torch ops."""
        memoryview(mapped.numpy())[dst_offset : dst_offset + nbytes] = source_view(src, nbytes)

    async def _copy_on_thread(self, src: torch.Tensor | memoryview, mapped: torch.Tensor, dst_offset: int,
                              nbytes: int, traffic_class: str) -> None:
        """A large copy on the class's copy thread (torch's copy_ releases the GIL: the loop runs on)."""
        source = as_bytes(src) if isinstance(src, torch.Tensor) else torch.frombuffer(src, dtype=torch.uint8)
        target, source = mapped[dst_offset : dst_offset + nbytes], source[:nbytes]
        if len(source) < nbytes:
            raise ValueError(f"source has {len(source)} bytes, {nbytes} requested")
        await asyncio.get_running_loop().run_in_executor(self._copiers[traffic_class], target.copy_, source)
