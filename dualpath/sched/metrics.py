"""Prometheus metrics for the whole cluster, served by the coordinator at /metrics.

Two sources. What the coordinator sees of each request (counters and latency histograms, updated
as requests end); and what each engine reports by heartbeat (read at scrape time by
``EngineCollector``): storage-NIC bytes and read queues per node, compute-network bytes per traffic
class, the transport backend, DRAM-buffer and HBM blocks in use, persistence. The paper's
deployment advice is to watch exactly these: path choice, storage and network load, memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from dualpath.sched.coordinator import Coordinator, RequestState

FAILURE_CAUSES = {400: "rejected", 404: "rejected", 401: "unauthorized", 503: "unavailable", 504: "timeout"}
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ClusterMetrics:
    def __init__(self, coordinator: Coordinator):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("dualpath_requests", "Requests answered, by policy and the path their hit KV took",
                                ["policy", "path"], registry=r)
        self.prompt_tokens = Counter("dualpath_prompt_tokens", "Prompt tokens of answered requests: cached "
                                     "(loaded from storage) or computed", ["kind"], registry=r)
        self.generation_tokens = Counter("dualpath_generation_tokens", "Tokens generated", registry=r)
        self.failures = Counter("dualpath_request_failures", "Requests that failed, by cause", ["cause"], registry=r)
        self.retries = Counter("dualpath_request_retries", "Retries: of a whole attempt (an engine died, a hit "
                               "block vanished), or of an admit on another DE", ["kind"], registry=r)
        self.ttft = Histogram("dualpath_time_to_first_token_seconds", "Arrival to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.tpot = Histogram("dualpath_time_per_output_token_seconds", "Mean gap between later tokens",
                              registry=r, buckets=LATENCY_BUCKETS)
        self.queueing = Histogram("dualpath_request_queue_seconds", "Arrival to admission on its engines",
                                  registry=r, buckets=LATENCY_BUCKETS)
        self.waiting = Gauge("dualpath_requests_waiting_for_room", "Requests that found no engine with room "
                             "(or no live engine of a role), waiting their turn (oldest first)", registry=r)
        self.waiting.set_function(lambda: len(coordinator.waiting))
        r.register(EngineCollector(coordinator))

    def answered(self, req: RequestState, t_done: float, bt: int) -> None:
        d = req.decision
        self.requests.labels(req.policy, d.path if d else "none").inc()
        cached = req.hit_blocks * bt
        self.prompt_tokens.labels("cached").inc(cached)
        self.prompt_tokens.labels("computed").inc(len(req.tokens) - cached)
        self.generation_tokens.inc(len(req.output))
        if req.t_scheduled is not None:
            self.queueing.observe(req.t_scheduled - req.t_arrival)
        if req.t_first is not None:
            self.ttft.observe(req.t_first - req.t_arrival)
            if len(req.output) > 1:
                self.tpot.observe((t_done - req.t_first) / (len(req.output) - 1))

    def failed(self, status: int) -> None:
        """Count a failed request by cause: any other 4xx (a body too large, say) is a rejection too."""
        cause = FAILURE_CAUSES.get(status) or ("rejected" if 400 <= status < 500 else "engine")
        self.failures.labels(cause).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineCollector:
    """Each live engine's last heartbeat, as metrics labelled by engine, role and node."""

    def __init__(self, coordinator: Coordinator):
        self.coordinator = coordinator

    def collect(self) -> Iterator[Metric]:
        c = self.coordinator
        labels = ["engine", "role", "node"]
        up = GaugeMetricFamily("dualpath_engine_up", "Live engines (heartbeat within dead_after_s)", labels=labels)
        read = CounterMetricFamily("dualpath_storage_read_bytes", "Bytes read from storage (its SNIC)", labels=labels)
        write = CounterMetricFamily("dualpath_storage_write_bytes", "Bytes persisted to storage", labels=labels)
        queue = GaugeMetricFamily("dualpath_storage_read_queue_bytes", "Storage reads queued", labels=labels)
        rate = GaugeMetricFamily("dualpath_storage_read_rate_bytes_per_second",
                                 "Measured drain rate of the engine's storage reads (a DE's: delivered into PEs "
                                 "over path B)", labels=labels)
        net = CounterMetricFamily("dualpath_network_sent_bytes", "Compute-network bytes sent, by traffic class",
                                  labels=[*labels, "traffic_class"])
        backend = GaugeMetricFamily("dualpath_transport_info", "The data plane in use", labels=[*labels, "backend"])
        links = GaugeMetricFamily("dualpath_transport_link_info", "The backend carrying each peer link (a verbs "
                                  "plane falls back to tcp per link)", labels=[*labels, "peer", "backend"])
        blocks = GaugeMetricFamily("dualpath_memory_blocks", "DRAM-buffer and HBM blocks, used or free",
                                   labels=[*labels, "memory", "state"])
        persist_q = GaugeMetricFamily("dualpath_persist_queue_blocks", "Full blocks waiting to be persisted",
                                      labels=labels)
        persisted = CounterMetricFamily("dualpath_persisted_blocks", "Full blocks persisted, dropped (queue full) "
                                        "or failed (the store refused)", labels=[*labels, "result"])
        events = CounterMetricFamily("dualpath_engine_events", "Engine counters (path-A/B requests and blocks, "
                                     "handoffs, fallbacks)", labels=[*labels, "event"])
        stages = CounterMetricFamily("dualpath_engine_stage_seconds", "Where an engine's time goes: seconds in each "
                                     "stage of its load and compute path (overlapping stages overlap)",
                                     labels=[*labels, "stage"])
        totals = {"buffer": c.cfg.engine.buffer_blocks, "hbm": c.cfg.engine.hbm_blocks}
        for e in c.live_engines():
            r, who = e.report, [e.name, e.role, str(e.node)]
            up.add_metric(who, 1)
            if r is None:  # registered, not heard from yet
                continue
            read.add_metric(who, r.storage_read_bytes)
            write.add_metric(who, r.storage_write_bytes)
            queue.add_metric(who, r.read_queue_bytes)
            rate.add_metric(who, r.read_rate_bps)
            for tc, n in r.network_sent_bytes.items():
                net.add_metric([*who, tc], n)
            backend.add_metric([*who, r.transport or "?"], 1)
            for peer, used in r.links.items():
                links.add_metric([*who, peer, used], 1)
            for kind, free in (("buffer", r.free_buffer_blocks), ("hbm", r.free_hbm_blocks)):
                blocks.add_metric([*who, kind, "used"], totals[kind] - free)
                blocks.add_metric([*who, kind, "free"], free)
            if r.persist_queue is not None:
                persist_q.add_metric(who, r.persist_queue)
                for result, n in (("written", r.persist_written), ("dropped", r.persist_dropped),
                                  ("failed", r.persist_failed)):
                    persisted.add_metric([*who, result], n)
            for event, n in r.metrics.items():
                events.add_metric([*who, event], n)
            for stage, s in r.stage_seconds.items():
                stages.add_metric([*who, stage], s)
        yield from (up, read, write, queue, rate, net, backend, links, blocks, persist_q, persisted, events, stages)
