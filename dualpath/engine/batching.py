"""The prefill engine's batch selection, a pure function so the simulator (dualpath/sim) picks alike."""

from __future__ import annotations

from collections.abc import Iterable


def pick_batch(remaining: Iterable[int], quota: int) -> list[int]:
    """Tokens to compute this step for each waiting job, first come first served, within the step's
    token quota: jobs join whole while the quota lasts; the one that crosses it is chunked (its
    rest waits for the next step). ``remaining`` is each ready job's uncomputed tokens, in order."""
    picked = []
    for left in remaining:
        if quota <= 0:
            break
        n = min(left, quota)
        picked.append(n)
        quota -= n
    return picked
