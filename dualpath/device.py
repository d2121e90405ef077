"""Which GPU a thread works on.

CUDA's current device is a property of each host thread, and it starts as device 0. Streams, events,
graph captures, `pin_memory` and kernel launches that do not name a device all use it. An engine on
`cuda:1` therefore makes its device current on every thread that touches CUDA: the event loop
(``make_current`` when the engine is built) and every worker thread (``device_threads``). Without
it, work meant for `cuda:1` is launched or captured against device 0, which a one-GPU host never shows.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch


def make_current(device: torch.device | str) -> None:
    """Make `device` the calling thread's current CUDA device (nothing to do for the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)


def device_threads(n: int, name: str, device: torch.device | str) -> ThreadPoolExecutor:
    """A thread pool whose threads each make `device` current before their first task."""
    return ThreadPoolExecutor(n, thread_name_prefix=name, initializer=make_current, initargs=(torch.device(device),))


def spread_over_gpus(engines: list) -> None:
    """Engine i on cuda:i; with fewer GPUs than engines they share GPUs round-robin."""
    n = torch.cuda.device_count()
    if n == 0:
        raise RuntimeError("device 'cuda' asked for, but no GPU is visible")
    for i, e in enumerate(engines):
        e.device = f"cuda:{i % n}"


async def until_done(event: torch.cuda.Event | None, poll_s: float = 0.0002) -> None:
    """Wait on the event loop for a CUDA event (the work recorded before it), polling: the loop stays
    free for other requests and no thread blocks on the GPU."""
    while event is not None and not event.query():
        await asyncio.sleep(poll_s)
