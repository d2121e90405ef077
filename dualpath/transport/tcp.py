"""The `tcp` data plane: every write's payload in frames on the link (link.py, wire.py).

It works between any two hosts and needs nothing from the OS or hardware: the backend that always
works, and the one the others fall back to for a peer they cannot reach their own way. A receiver
reads the bytes straight into the destination region and acks once all are in place
(dataplane.py); bulk writes go in chunks that leave latency traffic its share of the link.
"""

from __future__ import annotations

from typing import Any

import torch

from dualpath.transport.dataplane import DataPlane


class TcpDataPlane(DataPlane):
    backend = "tcp"

    async def write(self, src: torch.Tensor | memoryview, dst: dict, dst_offset: int, nbytes: int,
                    traffic_class: str = "bulk", notify: Any = None, timeout: float = 60.0) -> None:
        await self._write_over_link(src, dst, dst_offset, nbytes, traffic_class, notify, timeout)
