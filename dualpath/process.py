"""One cluster process: the coordinator or an engine, until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from dualpath.config import ClusterConfig


def use_engine_event_loop() -> None:
    """uvloop where installed, as every cluster process runs (benchmarks of its parts too)."""
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass


async def _main(cfg: ClusterConfig, role: str, node: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if role == "coordinator":
        from dualpath.sched.coordinator import serve

        await serve(cfg, stop)
        return
    spec = cfg.find_engine(role, node)
    if role == "prefill":
        from dualpath.engine.prefill import PrefillEngine as Cls
    else:
        from dualpath.engine.decode import DecodeEngine as Cls
    engine = Cls(cfg, spec)
    await engine.start()
    waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(engine.stopping.wait())]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    await engine.stop()
    if not stop.is_set():
        raise SystemExit(f"{spec.name}: {engine.stop_reason}")


def run_process(cfg: ClusterConfig, role: str, node: int) -> None:
    # An engine's threads (event loop, compute, storage I/O, copies) take turns holding the GIL; a
    # thread that wants it waits up to this interval before the holder is asked to let go. Python's
    # 5 ms default made every per-layer hand-over of a prefill late: 0.5 ms took bench overlap's
    # 32K-token prefill from 181 to 162 ms on an H200 host (runs/gpu/overlap_sw*.json).
    sys.setswitchinterval(float(os.environ.get("DUALPATH_SWITCH_INTERVAL_S", "0.0005")))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {role}{node if role != 'coordinator' else ''} "
                        "%(levelname)s %(name)s: %(message)s")
    use_engine_event_loop()
    asyncio.run(_main(cfg, role, node))
