"""The simulated cluster: engines, links and the coordinator, in virtual time, deciding with the
same ``policy.choose`` the real coordinator calls, on loads as stale as heartbeats make them.

What is modelled, each in the simplest form that keeps the real system's bottlenecks:
- a node's storage NIC: one FIFO link at its read rate, shared by the node's engines; a read of n
  bytes takes [max(now, free), + n / rate], exactly the emulation the real engines run
  (storage/snic.py), and the node's read queue is that link's backlog;
- an engine's compute NIC: a FIFO link per engine, carrying path-B loads into the PE and handoffs
  out of it;
- a PE: one compute server; a request's prefill takes its new tokens over the profile's prefill
  rate, and may start before its hit KV is in, finishing no earlier than one layer's compute
  after the last layer lands (layer-wise overlap);
- a DE: continuous batching; every step takes the profile's step time and gives each running
  request one token; a request joins when its handoff is in;
- the coordinator: each engine's load as of its last heartbeat (every ``heartbeat_s``) plus what
  was assigned since, as ``Coordinator.cluster_view`` and ``_assign`` do.
Not modelled: DRAM-buffer and HBM capacity (every engine has room), persistence writes, failures,
the control plane's latency, and batching effects beyond the profile's rates.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from dualpath.bench.driver import RequestRecord, RunResult
from dualpath.bench.workload import Session, cached_tokens
from dualpath.sched.policy import EngineLoad, RequestInfo, choose
from dualpath.sim.profile import ComputeProfile
from dualpath.storage.blockfile import HEADER_BYTES

ROOMY = 1 << 40  # free blocks every engine reports: memory is not modelled


class Link:
    """A FIFO link in virtual time (a NIC): each transfer waits for the ones before it."""

    def __init__(self, rate_Bps: float):
        self.rate, self.free = rate_Bps, 0.0

    def reserve(self, now: float, nbytes: float) -> float:
        """When a transfer of nbytes queued now completes (unlimited rate: at once)."""
        if not self.rate or not nbytes:
            return now
        self.free = max(now, self.free) + nbytes / self.rate
        return self.free

    def backlog_bytes(self, now: float) -> int:
        return int(max(0.0, self.free - now) * self.rate) if self.rate else 0


@dataclass
class SimConfig:
    n_prefill: int = 1
    n_decode: int = 2
    snic_gbps: float = 0.008  # storage NIC read rate per node (one engine per node)
    compute_link_gbps: float = 10.0  # per engine
    heartbeat_s: float = 0.2
    block_tokens: int = 64
    block_bytes: int = 0  # one stored block, header included (as the coordinator computes it)
    n_layers: int = 1
    sample_every_s: float = 0.25


@dataclass
class _Engine:
    name: str
    role: str
    node: int
    storage: Link
    link: Link
    free_at: float = 0.0  # PE: when its compute server is free
    queued_tokens: int = 0  # PE: new tokens admitted and not yet computed
    running: list = field(default_factory=list)  # DE: requests decoding
    stepping: bool = False
    read_bytes: int = 0
    heartbeat: dict = field(default_factory=dict)
    assigned: Counter = field(default_factory=Counter)

    @property
    def decode_tokens(self) -> int:
        return sum(r.prompt_tokens + r.output_tokens for r, _ in self.running)


class Simulation:
    def __init__(self, cfg: SimConfig, profile: ComputeProfile, policy: str, sessions: list[Session]):
        self.cfg, self.profile, self.policy = cfg, profile, policy
        self.sessions = {s.sid: s for s in sessions}
        self.now, self._events, self._seq = 0.0, [], itertools.count()
        roles = ["prefill"] * cfg.n_prefill + ["decode"] * cfg.n_decode
        self.engines = [_Engine(f"{'pe' if r == 'prefill' else 'de'}{i}", r, i, Link(cfg.snic_gbps * 1e9),
                                Link(cfg.compute_link_gbps * 1e9)) for i, r in enumerate(roles)]
        self.by_name = {e.name: e for e in self.engines}
        self.records: list[RequestRecord] = []
        self.open_requests = 0  # sent and not done
        self.samples: list[dict] = []

    # -- the event queue --

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn))

    def run(self, warmup_turns: int = 1) -> RunResult:
        """Every session from turn `warmup_turns` on, closed loop, its earlier turns' blocks stored
        (as the real benchmark's untimed warm-up leaves them)."""
        self._beat()
        self._sample()
        for s in self.sessions.values():
            if len(s.turns) > warmup_turns:
                context = sum(t.append_tokens + t.output_tokens for t in s.turns[:warmup_turns])
                self.at(0.0, lambda s=s, context=context: self._send(s, warmup_turns, context))
        while self._events:
            self.now, _, fn = heapq.heappop(self._events)
            fn()
            if self.open_requests == 0:  # every session has ended (heartbeats and samples still queued)
                break
        self._sample()
        duration = max((r.t_done for r in self.records if r.t_done is not None), default=0.0)
        return RunResult(self.policy, "offline", duration, self.records, self.samples)

    # -- heartbeats and samples --

    def _beat(self) -> None:
        for e in self.engines:
            e.heartbeat = {"queued_prefill_tokens": e.queued_tokens, "running_decode_tokens": e.decode_tokens,
                           "read_queue_bytes": e.storage.backlog_bytes(self.now)}
            e.assigned = Counter()
        if self._events or not self.records:
            self.at(self.now + self.cfg.heartbeat_s, self._beat)

    def _sample(self) -> None:
        self.samples.append({"t": self.now, "engines": {e.name: {"node": e.node, "role": e.role,
                                                                 "read_bytes": e.read_bytes, "write_bytes": 0}
                                                        for e in self.engines}})
        if self._events:
            self.at(self.now + self.cfg.sample_every_s, self._sample)

    # -- a request's life --

    def _view(self) -> list[EngineLoad]:
        return [EngineLoad(e.name, e.role, e.node, **{k: e.heartbeat[k] + e.assigned[k] for k in e.heartbeat},
                           free_buffer_blocks=ROOMY, free_hbm_blocks=ROOMY) for e in self.engines]

    def _send(self, s: Session, k: int, context: int) -> None:
        c, bt, turn = self.cfg, self.cfg.block_tokens, s.turns[k]
        prompt = context + turn.append_tokens
        hit = min(cached_tokens(context, bt) // bt, (prompt - 1) // bt) if context else 0
        rec = RequestRecord(s.sid, k, self.now, prompt_tokens=prompt, cached_tokens=hit * bt,
                            output_tokens=turn.output_tokens)
        self.records.append(rec)
        self.open_requests += 1
        info = RequestInfo(prompt, hit, c.block_bytes, turn.output_tokens, -(-prompt // bt),
                           -(-(prompt + turn.output_tokens) // bt))
        d = choose(self.policy, info, self._view())
        pe, de = self.by_name[d.pe], self.by_name[d.de]
        new = prompt - hit * bt
        pe.assigned["queued_prefill_tokens"] += new
        pe.assigned["read_queue_bytes"] += d.pe_blocks * c.block_bytes
        de.assigned["read_queue_bytes"] += d.de_blocks * c.block_bytes
        de.assigned["running_decode_tokens"] += prompt + turn.output_tokens
        rec.path, rec.pe, rec.de = d.path, d.pe, d.de
        rec.read_bytes_pe, rec.read_bytes_de = d.pe_blocks * c.block_bytes, d.de_blocks * c.block_bytes
        # storage -> PE (path A); storage -> DE -> compute link -> PE (path B)
        a_in = self._read(pe, rec.read_bytes_pe)
        b_read = self._read(de, rec.read_bytes_de)
        b_in = de.link.reserve(b_read, d.de_blocks * (c.block_bytes - HEADER_BYTES))  # layers only
        loaded = max(a_in, b_in)
        pe.queued_tokens += new
        work = self.profile.prefill_s(new)
        done = max(max(pe.free_at, self.now) + work, loaded + work / c.n_layers)
        pe.free_at = done
        handoff_blocks = -(-prompt // bt) - d.de_blocks
        layer_bytes = (c.block_bytes - HEADER_BYTES) * handoff_blocks

        def prefilled() -> None:
            pe.queued_tokens -= new
            self.at(pe.link.reserve(self.now, layer_bytes), lambda: self._join(de, rec))

        self.at(done, prefilled)

    def _read(self, e: _Engine, nbytes: int) -> float:
        end = e.storage.reserve(self.now, nbytes)
        if nbytes:
            self.at(end, lambda: setattr(e, "read_bytes", e.read_bytes + nbytes))
        return end

    def _join(self, de: _Engine, rec: RequestRecord) -> None:
        rec.t_first = self.now  # the PE's first token reaches the client with the handoff
        if rec.output_tokens <= 1:
            return self._finish(rec)
        de.running.append((rec, [1]))  # [tokens made so far]
        if not de.stepping:
            de.stepping = True
            self.at(self.now + self.profile.decode_step(len(de.running)), lambda: self._step(de))

    def _step(self, de: _Engine) -> None:
        still = []
        for rec, made in de.running:
            made[0] += 1
            if made[0] >= rec.output_tokens:
                self._finish(rec)
            else:
                still.append((rec, made))
        de.running = still
        if still:
            self.at(self.now + self.profile.decode_step(len(still)), lambda: self._step(de))
        else:
            de.stepping = False

    def _finish(self, rec: RequestRecord) -> None:
        rec.t_done = self.now
        self.open_requests -= 1
        s = self.sessions[rec.session]
        if rec.turn + 1 < len(s.turns):  # closed loop: the agent's next turn goes out at once
            self._send(s, rec.turn + 1, rec.prompt_tokens + rec.output_tokens)


def simulate(cfg: SimConfig, profile: ComputeProfile, policy: str, sessions: list[Session],
             warmup_turns: int = 1) -> RunResult:
    return Simulation(cfg, profile, policy, sessions).run(warmup_turns)
