"""Storage-NIC emulation: a token bucket per node and direction, applied to the real file I/O.

Engines of one node are separate processes but share one NIC, so the bucket lives in a tiny
memory-mapped file under the store root, guarded by flock. It holds one number: the monotonic
time at which the emulated NIC becomes free. An I/O of n bytes reserves the interval
[max(now, free), max(now, free) + n / rate] (a FIFO queue, like a NIC's), does the real I/O, and
completes no earlier than the end of its interval. The backlog (free - now) * rate is the node's
storage read queue in bytes: the load figure the scheduler reads (DESIGN.md §4).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import time

from dualpath.storage.private import private_dir, private_file

_SLOT = struct.Struct("<d")


class SnicBucket:
    def __init__(self, root: str, node: int, direction: str, gbps: float):
        self.rate = gbps * 1e9  # bytes per second; 0 = unlimited
        self.node, self.direction = node, direction
        self._fd = -1
        if self.rate > 0:
            d = os.path.join(root, ".snic")
            private_dir(d)
            self._fd = private_file(os.path.join(d, f"node{node}-{direction}"), os.O_RDWR)
            if os.fstat(self._fd).st_size < _SLOT.size:
                os.ftruncate(self._fd, _SLOT.size)
            self._map = mmap.mmap(self._fd, _SLOT.size)

    @property
    def limited(self) -> bool:
        return self.rate > 0

    def reserve(self, nbytes: int) -> float:
        """Reserve the NIC for nbytes; returns the monotonic time at which that I/O may complete."""
        if not self.limited:
            return 0.0
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            now = time.monotonic()
            (free,) = _SLOT.unpack_from(self._map)
            # A stale value (from a previous boot) is in the past: the NIC is idle.
            end = max(now, free) + nbytes / self.rate
            _SLOT.pack_into(self._map, 0, end)
            return end
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def backlog_bytes(self) -> int:
        """Bytes queued on this node's emulated NIC (all its engines together)."""
        if not self.limited:
            return 0
        (free,) = _SLOT.unpack_from(self._map)
        return int(max(0.0, free - time.monotonic()) * self.rate)

    def close(self) -> None:
        if self._fd >= 0:
            self._map.close()
            os.close(self._fd)
            self._fd = -1
