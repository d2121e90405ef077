"""The DRAM buffer pool of an engine (the PE buffer and the DE buffer of the paper).

One page-locked host allocation (pinned when CUDA is available, so host-to-device copies are
asynchronous and run at full speed), handed out per request in runs of whole blocks. With
``shared=True`` the allocation is an anonymous shared-memory file that other engines of the same
host can map (``share_path``): the cuda data plane then moves path-B and handoff bytes between two
engines' buffers with one memory copy instead of a socket (transport/cuda.py). A request's
run is laid out layer-major, ``[n_layers, n_blocks, bytes_per_layer]``: storage reads scatter each
block's layers into place, and layer l of all the request's blocks is one contiguous range, so
one transport write or one host-to-device copy moves a whole layer.

When the pool is exhausted ``alloc`` waits (back-pressure) until a release makes room.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch

from dualpath.engine.room import Room
from dualpath.protocol import RunHandle
from dualpath.storage.store import SlotDests


def layer_offset(run_offset: int, n_blocks: int, layer: int, bytes_per_layer: int, first_block: int = 0) -> int:
    """The one place for the layer-major layout of a buffer run: layer l of a run of n blocks starts
    l * n blocks after the run's start, and its blocks follow each other."""
    return run_offset + (layer * n_blocks + first_block) * bytes_per_layer


def run_layer_offset(run: RunHandle, layer: int, bytes_per_layer: int, first_block: int = 0) -> int:
    """Byte offset in a peer's region of block `first_block` of layer `layer` of its run `run`."""
    return layer_offset(run.offset, run.n_blocks, layer, bytes_per_layer, first_block)


def _shared_memory(nbytes: int) -> tuple[torch.Tensor, str]:
    """An anonymous memory file (memfd: nothing is left behind when the process dies), mapped
    shared. Another process of this host maps the same pages through /proc/<pid>/fd/<fd>."""
    fd = os.memfd_create("dualpath-buffer")
    os.ftruncate(fd, max(nbytes, 1))
    host = torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=nbytes, dtype=torch.uint8)
    return host, f"/proc/{os.getpid()}/fd/{fd}"


class BufferTooLarge(ValueError):
    """A request needs more blocks than the whole pool holds; waiting would never help."""


@dataclass(frozen=True)
class BufferRun:
    offset_blocks: int
    n_blocks: int


class BufferPool:
    def __init__(self, n_blocks: int, n_layers: int, bytes_per_layer: int, pin: bool | None = None,
                 shared: bool = False):
        self.n_blocks, self.n_layers, self.bytes_per_layer = n_blocks, n_layers, bytes_per_layer
        self.block_bytes = n_layers * bytes_per_layer
        pin = torch.cuda.is_available() if pin is None else pin
        nbytes = n_blocks * self.block_bytes
        self.share_path: str | None = None
        if shared and hasattr(os, "memfd_create"):
            self.host, self.share_path = _shared_memory(nbytes)
            if pin:  # page-lock the mapping in place, as pin_memory would have allocated it
                cudart, ptr = torch.cuda.cudart(), self.host.data_ptr()
                # cudaHostRegisterPortable (1): pinned for every device's context, not only the current one
                err = int(cudart.cudaHostRegister(ptr, nbytes, 1))
                if err:
                    raise RuntimeError(f"cudaHostRegister of the {nbytes}-byte buffer failed (error {err})")
                # Unregister with the pool: a later allocation at the same address could not be pinned.
                weakref.finalize(self, cudart.cudaHostUnregister, ptr)
        else:
            self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        self._free: list[tuple[int, int]] = [(0, n_blocks)]  # sorted (start, length) runs
        self.room = Room()

    @property
    def free_blocks(self) -> int:
        return sum(n for _, n in self._free)

    def try_alloc(self, n: int) -> BufferRun | None:
        """First fit over free runs; None if no contiguous run of n blocks is free."""
        if n > self.n_blocks:
            raise BufferTooLarge(f"request needs {n} buffer blocks, the pool has {self.n_blocks}")
        for i, (start, length) in enumerate(self._free):
            if length >= n:
                self._free[i] = (start + n, length - n)
                if length == n:
                    del self._free[i]
                return BufferRun(start, n)
        return None

    async def alloc(self, n: int) -> BufferRun:
        """A run of n blocks, waiting until releases make one (the caller bounds the wait)."""
        return await self.room.until(lambda: self.try_alloc(n))

    def release(self, run: BufferRun) -> None:
        runs = sorted(self._free + [(run.offset_blocks, run.n_blocks)])
        merged: list[tuple[int, int]] = []
        for start, length in runs:  # coalesce neighbours so large runs become available again
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                assert not merged or merged[-1][0] + merged[-1][1] < start, "double release"
                merged.append((start, length))
        self._free = merged
        self.room.released()

    # -- views (zero-copy) --

    def byte_range(self, run: BufferRun) -> tuple[int, int]:
        """(offset, nbytes) of the run inside the pool's single allocation (for transport handles)."""
        return run.offset_blocks * self.block_bytes, run.n_blocks * self.block_bytes

    def view(self, run: BufferRun) -> torch.Tensor:
        """uint8 [n_layers, n_blocks, bytes_per_layer] over the run."""
        off, nbytes = self.byte_range(run)
        return self.host[off : off + nbytes].view(self.n_layers, run.n_blocks, self.bytes_per_layer)

    def layer_range(self, run: BufferRun, layer: int, first: int = 0) -> tuple[int, int]:
        """(offset, nbytes) of layer `layer` of the run's blocks [first, n), inside the pool allocation."""
        off, _ = self.byte_range(run)
        return (layer_offset(off, run.n_blocks, layer, self.bytes_per_layer, first),
                (run.n_blocks - first) * self.bytes_per_layer)

    def slot_dests(self, run: BufferRun, first: int) -> SlotDests:
        """Where a storage read puts blocks first, first+1, ... of the run: the byte offset of
        slot `first`'s layer 0 in the pool allocation, and the distance between two layers."""
        off, _ = self.byte_range(run)
        return SlotDests(layer_offset(off, run.n_blocks, 0, self.bytes_per_layer, first),
                         run.n_blocks * self.bytes_per_layer)
