"""Requests that found no engine with room for them, served oldest first.

So do requests that found no live engine of a role: one may be restarting, and its registration
and first heartbeat give the oldest waiter its turn as freed room does.

Room appears when an engine frees memory, and the engine says so at once in a heartbeat. Each
heartbeat lets the oldest waiter try again; a waiter that gets in passes the turn on, so one
heartbeat's room admits as many waiters as it holds, in arrival order. A newcomer queues behind the
waiters rather than take room before them. The order is strict, as in vLLM's first-come-first-served
scheduling: a large request at the front holds back smaller ones behind it until room for it is
freed (it always fits an idle engine: the coordinator refuses at once what never could) or its
deadline passes. (Before, every waiter slept one heartbeat interval and retried: room freed just
after a heartbeat stayed idle for up to two intervals, and whichever waiter woke first took it.)
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable


class WaitingRoom:
    def __init__(self) -> None:
        self._queue: deque[asyncio.Future] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def room_changed(self) -> None:
        """A heartbeat came, a waiter got in (room may be left) or an engine left: the oldest waiter
        tries."""
        if self._queue and not self._queue[0].done():
            self._queue[0].set_result(None)

    async def wait(self, deadline: float, keep_place: bool = False, check_every_s: float = 1.0,
                   check: Callable[[], None] = lambda: None) -> None:
        """Queue until it is this request's turn to try. keep_place: a waiter whose turn found no
        room goes back to the front. Meanwhile `check()` runs every check_every_s and may raise
        (when waiting has become pointless: the coordinator is stopping). TimeoutError at the
        deadline (monotonic time)."""
        turn = asyncio.get_running_loop().create_future()
        if keep_place:
            self._queue.appendleft(turn)
        else:
            self._queue.append(turn)
        woken = False
        try:
            while not turn.done():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no room before the deadline")
                # asyncio.wait, not wait_for: it neither cancels the turn at a timeout nor (Python
                # 3.11) swallows a cancellation that comes just as the turn is given
                await asyncio.wait([turn], timeout=min(left, check_every_s))
                if not turn.done():
                    check()
            woken = True
        finally:
            self._queue.remove(turn)
            if not woken and turn.done():
                self.room_changed()  # given the turn just as it left (its client went away): pass it on
