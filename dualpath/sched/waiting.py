"""Requests that found no engine with room for them, served oldest first.

Room appears when an engine frees memory, and the engine says so at once in a heartbeat. Each
heartbeat lets the oldest waiter try again; a waiter that gets in passes the turn on, so one
heartbeat's room admits as many waiters as it holds, in arrival order. A newcomer queues behind the
waiters rather than take room before them. (Before, every waiter slept one heartbeat interval and
retried: room freed just after a heartbeat stayed idle for up to two intervals, and whichever waiter
woke first took it.)
"""

from __future__ import annotations

import asyncio
import time
from collections import deque


class WaitingRoom:
    def __init__(self) -> None:
        self._queue: deque[asyncio.Future] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def room_changed(self) -> None:
        """A heartbeat came, or a waiter got in (room may be left): the oldest waiter tries."""
        if self._queue and not self._queue[0].done():
            self._queue[0].set_result(None)

    async def wait(self, deadline: float, keep_place: bool = False) -> None:
        """Queue until it is this request's turn to try. keep_place: a waiter whose turn found no
        room goes back to the front. TimeoutError at the deadline (monotonic time)."""
        turn = asyncio.get_running_loop().create_future()
        if keep_place:
            self._queue.appendleft(turn)
        else:
            self._queue.append(turn)
        woken = False
        try:
            await asyncio.wait_for(turn, max(0.0, deadline - time.monotonic()))
            woken = True
        finally:
            self._queue.remove(turn)
            if not woken and turn.done() and not turn.cancelled():
                self.room_changed()  # woken just as it left (its client went away): the turn goes on
