"""The coordinator's waiting room (sched/waiting.py): oldest first, nothing lost, every wait bounded."""

import asyncio
import time

import pytest

from dualpath.sched.waiting import WaitingRoom
from tests.conftest import loop_turns, until


async def _queue(room: WaitingRoom, names: list[str], order: list[str], **kw) -> list[asyncio.Task]:
    async def wait(name: str) -> None:
        await room.wait(time.monotonic() + 5, **kw)
        order.append(name)

    tasks = []
    for name in names:
        tasks.append(asyncio.create_task(wait(name)))
        await asyncio.sleep(0)  # queued in this order
    return tasks


async def test_each_heartbeat_wakes_only_the_oldest_waiter():
    room, order = WaitingRoom(), []
    tasks = await _queue(room, ["a", "b", "c"], order)
    assert len(room) == 3
    for expected in (["a"], ["a", "b"], ["a", "b", "c"]):
        room.room_changed()
        room.room_changed()  # a second heartbeat before the woken one ran wakes no one else
        await until(lambda: len(order) >= len(expected), f"{expected[-1]} was woken")
        await loop_turns()  # one wrongly woken as well would have run by now
        assert order == expected
    await asyncio.gather(*tasks)
    assert len(room) == 0


async def test_a_waiter_that_found_no_room_keeps_its_place_at_the_front():
    room, order = WaitingRoom(), []
    tasks = await _queue(room, ["b", "c"], order)
    tasks += await _queue(room, ["a"], order, keep_place=True)
    for n in range(1, 4):
        room.room_changed()
        await until(lambda: len(order) >= n, "the front waiter was woken")  # before the next heartbeat
    await asyncio.gather(*tasks)
    assert order == ["a", "b", "c"]


async def test_a_waiter_given_the_turn_as_it_leaves_passes_it_on():
    room, order = WaitingRoom(), []
    tasks = await _queue(room, ["gone", "next"], order)
    room.room_changed()  # the turn is given to "gone" ...
    tasks[0].cancel()  # ... whose client hangs up before it runs
    # no other heartbeat comes: "next" gets in only if "gone" passed the turn on (else it ends at its
    # 5 s deadline with TimeoutError); awaited, not slept on (three loop turns: a busy host may take
    # longer than a 10 ms sleep over them). 60 s: a bound on a hang.
    await asyncio.wait_for(tasks[1], 60)
    assert order == ["next"] and len(room) == 0
    with pytest.raises(asyncio.CancelledError):
        await tasks[0]


async def test_waits_end_at_the_deadline_or_when_the_check_gives_up():
    """No timing threshold (a busy host only makes a wait end later): the wait ends with the room's
    own TimeoutError, not before its deadline, the check having run meanwhile; and the deadline,
    not the next check, ends it (a check an hour away must not hold it: the 60 s wait_for is a
    bound on a hang, its TimeoutError has no "deadline" in it)."""
    room, checks = WaitingRoom(), []
    deadline = time.monotonic() + 0.1
    with pytest.raises(TimeoutError, match="deadline"):
        await asyncio.wait_for(room.wait(deadline, check_every_s=0.03, check=lambda: checks.append(1)), 60)
    assert time.monotonic() >= deadline and len(checks) >= 1 and len(room) == 0
    with pytest.raises(TimeoutError, match="deadline"):
        await asyncio.wait_for(room.wait(time.monotonic() + 0.1, check_every_s=3600), 60)
    assert len(room) == 0

    calls = []

    def no_engines_left() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise LookupError("no live decode engine")

    with pytest.raises(LookupError):
        await room.wait(time.monotonic() + 5, check_every_s=0.02, check=no_engines_left)
    assert len(calls) == 2 and len(room) == 0
