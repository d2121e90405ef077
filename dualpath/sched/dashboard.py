"""The live dashboard at /dashboard: the picture of DualPath pooling every storage NIC.

Once a second a sampler records what the coordinator knows: from each engine's last heartbeat, the
storage-NIC read and write bytes/s and the read queue of every node, and the DRAM-buffer and HBM
blocks in use per engine; from the requests answered since, how many took each path and their
TTFT and TPOT percentiles over the last ``TTFT_WINDOW_S``; from the failure counters of /metrics,
failed requests per second by cause. The last ``keep_s`` of samples (a bounded ring) are served
as columns at /dashboard/data, with the clock time of each (the page's x axis) and the model and
policy served; /dashboard is a static page (uPlot, shipped in ``sched/static``, nothing fetched from
the network) that polls them. The page names everything by relative URL, so it works behind a
reverse proxy that serves the coordinator under a path prefix (``/prefix/dashboard``).

Like /metrics, both carry operational numbers only (no prompt or output) and need no API key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator

import numpy as np
from aiohttp import web

from dualpath.sched.metrics import FAILURE_CAUSES, CoordinatorView

if TYPE_CHECKING:
    from dualpath.sched.coordinator import RequestState

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
PATHS = ("A", "B", "A+B")
TTFT_WINDOW_S = 30.0
# Every cause /metrics counts (metrics.failed): each gets a series from the start, at 0 until it happens
CAUSES = tuple(sorted({*FAILURE_CAUSES.values(), "engine"}))


@dataclass
class Sample:
    t: float  # seconds since the coordinator started
    time: float  # clock time (Unix seconds): what the page's x axis shows
    read_bps: dict[str, float]  # per node
    write_bps: dict[str, float]
    read_queue_bytes: dict[str, int]
    path_rps: dict[str, float]  # requests answered per second, by path
    ttft_s: dict[str, float | None]  # p50, p90, p99 over the window
    tpot_s: dict[str, float | None]  # the same of each request's mean time per output token
    failures_ps: dict[str, float]  # failed requests per second, by cause
    buffer_used: dict[str, float]  # per engine, fraction of its blocks
    hbm_used: dict[str, float]


@dataclass
class _Totals:
    """Cumulative counters at the previous sample, to turn them into rates."""

    t: float = 0.0
    io: dict[str, tuple[int, int]] = field(default_factory=dict)  # engine -> (read bytes, write bytes)
    paths: Counter[str] = field(default_factory=Counter)
    failures: dict[str, float] = field(default_factory=dict)  # by cause


def _percentiles(window: deque[tuple[float, float]], now: float) -> dict[str, float | None]:
    """p50, p90, p99 of the values answered within the last TTFT_WINDOW_S (older ones are dropped)."""
    while window and window[0][0] < now - TTFT_WINDOW_S:
        window.popleft()
    values = [v for _, v in window]
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    return dict(zip(("p50", "p90", "p99"), np.percentile(values, [50, 90, 99]).tolist()))


class Dashboard:
    def __init__(self, coordinator: CoordinatorView, period_s: float = 1.0, keep_s: float = 600.0):
        self.coordinator, self.period_s = coordinator, period_s
        self.t0 = time.monotonic()
        self.samples: deque[Sample] = deque(maxlen=max(1, int(keep_s / period_s)))
        self._paths: Counter[str] = Counter()  # requests answered, by path, since start
        self._ttfts: deque[tuple[float, float]] = deque()  # (when answered, its TTFT)
        self._tpots: deque[tuple[float, float]] = deque()  # (when answered, its mean time per output token)
        self._last = _Totals(t=self.t0, failures=self._failures())

    def answered(self, req: RequestState) -> None:
        now = time.monotonic()
        if req.decision is not None:
            self._paths[req.decision.path] += 1
        if req.t_first is not None:
            self._ttfts.append((now, req.t_first - req.t_arrival))
            if len(req.output) > 1:  # as /metrics' TPOT: the gaps after the first token
                self._tpots.append((now, (now - req.t_first) / (len(req.output) - 1)))

    def _failures(self) -> dict[str, float]:
        """Failed requests so far by cause, read from /metrics' counters: the page and a scrape agree."""
        return self.coordinator.metrics.failure_counts()

    def sample(self) -> Sample:
        now = time.monotonic()
        dt = max(now - self._last.t, 1e-6)
        engines = self.coordinator.live_engines()
        totals = {"buffer": self.coordinator.cfg.engine.buffer_blocks, "hbm": self.coordinator.cfg.engine.hbm_blocks}
        read, write, queue = Counter(), Counter(), Counter()
        buffer_used, hbm_used, io = {}, {}, {}
        for e in engines:
            r, node = e.report, str(e.node)
            if r is None:  # registered, not heard from yet
                continue
            io[e.name] = (r.storage_read_bytes, r.storage_write_bytes)
            # An engine counts from zero at its start, and never outlives its coordinator (it stops when
            # it loses it): one not seen before read everything since zero. A restarted one counts
            # from zero again: max(0, ...) keeps its first rate from going negative.
            before = self._last.io.get(e.name, (0, 0))
            read[node] += max(0, io[e.name][0] - before[0]) / dt
            write[node] += max(0, io[e.name][1] - before[1]) / dt
            queue[node] = max(queue[node], r.read_queue_bytes)  # one NIC per node: its queue
            buffer_used[e.name] = 1 - r.free_buffer_blocks / totals["buffer"]
            hbm_used[e.name] = 1 - r.free_hbm_blocks / totals["hbm"]
        failures = self._failures()
        failures_ps = {c: max(0.0, failures.get(c, 0.0) - self._last.failures.get(c, 0.0)) / dt for c in CAUSES}
        s = Sample(round(now - self.t0, 3), round(time.time(), 3), dict(read), dict(write), dict(queue),
                   {p: (self._paths[p] - self._last.paths[p]) / dt for p in PATHS},
                   _percentiles(self._ttfts, now), _percentiles(self._tpots, now), failures_ps, buffer_used, hbm_used)
        self._last = _Totals(now, io, Counter(self._paths), failures)
        self.samples.append(s)
        return s

    def columns(self) -> dict:
        """The samples as columns (uPlot's data layout): one list per series, None where a node or
        engine was not there yet."""
        samples = list(self.samples)

        def series(attr: str) -> dict[str, list]:
            keys = sorted({k for s in samples for k in getattr(s, attr)},
                          key=lambda k: (PATHS.index(k) if k in PATHS else len(PATHS), k))  # paths in order
            return {k: [getattr(s, attr).get(k) for s in samples] for k in keys}

        return {"t": [s.t for s in samples], "time": [s.time for s in samples], "read_bps": series("read_bps"),
                "write_bps": series("write_bps"), "read_queue_bytes": series("read_queue_bytes"),
                "path_rps": series("path_rps"), "ttft_s": series("ttft_s"), "tpot_s": series("tpot_s"),
                "failures_ps": series("failures_ps"), "buffer_used": series("buffer_used"),
                "hbm_used": series("hbm_used"), "roles": self._roles(), "period_s": self.period_s,
                "model": self.coordinator.model_name, "policy": self.coordinator.cfg.scheduler.policy}

    def _roles(self) -> dict[str, str]:
        """Node -> the roles of its engines ("prefill", "decode" or "decode+prefill"), for the legends."""
        roles: dict[str, set[str]] = {}
        for e in self.coordinator.live_engines():
            roles.setdefault(str(e.node), set()).add(e.role)
        return {node: "+".join(sorted(r)) for node, r in roles.items()}

    # -- aiohttp --

    def routes(self) -> list[web.AbstractRouteDef]:
        return [web.get("/dashboard", self.http_page), web.get("/dashboard/", self.http_slash),
                web.get("/dashboard/data", self.http_data), web.static("/dashboard/static", STATIC)]

    async def http_slash(self, _: web.Request) -> web.Response:
        """/dashboard/ -> /dashboard: the page's relative URLs resolve against /dashboard only. The
        redirect is relative too, so that it keeps a proxy's path prefix."""
        raise web.HTTPFound("../dashboard")

    async def http_page(self, _: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "dashboard.html")

    async def http_data(self, _: web.Request) -> web.Response:
        return web.json_response(self.columns())

    async def running(self, _: web.Application) -> AsyncIterator[None]:
        """The sampler, for the app's cleanup_ctx: it runs while the app does."""
        async def loop():
            while True:
                try:
                    self.sample()
                except Exception:  # a bug here must not stop the sampling for good, silently
                    log.exception("dashboard sample failed")
                await asyncio.sleep(self.period_s)

        task = asyncio.create_task(loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
