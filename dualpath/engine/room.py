"""One way to wait for memory: a pool's ``Room`` wakes the requests waiting for room in it when a
release makes some. Both engine pools (the DRAM buffer and the HBM blocks) use it, and every wait
on it is bounded by the caller (``Engine.take_memory``: engine.memory_wait_s). The one exception is
deliberate: a DE asked to admit a request it has no HBM or buffer run for refuses at once, and the
coordinator tries another DE or waits for room, instead of leaving the request queued behind one."""

from __future__ import annotations

import asyncio
from typing import Callable, TypeVar

T = TypeVar("T")


class Room:
    def __init__(self) -> None:
        self._changed = asyncio.Condition()  # binds to the running loop on first use

    async def until(self, take: Callable[[], T | None]) -> T:
        """Call take() until it returns something (not None), waiting for a release between tries."""
        async with self._changed:
            while (got := take()) is None:
                await self._changed.wait()
            return got

    def released(self) -> None:
        """Some room was given back: wake the waiters (callable from synchronous code)."""
        try:
            asyncio.get_running_loop().create_task(self._notify())
        except RuntimeError:  # no event loop (synchronous use): nobody can be waiting
            pass

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()
