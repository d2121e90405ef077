"""Small helpers shared by the benchmarks: timing on any device, JSON output."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import torch


def sync(device: torch.device | str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device | str = "cpu", repeat: int = 3, warmup: int = 1) -> float:
    """Best wall time of `repeat` runs after `warmup` runs (seconds)."""
    for _ in range(warmup):
        fn()
    sync(device)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def host_info() -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "machine": platform.machine()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def commit() -> str | None:
    """The commit the running code is, for every result a benchmark writes (docs cite it)."""
    if os.environ.get("DUALPATH_COMMIT"):  # a copy of the tree without .git (a lent GPU machine)
        return os.environ["DUALPATH_COMMIT"]
    try:
        # --dirty: a tree that is not its HEAD says so (a lent machine's copy may carry an older .git)
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
                              text=True, timeout=10, cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        return None


def write_json(path: str | os.PathLike[str], result: dict[str, Any]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    result = {"host": host_info(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": commit(), **result}
    p.write_text(json.dumps(result, indent=2))
    return p


def bench_cluster(n_prefill: int, n_decode: int, preset: str, dtype: str, device: str, port: int, store_root: str,
                  snic_gbps: float = 0.0, block_tokens: int = 64):
    """A local cluster config for benchmarks: HTTP API on `port`, engines on the ports after it,
    engine i on cuda:i when `device` is "cuda" (engines share GPUs round-robin when there are fewer
    GPUs than engines), pools sized for long contexts."""
    from dualpath.config import local_cluster
    from dualpath.device import spread_over_gpus

    cfg = local_cluster(n_prefill, n_decode, base_port=port + 2)
    cfg.model.preset, cfg.model.dtype = preset, dtype
    cfg.store.root, cfg.store.block_tokens, cfg.store.snic_read_gbps = store_root, block_tokens, snic_gbps
    cfg.scheduler.http_port, cfg.scheduler.control_port = port, port + 1
    cfg.engine.hbm_blocks, cfg.engine.buffer_blocks = 4096, 2048
    if device.startswith("cuda"):
        spread_over_gpus(cfg.engines)
    return cfg.validate()
