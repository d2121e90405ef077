"""The `cuda` data plane: engines on GPUs of one host, writes as device-to-device copies (NVLink).

A registered device tensor is described by its CUDA IPC handle (``torch.UntypedStorage._share_cuda_``,
plain ints and bytes, msgpack-able; never pickle). The writer opens the peer's memory once, enqueues
the copy into it (peer-to-peer over NVLink where present), records an interprocess CUDA event after
it, and at once sends a notify-only frame carrying that event's IPC handle on the TCP data plane.
The receiver waits for the event before its completion fires, so the bytes are in place by then,
and the frame's round trip overlaps the copy instead of following it (64 MiB writes went from 0.45
to 0.60-0.65 of a plain P2P copy on two H200s, runs/gpu/s5_transport). A writer in the receiver's
own process waits for the copy itself: an IPC event cannot be opened by the process that made it.

Opened IPC memory and opened IPC events belong to one incarnation of their peer (framing.py): both
are dropped (closed) once a restarted peer is met at the same address (memory: ``_peer_restarted``)
or logs in under the same name (its events: ``_writer_restarted``), and never used again.

Host regions (the engines' DRAM buffers) are written as the shm backend writes them (shm.py): one
memory copy into the peer's mapped buffer; other host regions go over the tcp link. That is why this
plane is a ShmDataPlane and not a sibling of it: a GPU engine's plane *is* the shm plane (same
mappings, same copy threads, same fallbacks) plus device memory, not a second way to write host
memory.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from dualpath.device import until_done
from dualpath.transport.dataplane import TransferError, as_bytes, check_write
from dualpath.transport.framing import Login, ProtocolError
from dualpath.transport.shm import ShmDataPlane
from dualpath.transport.wire import Landing, Notify

log = logging.getLogger(__name__)

# CUDA IPC handles cannot be opened by the process that made them: regions registered in this
# process are found here instead (engines of one process, and the conformance tests), by the
# registering plane's incarnation and the region.
_LOCAL: dict[tuple[str, int], torch.Tensor] = {}


class CudaDataPlane(ShmDataPlane):
    backend = "cuda"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._opened: dict[tuple[tuple[str, int], int, str], torch.Tensor] = {}  # (addr, region, incarnation)
        self._copy_streams: dict[int, torch.cuda.Stream] = {}
        self._peer_enabled: set[tuple[int, int]] = set()
        self._free_events: dict[int, list[tuple[torch.cuda.Event, bytes]]] = {}  # ours, per device
        # writers' events, opened once: (writer name, its incarnation, device, IPC handle) -> event
        self._peer_events: dict[tuple[str, str | None, int, bytes], torch.cuda.Event] = {}

    def register(self, tensor: torch.Tensor, share_path: str | None = None, granted_only: bool = False) -> dict:
        handle = super().register(tensor, share_path=share_path, granted_only=granted_only)
        flat = self.regions[handle["region"]].tensor
        if flat.is_cuda:
            storage = flat.untyped_storage()
            dev, h, size, off, rc_h, rc_off, ev_h, ev_sync = storage._share_cuda_()
            handle["ipc"] = [dev, h, size, off, rc_h, rc_off, ev_h, ev_sync]
            handle["storage_offset"] = flat.storage_offset()
            handle["pid"] = os.getpid()
            _LOCAL[(self.incarnation, handle["region"])] = flat
        return handle

    def _open(self, dst: dict) -> torch.Tensor:
        if dst.get("pid") == os.getpid():
            local = _LOCAL.get((dst["inc"], dst["region"]))
            if local is None:
                raise TransferError(f"unknown or released region {dst['region']}")
            return local
        key = (tuple(dst["addr"]), dst["region"], dst["inc"])
        t = self._opened.get(key)
        if t is None:
            dev, h, size, off, rc_h, rc_off, ev_h, ev_sync = dst["ipc"]
            storage = torch.UntypedStorage._new_shared_cuda(dev, h, size, off, rc_h, rc_off, ev_h, ev_sync)
            t = torch.empty(0, dtype=torch.uint8, device=f"cuda:{dev}").set_(storage)
            t = t[dst["storage_offset"] : dst["storage_offset"] + dst["nbytes"]]
            self._opened[key] = t
        return t

    def _enable_peer_access(self, src_dev: int, dst_dev: int) -> None:
        """Let the source device write the destination's memory directly. Without this the driver
        stages a copy into another process's (IPC) memory: measured 37 GB/s instead of 355 GB/s
        over NVLink on H200s. Torch enables only the direction it needs for its own tensors."""
        if (src_dev, dst_dev) in self._peer_enabled:
            return
        self._peer_enabled.add((src_dev, dst_dev))
        # torch exposes no call for it, but a copy *into* a tensor on src_dev *from* one on dst_dev
        # makes torch enable src_dev's access to dst_dev's memory (and keep it enabled).
        torch.empty(1, device=f"cuda:{src_dev}").copy_(torch.zeros(1, device=f"cuda:{dst_dev}"))

    def _peer_restarted(self, addr: tuple[str, int], incarnation: str | None) -> None:
        """Close the IPC memory of an earlier incarnation at addr (dropping the tensor closes the handle)."""
        super()._peer_restarted(addr, incarnation)
        for key in [k for k in self._opened if k[0] == addr and k[2] != incarnation]:
            del self._opened[key]

    def _writer_restarted(self, name: str, old_incarnation: str | None) -> None:
        super()._writer_restarted(name, old_incarnation)
        for key in [k for k in self._peer_events if k[:2] == (name, old_incarnation)]:
            del self._peer_events[key]

    def links(self) -> dict[str, str]:
        """Peers whose memory we copy into directly say cuda; the others tcp (DRAM buffers of
        another host, or one we could not map)."""
        out = super().links()
        for addr, _, _ in self._opened:
            out[f"{addr[0]}:{addr[1]}"] = "cuda"
        return out

    async def close(self) -> None:
        for key in [k for k in _LOCAL if k[0] == self.incarnation]:
            del _LOCAL[key]
        self._opened.clear()
        self._peer_events.clear()
        await super().close()

    def release(self, handle: dict) -> None:
        _LOCAL.pop((self.incarnation, handle["region"]), None)
        super().release(handle)

    async def write(self, src: torch.Tensor | memoryview, dst: dict, dst_offset: int, nbytes: int,
                    traffic_class: str = "bulk", notify: Any = None, timeout: float = 60.0) -> None:
        if "ipc" not in dst:  # host memory: a mapped same-host buffer (shm.py), else tcp
            return await super().write(src, dst, dst_offset, nbytes, traffic_class, notify, timeout)
        check_write(dst, dst_offset, nbytes, traffic_class)
        await self._link_to(dst, traffic_class)  # the handle's incarnation is the one at its address, or refused
        target = self._open(dst)[dst_offset : dst_offset + nbytes]
        source = as_bytes(src)[:nbytes]
        dev = target.device.index
        if source.is_cuda and source.device.index != dev:
            self._enable_peer_access(source.device.index, dev)
        stream = self._copy_streams.get(dev)
        if stream is None:  # made once: setdefault(dev, Stream()) made (and dropped) a stream per write
            stream = self._copy_streams[dev] = torch.cuda.Stream(device=dev)
        with torch.cuda.device(dev), torch.cuda.stream(stream):
            target.copy_(source, non_blocking=True)
        if dst.get("pid") == os.getpid():  # our own region: nobody else can wait for the copy
            event = torch.cuda.Event()
            event.record(stream)
            await until_done(event, poll_s=0)  # a copy over NVLink: microseconds matter
            await self._notify(dst, dst_offset, nbytes, traffic_class, notify, timeout)
            return
        event, ipc = self._take_event(dev, stream)
        try:
            await self._notify(dst, dst_offset, nbytes, traffic_class, notify, timeout, event=[dev, ipc])
        finally:
            self._free_events[dev].append((event, ipc))

    def _take_event(self, dev: int, stream: torch.cuda.Stream) -> tuple[torch.cuda.Event, bytes]:
        """An interprocess event recorded after the copy just enqueued on `stream`, with its IPC
        handle. Events are reused: one is back in the pool once its write was acknowledged."""
        free = self._free_events.setdefault(dev, [])
        if free:
            event, ipc = free.pop()
            event.record(stream)
            return event, ipc
        event = torch.cuda.Event(interprocess=True)
        event.record(stream)  # the CUDA event exists from its first record on: only then has it a handle
        return event, bytes(event.ipc_handle())

    def _landed_now(self, msg: Landing) -> bool:
        """Only a notify naming a copy event waits (for the event); host-memory landings do not."""
        return not (isinstance(msg, Notify) and msg.event is not None)

    async def _landed(self, msg: Landing, writer: Login) -> None:
        """A notify after a copy into our device memory names the writer's event recorded after it."""
        if not isinstance(msg, Notify) or msg.event is None:
            return
        if not (isinstance(msg.event, list) and len(msg.event) == 2 and isinstance(msg.event[0], int)
                and isinstance(msg.event[1], bytes)):
            raise ProtocolError(f"{writer.name} names a CUDA event that is not [device, IPC handle]")
        dev, ipc = msg.event
        key = (writer.name, writer.incarnation, dev, bytes(ipc))
        event = self._peer_events.get(key)
        if event is None:
            event = self._peer_events[key] = torch.cuda.Event.from_ipc_handle(torch.device("cuda", dev), ipc)
        await until_done(event, poll_s=0)  # a copy over NVLink: microseconds matter
