"""Prometheus metrics for the whole cluster, served by the coordinator at /metrics.

Two sources. What the coordinator sees of each request (counters and latency histograms, updated
as requests end); and what each engine reports by heartbeat (read at scrape time by
``EngineCollector``): storage-NIC bytes and read queues per node, compute-network bytes per traffic
class, the transport backend, DRAM-buffer and HBM blocks in use, persistence. The paper's
deployment advice is to watch exactly these: path choice, storage and network load, memory.

Where an idea is vLLM's too (request latency, running and waiting requests, tokens, KV-cache
usage, prefix-cache hits), it is also served under vLLM's name and labels (``vllm:...``, with
``model_name``), so that a vLLM Grafana dashboard or alert works unchanged (``VllmMetrics``;
docs/METRICS.md maps every family). The ``dualpath_*`` families stay: they are what this project's
dashboards and tests read, and they carry what vLLM has no name for (paths, storage NICs, classes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sized
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from dualpath.sched.replies import finish_reason

if TYPE_CHECKING:
    from dualpath.config import ClusterConfig
    from dualpath.sched.coordinator import EngineEntry, RequestState


class CoordinatorView(Protocol):
    """What /metrics and the dashboard read of the coordinator, and nothing more: its config, the
    model it serves, its requests and its waiting room, its live engines (with their last reports)
    and the metrics themselves."""

    cfg: ClusterConfig
    model_name: str
    max_context: int
    waiting: Sized
    requests: Mapping[str, RequestState]
    metrics: ClusterMetrics

    def live_engines(self) -> list[EngineEntry]: ...

FAILURE_CAUSES = {400: "rejected", 404: "rejected", 401: "unauthorized", 503: "unavailable", 504: "timeout"}
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# vLLM's own buckets (vllm/v1/metrics/loggers.py), so that its dashboards' quantiles read the same
VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                     20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
VLLM_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                     40.0, 80.0)
VLLM_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                        240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length", "abort")  # vLLM's FinishReason: every series exists from the start


def buckets_1_2_5(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's token-count buckets, from the context length)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


class ClusterMetrics:
    def __init__(self, coordinator: CoordinatorView):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("dualpath_requests", "Requests answered, by policy and the path their hit KV took",
                                ["policy", "path"], registry=r)
        self.prompt_tokens = Counter("dualpath_prompt_tokens", "Prompt tokens of answered requests: cached "
                                     "(loaded from storage) or computed", ["kind"], registry=r)
        self.generation_tokens = Counter("dualpath_generation_tokens", "Tokens generated", registry=r)
        self.failures = Counter("dualpath_request_failures", "Requests that failed, by cause", ["cause"], registry=r)
        self.retries = Counter("dualpath_request_retries", "Retries: of a whole attempt (an engine died, a hit "
                               "block vanished), or of an admit on another DE", ["kind"], registry=r)
        self.migrations = Counter("dualpath_request_migrations", "Requests continued on another engine after "
                                  "streaming tokens, by why their engine was lost (died, silent, failed)", ["cause"],
                                  registry=r)
        self.ttft = Histogram("dualpath_time_to_first_token_seconds", "Arrival to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.tpot = Histogram("dualpath_time_per_output_token_seconds", "Mean gap between later tokens",
                              registry=r, buckets=LATENCY_BUCKETS)
        self.queueing = Histogram("dualpath_request_queue_seconds", "Arrival to admission on its engines",
                                  registry=r, buckets=LATENCY_BUCKETS)
        self.waiting = Gauge("dualpath_requests_waiting_for_room", "Requests that found no engine with room "
                             "(or no live engine of a role), waiting their turn (oldest first)", registry=r)
        self.waiting.set_function(lambda: len(coordinator.waiting))
        self.info = Gauge("dualpath_cluster_info", "The model served and the cluster's scheduling policy (a "
                          "request's dualpath_policy may override it); always 1", ["model_name", "policy"],
                          registry=r)
        self.info.labels(coordinator.model_name, coordinator.cfg.scheduler.policy).set(1)
        self.vllm = VllmMetrics(r, coordinator)
        r.register(EngineCollector(coordinator))

    def answered(self, req: RequestState, t_done: float, bt: int, reason: str | None = None) -> None:
        """Count an answered request (`reason`: its finish_reason, when the caller knows it)."""
        self.vllm.answered(req, t_done, bt, reason or finish_reason(req))
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

    def aborted(self) -> None:
        """A request whose client went away before its answer ended (vLLM's finished_reason 'abort')."""
        self.vllm.success.labels(self.vllm.model_name, "abort").inc()

    def failure_counts(self) -> dict[str, float]:
        """Failed requests so far, by cause (the dashboard turns them into rates)."""
        return {s.labels["cause"]: s.value for metric in self.failures.collect() for s in metric.samples
                if s.name.endswith("_total")}

    def render(self) -> bytes:
        return generate_latest(self.registry)


def in_flight(coordinator: CoordinatorView, running: bool) -> Callable[[], float]:
    """A gauge's reading: the coordinator's requests in flight that are running on their engines
    (admitted: prefill submitted) or, with running=False, waiting (for room, or being admitted)."""
    def count() -> float:
        return sum(r.status.running == running for r in list(coordinator.requests.values()))
    return count


class VllmMetrics:
    """The families a vLLM user looks for, under vLLM's names and its ``model_name`` label, from what
    the coordinator sees of each request. Engine-side ones (KV-cache usage) are in EngineCollector."""

    def __init__(self, r: CollectorRegistry, coordinator: CoordinatorView):
        self.model_name = m = coordinator.model_name
        labels = ["model_name"]
        self.running = Gauge("vllm:num_requests_running", "Requests admitted on their engines (prefilling or "
                             "decoding)", labels, registry=r)
        self.running.labels(m).set_function(in_flight(coordinator, running=True))
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests not yet admitted: waiting for room or an "
                             "engine, or being admitted", labels, registry=r)
        self.waiting.labels(m).set_function(in_flight(coordinator, running=False))
        self.success = Counter("vllm:request_success", "Requests finished, by finish reason",
                               [*labels, "finished_reason"], registry=r)
        for reason in FINISH_REASONS:
            self.success.labels(m, reason)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests (cached and "
                                     "computed)", labels, registry=r).labels(m)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated", labels, registry=r).labels(m)
        self.cache_queries = Counter("vllm:prefix_cache_queries", "Prefix-cache queries, in prompt tokens looked "
                                     "up in the block store", labels, registry=r).labels(m)
        self.cache_hits = Counter("vllm:prefix_cache_hits", "Prefix-cache hits, in prompt tokens found in the "
                                  "block store (loaded, not computed)", labels, registry=r).labels(m)
        tokens = buckets_1_2_5(coordinator.max_context)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]):
            return Histogram(name, doc, labels, registry=r, buckets=buckets).labels(m)

        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens", "Prompt tokens per request", tokens)
        self.request_generation_tokens = histogram("vllm:request_generation_tokens", "Generated tokens per request",
                                                   tokens)
        self.max_tokens = histogram("vllm:request_params_max_tokens", "The max_tokens of each request", tokens)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Arrival to first token", VLLM_TTFT_BUCKETS)
        self.tpot = histogram("vllm:time_per_output_token_seconds", "Mean gap between a request's later tokens",
                              VLLM_TPOT_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Arrival to the last token", VLLM_REQUEST_BUCKETS)
        self.queue = histogram("vllm:request_queue_time_seconds", "Arrival to admission on its engines (WAITING)",
                               VLLM_REQUEST_BUCKETS)
        self.inference = histogram("vllm:request_inference_time_seconds", "Admission to the last token (RUNNING)",
                                   VLLM_REQUEST_BUCKETS)
        self.prefill = histogram("vllm:request_prefill_time_seconds", "Admission to the first token (PREFILL: "
                                 "loading its hit KV, computing the rest, the handoff)", VLLM_REQUEST_BUCKETS)
        self.decode = histogram("vllm:request_decode_time_seconds", "First token to the last (DECODE)",
                                VLLM_REQUEST_BUCKETS)

    def answered(self, req: RequestState, t_done: float, bt: int, reason: str) -> None:
        prompt, cached, generated = len(req.tokens), req.hit_blocks * bt, len(req.output)
        self.success.labels(self.model_name, reason).inc()
        self.prompt_tokens.inc(prompt)
        self.generation_tokens.inc(generated)
        self.cache_queries.inc(prompt)
        self.cache_hits.inc(cached)
        self.request_prompt_tokens.observe(prompt)
        self.request_generation_tokens.observe(generated)
        self.max_tokens.observe(req.params["max_tokens"])
        self.e2e.observe(t_done - req.t_arrival)
        if req.t_scheduled is not None:
            self.queue.observe(req.t_scheduled - req.t_arrival)
            self.inference.observe(t_done - req.t_scheduled)
            if req.t_first is not None:
                self.prefill.observe(req.t_first - req.t_scheduled)
        if req.t_first is not None:
            self.ttft.observe(req.t_first - req.t_arrival)
            self.decode.observe(t_done - req.t_first)
            if generated > 1:
                self.tpot.observe((t_done - req.t_first) / (generated - 1))


class EngineCollector:
    """Each live engine's last heartbeat, as metrics labelled by engine, role and node."""

    def __init__(self, coordinator: CoordinatorView):
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
        kv_labels = ["model_name", "engine"]  # vLLM's labels: `engine` is an engine's name here, not an index
        kv_usage = GaugeMetricFamily("vllm:kv_cache_usage_perc", "Fraction of the engine's HBM KV blocks in use "
                                     "(1 = all)", labels=kv_labels)
        gpu_usage = GaugeMetricFamily("vllm:gpu_cache_usage_perc", "The same as vllm:kv_cache_usage_perc, under "
                                      "the name of vLLM before 0.9 (older dashboards)", labels=kv_labels)
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
            for family in (kv_usage, gpu_usage):
                family.add_metric([c.model_name, e.name], 1 - r.free_hbm_blocks / totals["hbm"])
            if r.persist_queue is not None:
                persist_q.add_metric(who, r.persist_queue)
                for result, n in (("written", r.persist_written), ("dropped", r.persist_dropped),
                                  ("failed", r.persist_failed)):
                    persisted.add_metric([*who, result], n)
            for event, n in r.metrics.items():
                events.add_metric([*who, event], n)
            for stage, s in r.stage_seconds.items():
                stages.add_metric([*who, stage], s)
        yield from (up, read, write, queue, rate, net, backend, links, blocks, persist_q, persisted, events, stages,
                    kv_usage, gpu_usage)
