"""The simulated cluster: engines, links, memory and the coordinator, in virtual time, deciding with
the same ``policy.choose`` the real coordinator calls, on loads as stale as heartbeats make them,
and batching prefills with the prefill engine's own ``pick_batch``.

What is modelled, each in the simplest form that keeps the real system's bottlenecks (docs/SIM.md):
- a node's storage NIC: one FIFO link at its read rate, shared by the node's engines; a read of n
  bytes takes [max(now, free), + n / rate], exactly the emulation the real engines run
  (storage/snic.py); the node's read queue, the figure the policies compare, is that link's backlog;
- an engine's compute NIC (its GPUs' NICs together): a FIFO link each way; path-B KV leaves the
  DE's and enters the PE's, the handoff leaves the PE's and enters the DE's;
- memory: an engine's DRAM buffer and the HBM it keeps for KV, in blocks. The DE takes the
  prompt and answer in HBM until the request ends, and the prompt's blocks in its buffer until the
  handoff is in, or refuses at once (the coordinator asks another DE at once). The PE then waits
  for the prompt's blocks in its buffer, then its HBM, until its handoff is sent; each pool serves
  waiters as the engines' ``Room`` does (whoever fits a release takes it, in the order they began
  waiting). A request larger than an engine's memory fails;
- compute: each step takes the profile's time (measured grids, or a roofline); with
  ``host_cores``, engines that compute at once on one host share its cores;
- host costs (``SimConfig.host``, measured by ``measure.py --host``): per request between its
  prefill and its first token, per step and per decoding sequence, per prompt block of a job
  starting a prefill step; all 0 unless a profile gives them;
- a PE: a step loop; each step computes ``pick_batch`` of its ready requests whose hit KV is in
  (else of the first one still loading) in the profile's time, and ends no earlier than one
  layer's compute after the last hit layer it waits for lands (layer-wise overlap);
- a DE: continuous batching; each step takes the profile's time for its batch and context and
  gives each running request one token; a request joins when its handoff is in;
- the coordinator: each engine's load and free memory as of its last heartbeat (every
  ``heartbeat_s``, and at once from an engine that freed memory), plus what was assigned since, as
  the coordinator's ``ClusterView`` does; a request no engine has room for waits, oldest first,
  and tries again when an engine that could fit it frees memory, or at the next heartbeat;
- what the nodes share (each off by default, so nothing but the coordinator is shared): the storage
  backend (``backend_gbps``: one FIFO link that every read also crosses, the 3FS servers' read limit
  for the whole cluster), the compute switch (``oversubscription``: one FIFO link of the nodes'
  compute NICs' sum over the factor, crossed by every path-B transfer and handoff between nodes),
  and nodes of ``gpus_per_node`` GPUs whose engines share the node's storage NIC and compute NIC.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from tqdm import tqdm

from dualpath.bench.driver import RequestRecord, RunResult
from dualpath.bench.workload import Session, cached_tokens
from dualpath.engine.batching import pick_batch
from dualpath.sched.policy import ClusterView, Decision, EngineLoad, NoRoom, RequestInfo, assigned, choose
from dualpath.sim.profile import HostCosts, Profile
from dualpath.storage.blockfile import HEADER_BYTES

UNBOUNDED = 1 << 40  # free blocks an engine without a memory limit reports


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


class StorageNic(Link):
    """A node's storage NIC (``Link``), reading through the cluster's storage backend when it has one
    (``SimConfig.backend_gbps``): a read ends when both FIFO links have served it, each at its own
    rate, queued behind the reads issued before it (on this node, and on every node). Its read queue
    is then, as the engines report it (``AsyncStore.read_queue_bytes``), the larger of the NIC's
    backlog and the bytes it has issued that have not arrived yet."""

    def __init__(self, rate_Bps: float, backend: Link | None = None):
        super().__init__(rate_Bps)
        self.backend = backend
        self.pending: deque = deque()  # (when it ends, bytes) of the reads through the backend, in order
        self.pending_bytes = 0

    def read(self, now: float, nbytes: float) -> float:
        end = self.reserve(now, nbytes)
        if self.backend is not None and nbytes:
            end = max(end, self.backend.reserve(now, nbytes))  # ends in issue order: both links are FIFO
            self.pending.append((end, nbytes))
            self.pending_bytes += nbytes
        return end

    def queue_bytes(self, now: float) -> int:
        if self.backend is None:
            return self.backlog_bytes(now)
        while self.pending and self.pending[0][0] <= now:
            self.pending_bytes -= self.pending.popleft()[1]
        return max(self.backlog_bytes(now), int(self.pending_bytes))


class Pool:
    """Memory in blocks that requests take and give back (capacity 0: unbounded), served as the
    engines' ``Room`` serves their pools (engine/room.py): a request tries at once, whoever waits;
    one that does not fit waits; a release wakes every waiter, and each in the order it began
    waiting takes its blocks if they fit now. So a small request may pass a large one that waits.
    ``try_take`` is the pools' non-waiting allocation (``alloc``, ``try_alloc``), which a DE's
    admission uses: it refuses rather than wait."""

    def __init__(self, blocks: int):
        self.capacity, self.used = blocks, 0
        self.waiting: list[tuple[int, Callable[[], None]]] = []

    @property
    def free(self) -> int:
        return self.capacity - self.used if self.capacity else UNBOUNDED

    def never_fits(self, n: int) -> bool:
        return bool(self.capacity) and n > self.capacity

    def try_take(self, n: int) -> bool:
        if n > self.free:
            return False
        self.used += n
        return True

    def take(self, n: int, then: Callable[[], None]) -> None:
        """``Room.until``: take n blocks now if they fit, else once a release makes room; then()."""
        if self.never_fits(n):
            raise ValueError(f"a request of {n} blocks can never fit a pool of {self.capacity}")
        if self.try_take(n):
            then()
        else:
            self.waiting.append((n, then))

    def give(self, n: int) -> None:
        """``Room.released``: every waiter tries again, oldest first; those that fit take."""
        self.used -= n
        if not self.waiting:
            return
        granted, still = [], []
        for n_wait, then in self.waiting:
            (granted if self.try_take(n_wait) else still).append((n_wait, then))
        self.waiting = still  # before the callbacks: they may take from this pool again
        for _, then in granted:
            then()


@dataclass
class SimConfig:
    n_prefill: int = 1
    n_decode: int = 2
    snic_gbps: float = 0.008  # storage NIC read rate per node, GB/s
    compute_link_gbps: float = 10.0  # compute NIC per GPU, GB/s each way
    gpus_per_engine: int = 1
    engines_per_node: int = 1  # engines of one role packed on a node share its storage NIC
    egress_only: bool = False  # links limit what an engine sends, not what it receives (tc-shaped test hosts)
    heartbeat_s: float = 0.2
    block_tokens: int = 64
    block_bytes: int = 0  # one stored block, header included (as the coordinator computes it)
    n_layers: int = 1
    buffer_blocks: int = 0  # DRAM buffer per engine, in blocks; 0 = unbounded
    hbm_blocks: int = 0  # HBM for KV per engine, in blocks; 0 = unbounded
    prefill_token_quota: int = 4096  # as EngineConfig.prefill_token_quota
    sample_every_s: float = 0.25
    send_until_s: float = 0.0  # > 0: no new turn starts after this; the run ends when the last one does
    trace_block_tokens: int = 512  # tokens per hash id, in trace replay (workload.load_mooncake's block_tokens)
    # > 0: every engine computes on the cores of one host (a CPU cluster: engine processes, or network
    # namespaces, on one machine). A step that starts while k engines compute, itself included, takes
    # max(1, k / host_cores) times its profile time (the cores shared evenly, as of its start)
    host_cores: int = 0
    # What the engines pay beyond their model steps (measure.py --host): per request on its path to the first
    # token, per step and per decoding sequence on the engine. All 0: the model steps alone.
    host: HostCosts = field(default_factory=HostCosts)
    # What the nodes share (docs/SIM.md, "What the nodes share"). The defaults share nothing but the coordinator.
    # The storage backend's read rate for the whole cluster (the 3FS servers), GB/s: one FIFO link every read
    # crosses besides its node's storage NIC; 0 = unbounded
    backend_gbps: float = 0.0
    # The compute switch: its bisection is the sum of the nodes' compute NICs (one direction) over this factor,
    # one FIFO link crossed by every path-B transfer and handoff between two nodes; 1 = non-blocking (no link)
    oversubscription: float = 1.0
    # GPUs per node, sharing one storage NIC (snic_gbps) and one compute NIC (compute_link_gbps per GPU,
    # together): engines packed gpus_per_node // gpus_per_engine to a node, each role on nodes of its own, PEs
    # first; an engine of more GPUs than a node spans gpus_per_engine // gpus_per_node nodes and has their
    # NICs together. 0 = the layout above: engines_per_node engines share a storage NIC, each engine has its
    # own compute NIC (for one-GPU engines, one a node, the same as gpus_per_node=1)
    gpus_per_node: int = 0


@dataclass(slots=True)
class _Turn:
    """A turn sent to the coordinator, sized and looked up once, as the coordinator does before a
    request waits for room (it may be tried again)."""
    session: Session
    k: int
    t_send: float
    info: RequestInfo


@dataclass
class _Request:
    rec: RequestRecord
    new_tokens: int  # tokens to compute
    context: int  # tokens before them (the hit)
    prompt_blocks: int
    decode_blocks: int
    loaded_at: float = 0.0  # when its last hit layer is in the PE's buffer (known once both reads start)
    reads_pending: int = 2  # the PE's and the DE's reads, each started once its engine has room
    computed: int = 0


@dataclass
class _Engine:
    name: str
    role: str
    node: int
    storage: StorageNic  # the node's, shared
    out: Link
    inn: Link
    buffer: Pool
    hbm: Pool
    ready: deque = field(default_factory=deque)  # PE: requests admitted, not yet prefilled
    stepping: bool = False
    queued_tokens: int = 0  # PE: new tokens admitted and not yet computed
    steps: int = 0  # DE: steps taken
    finishing: list = field(default_factory=list)  # DE: heap of (step it ends at, seq, request)
    decode_tokens: int = 0  # DE: prompt + answer tokens of the requests it admitted and has not finished
    attended: int = 0  # DE: tokens its running requests attend to, in all
    read_bytes: int = 0  # read from storage by the last sample
    reading: deque = field(default_factory=deque)  # (when it ends, bytes) of its reads, in order (FIFO NIC)


class Simulation:
    def __init__(self, cfg: SimConfig, profile: Profile, policy: str, sessions: list[Session],
                 progress: bool = False):
        self.cfg, self.profile, self.policy = cfg, profile, policy
        self.sessions = {s.sid: s for s in sessions}
        self.now, self._events, self._seq = 0.0, [], itertools.count()
        self.engines: list[_Engine] = []
        self.backend = Link(cfg.backend_gbps * 1e9) if cfg.backend_gbps else None
        if cfg.gpus_per_node:
            self._place_on_nodes()
        else:
            nics: dict[int, StorageNic] = {}
            link = cfg.compute_link_gbps * 1e9 * cfg.gpus_per_engine
            for role, n, first_node in (("prefill", cfg.n_prefill, 0),
                                        ("decode", cfg.n_decode, -(-cfg.n_prefill // cfg.engines_per_node))):
                for i in range(n):
                    node = first_node + i // cfg.engines_per_node
                    storage = nics.setdefault(node, StorageNic(cfg.snic_gbps * 1e9, self.backend))
                    self.engines.append(_Engine(f"{role[0]}e{i}", role, node, storage, Link(link),
                                                Link(0 if cfg.egress_only else link),
                                                Pool(cfg.buffer_blocks), Pool(cfg.hbm_blocks)))
        # the compute switch: the nodes' compute NICs' sum (one direction) over the oversubscription
        outs = {id(e.out): e.out.rate for e in self.engines}
        self.switch = Link(sum(outs.values()) / cfg.oversubscription) if cfg.oversubscription > 1 else None
        self.index = {e.name: k for k, e in enumerate(self.engines)}
        self.view = ClusterView()
        self.records: list[RequestRecord] = []
        self.open_requests = 0  # sent and not done
        self.waiting: deque[_Turn] = deque()  # no engine had room: oldest first
        self.short_of = ""  # the role the oldest waiter found no room in, at its last try
        self.to_arrive = 0  # sessions whose first timed turn has not been sent yet
        self.stored: set[int] = set()  # trace replay: hash ids whose blocks are stored
        self.samples: list[dict] = []
        self.computing = 0  # engines with a step under way (host_cores > 0)
        self.bar = tqdm(total=cfg.send_until_s or None, unit="sim-s", disable=not progress, leave=False)

    def _place_on_nodes(self) -> None:
        """Nodes of ``gpus_per_node`` GPUs, each with one storage NIC and one compute NIC (its GPUs'
        together) that its engines share; an engine larger than a node spans several and has all
        their NICs. Each role starts on a node of its own, PEs first."""
        c = self.cfg
        g, n = c.gpus_per_engine, c.gpus_per_node
        if g > n and g % n or g <= n and n % g:
            raise ValueError(f"engines of {g} GPUs do not pack into nodes of {n}")
        per, span = max(1, n // g), max(1, g // n)  # engines a node, nodes an engine
        node_rate = c.compute_link_gbps * 1e9 * n
        node = 0
        for role, count in (("prefill", c.n_prefill), ("decode", c.n_decode)):
            for i in range(count):
                if i % per == 0:
                    storage = StorageNic(c.snic_gbps * 1e9 * span, self.backend)
                    out, inn = Link(node_rate * span), Link(0 if c.egress_only else node_rate * span)
                    first, node = node, node + span
                self.engines.append(_Engine(f"{role[0]}e{i}", role, first, storage, out, inn,
                                            Pool(c.buffer_blocks), Pool(c.hbm_blocks)))

    def _cross(self, src: Link, dst: Link, t: float, nbytes: float, between_nodes: bool) -> float:
        """A transfer over the compute network, queued at t: it ends when the sender's NIC, the
        receiver's and (between two nodes) the switch have each served it."""
        end = max(src.reserve(t, nbytes), dst.reserve(t, nbytes))
        if self.switch is not None and between_nodes and nbytes:
            end = max(end, self.switch.reserve(t, nbytes))
        return end

    # -- the event queue --

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn))

    def run(self, warmup_turns: int = 1) -> RunResult:
        """Every session from turn `warmup_turns` on, each starting at its arrival time, turns closed
        loop, its earlier turns' blocks stored (as the real benchmark's untimed warm-up leaves them)."""
        for s in self.sessions.values():
            if len(s.turns) > warmup_turns:
                context = sum(t.append_tokens + t.output_tokens for t in s.turns[:warmup_turns])
                self.to_arrive += 1
                self.at(s.arrival_s, lambda s=s, context=context: self._arrive(s, warmup_turns, context))
        mode = "online" if any(s.arrival_s for s in self.sessions.values()) else "offline"
        self._beat()
        self._sample()
        while self._busy():
            self.now, _, fn = heapq.heappop(self._events)
            fn()
        self._sample()
        self.bar.close()
        t0 = min((r.t_send for r in self.records), default=0.0)
        duration = max((r.t_done for r in self.records if r.t_done is not None), default=t0) - t0
        return RunResult(self.policy, mode, duration, self.records, self.samples)

    def _busy(self) -> bool:
        return bool(self.open_requests or self.waiting or self.to_arrive)

    def _arrive(self, s: Session, k: int, context: int) -> None:
        self.to_arrive -= 1
        self._send(s, k, context)

    # -- heartbeats and samples --

    def _beat(self) -> None:
        for e in self.engines:
            self.view.put(self._load(e))
        self._retry_waiting()
        if self._busy():
            self.at(self.now + self.cfg.heartbeat_s, self._beat)

    def _freed(self, *engines: _Engine) -> None:
        """Engines that gave memory back say so in a heartbeat at once, and the requests waiting for
        room try again, oldest first (sched/waiting.py). Only where it can change an admission: with
        none waiting, or no engine here of the role the oldest waiter lacked room in that fits it
        now, the periodic beat is left to carry the news (a beat and a try per free made 48P96D runs
        1.4x slower)."""
        if not self.waiting or not any(self._fits_oldest(e) for e in engines):
            return
        for e in engines:
            self.view.put(self._load(e))
        self._retry_waiting()

    def _fits_oldest(self, e: _Engine) -> bool:
        """This engine is of the role the oldest waiter found no room in, and fits it now."""
        if e.role != self.short_of:
            return False
        info = self.waiting[0].info
        hbm = info.prompt_blocks if e.role == "prefill" else info.decode_blocks
        return e.buffer.free >= info.prompt_blocks and e.hbm.free >= hbm

    def _load(self, e: _Engine) -> EngineLoad:
        return EngineLoad(e.name, e.role, e.node, e.queued_tokens, e.decode_tokens,
                          e.storage.queue_bytes(self.now), e.buffer.free, e.hbm.free)

    def _retry_waiting(self) -> None:
        """The oldest waiters try, first come first served, until one finds no room (it keeps its
        place at the front). O(requests admitted): this runs at every free."""
        while self.waiting and self._admit(self.waiting[0]):
            self.waiting.popleft()

    def _sample(self) -> None:
        for e in self.engines:
            while e.reading and e.reading[0][0] <= self.now:
                e.read_bytes += e.reading.popleft()[1]
        self.samples.append({"t": self.now, "engines": {e.name: {"node": e.node, "role": e.role,
                                                                 "read_bytes": e.read_bytes, "write_bytes": 0}
                                                        for e in self.engines}})
        self.bar.update(self.cfg.sample_every_s)
        if self._busy():
            self.at(self.now + self.cfg.sample_every_s, self._sample)

    def _assign(self, name: str, work: dict[str, int]) -> None:
        """What a decision adds to an engine's last heartbeat, until the next one."""
        self.view.put(self.view.loads[name].plus(**work))

    # -- a request's life --

    def _hit_blocks(self, s: Session, k: int, context: int, prompt: int) -> int:
        c, bt, turn = self.cfg, self.cfg.block_tokens, s.turns[k]
        if turn.hash_ids is not None:  # a trace request: its leading trace blocks that are stored
            stored = next((i for i, h in enumerate(turn.hash_ids) if h not in self.stored), len(turn.hash_ids))
            return min(stored * c.trace_block_tokens // bt, (prompt - 1) // bt)
        return min(cached_tokens(context, bt) // bt, (prompt - 1) // bt) if context else 0

    def _send(self, s: Session, k: int, context: int) -> None:
        """Turn k of session s, `context` tokens after its start: sized and looked up, then admitted,
        or it waits for room behind the requests already waiting."""
        c, bt, turn = self.cfg, self.cfg.block_tokens, s.turns[k]
        if c.send_until_s and self.now > c.send_until_s:
            return
        prompt = (context + turn.append_tokens) if turn.hash_ids is None else turn.append_tokens
        info = RequestInfo(prompt, self._hit_blocks(s, k, context, prompt), c.block_bytes, turn.output_tokens,
                           -(-prompt // bt), -(-(prompt + turn.output_tokens) // bt))
        e = self.engines[0]  # every engine has the same memory
        if e.buffer.never_fits(info.prompt_blocks) or e.hbm.never_fits(max(info.prompt_blocks, info.decode_blocks)):
            self.records.append(RequestRecord(s.sid, k, self.now, prompt_tokens=prompt,
                                              error="larger than an engine's memory"))
            return  # the coordinator refuses it at once; the agent stops
        t = _Turn(s, k, self.now, info)
        if self.waiting or not self._admit(t):
            self.waiting.append(t)

    def _admit(self, t: _Turn) -> bool:
        """Choose engines and path for a turn and start it; False if no engine had room for it."""
        c, bt, info, s = self.cfg, self.cfg.block_tokens, t.info, t.session
        prompt, hit, turn = info.prompt_tokens, info.hit_blocks, s.turns[t.k]
        d = self._decide(info)
        if d is None:
            return False
        pe, de = self.engines[self.index[d.pe]], self.engines[self.index[d.de]]
        rec = RequestRecord(s.sid, t.k, t.t_send, prompt_tokens=prompt, cached_tokens=hit * bt,
                            output_tokens=turn.output_tokens, path=d.path, pe=d.pe, de=d.de,
                            read_bytes_pe=d.pe_blocks * c.block_bytes, read_bytes_de=d.de_blocks * c.block_bytes)
        self.records.append(rec)
        self.open_requests += 1
        req = _Request(rec, prompt - hit * bt, hit * bt, info.prompt_blocks, info.decode_blocks)
        pe.queued_tokens += req.new_tokens
        de.decode_tokens += prompt + turn.output_tokens  # a DE counts a request from its admission on

        def pe_admitted() -> None:  # storage -> PE buffer (path A)
            self._loaded(pe, req, self._read(pe, rec.read_bytes_pe))
            pe.ready.append(req)
            self._prefill(pe)

        def de_admitted() -> None:  # storage -> DE buffer -> compute links -> PE buffer (path B)
            nbytes = d.de_blocks * (c.block_bytes - HEADER_BYTES)  # the layers, not the headers
            read = self._read(de, rec.read_bytes_de)
            self._loaded(pe, req, self._cross(de.out, pe.inn, read, nbytes, de.node != pe.node))

        de_admitted()  # the DE took its memory in _decide; the PE then waits for room, buffer first (take_memory)
        pe.buffer.take(req.prompt_blocks, lambda: pe.hbm.take(req.prompt_blocks, pe_admitted))
        return True

    def _decide(self, info: RequestInfo) -> Decision | None:
        """The coordinator's ``schedule`` loop: choose, count the decision in the view, ask the DE to
        admit; a DE that refuses (no room after all, its heartbeat was stale) is passed over and
        another is chosen at once. None when no engine has room (the request waits). As in the
        coordinator, a refused decision stays counted in the view until the engines' next heartbeat."""
        passed_over: set[str] = set()
        while True:
            try:
                d = choose(self.policy, info, self.view, skip=passed_over)
            except NoRoom as e:
                self.short_of = e.role
                return None
            to_pe, to_de = assigned(d, info, self.cfg.block_tokens)
            self._assign(d.pe, to_pe)
            self._assign(d.de, to_de)
            de = self.engines[self.index[d.de]]
            if self._de_takes(de, info):
                return d
            passed_over.add(d.de)

    @staticmethod
    def _de_takes(de: _Engine, info: RequestInfo) -> bool:
        """``DecodeEngine.on_admit``: HBM for prompt + answer, then a buffer run for the prompt, or
        refuse at once, holding nothing."""
        if not de.hbm.try_take(info.decode_blocks):
            return False
        if not de.buffer.try_take(info.prompt_blocks):
            de.hbm.give(info.decode_blocks)
            return False
        return True

    def _read(self, e: _Engine, nbytes: int) -> float:
        end = e.storage.read(self.now, nbytes)
        if nbytes:
            e.reading.append((end, nbytes))
        return end

    def _loaded(self, pe: _Engine, req: _Request, t: float) -> None:
        req.loaded_at = max(req.loaded_at, t)
        req.reads_pending -= 1
        if req.reads_pending == 0:
            self._prefill(pe)

    def _prefill(self, pe: _Engine) -> None:
        """Start the PE's next step if it is idle. As in the real engine (``PrefillEngine._pick``), a
        step takes the ready requests whose hit KV is all in; with none, the first whose reads are
        under way runs alone and ends no earlier than one layer's compute after its last layer
        lands (layer-wise overlap)."""
        if pe.stepping:
            return
        jobs = [r for r in pe.ready if not r.reads_pending and r.loaded_at <= self.now]
        if not jobs:
            jobs = [r for r in pe.ready if not r.reads_pending][:1]
        if not jobs:
            return  # no read has started yet: _loaded starts the step
        picked = list(zip(jobs, pick_batch((r.new_tokens - r.computed for r in jobs), self.cfg.prefill_token_quota)))
        work = self._compute_s(self.profile.prefill_s([(n, r.context + r.computed) for r, n in picked])
                               + self._prefill_host_s(picked))
        loading = [r.loaded_at for r, _ in picked if r.computed == 0 and r.context]
        end = max(self.now + work, max(loading, default=0.0) + work / self.cfg.n_layers)
        pe.stepping = True
        self.at(end, lambda: self._prefilled(pe, picked))

    def _prefill_host_s(self, picked: list[tuple[_Request, int]]) -> float:
        """A prefill step's host cost: the step's own, and each prompt block of a job starting in it
        (its hit KV copied into HBM, its KV copied out for the handoff, on the engine's one compute
        thread)."""
        h = self.cfg.host
        return h.step_s + h.block_s * sum(r.prompt_blocks for r, _ in picked if r.computed == 0)

    def _prefilled(self, pe: _Engine, picked: list[tuple[_Request, int]]) -> None:
        pe.stepping = False
        self._computed()
        for req, n in picked:
            req.computed += n
            pe.queued_tokens -= n
            if req.computed == req.new_tokens:
                pe.ready.remove(req)
                self._handoff(pe, req)
        self._prefill(pe)

    def _handoff(self, pe: _Engine, req: _Request) -> None:
        """The prompt's KV the DE did not read itself goes to the DE; the PE's memory is free once sent."""
        c, rec = self.cfg, req.rec
        de = self.engines[self.index[rec.de]]
        nbytes = (req.prompt_blocks - rec.read_bytes_de // c.block_bytes) * (c.block_bytes - HEADER_BYTES)
        sent = self._cross(pe.out, de.inn, self.now, nbytes, pe.node != de.node)

        def arrived() -> None:
            pe.buffer.give(req.prompt_blocks)
            pe.hbm.give(req.prompt_blocks)
            de.buffer.give(req.prompt_blocks)
            self._freed(pe, de)
            self._join(de, req)

        self.at(sent + c.host.request_s, arrived)  # its control messages and first token's relay

    def _join(self, de: _Engine, req: _Request) -> None:
        rec = req.rec
        rec.t_first = self.now  # the PE's first token reaches the client with the handoff
        if rec.output_tokens <= 1:
            return self._finish(de, req)
        heapq.heappush(de.finishing, (de.steps + rec.output_tokens - 1, next(self._seq), req))
        de.attended += self.profile.attended(rec.prompt_tokens)
        if not de.stepping:
            de.stepping = True
            self._decode(de)

    def _decode(self, de: _Engine) -> None:
        batch = len(de.finishing)
        step = self._compute_s(self.profile.decode_step_s(batch, de.attended)
                               + self.cfg.host.decode_extra_s(batch))
        self.at(self.now + step, lambda: self._step(de))

    def _compute_s(self, seconds: float) -> float:
        """A step of `seconds` (the profile's, on cores of its own) starts: how long it takes with
        the host's cores shared among the engines computing now (SimConfig.host_cores)."""
        if not self.cfg.host_cores:
            return seconds
        self.computing += 1
        return seconds * max(1.0, self.computing / self.cfg.host_cores)

    def _computed(self) -> None:
        if self.cfg.host_cores:
            self.computing -= 1

    def _step(self, de: _Engine) -> None:
        self._computed()
        de.steps += 1
        while de.finishing and de.finishing[0][0] <= de.steps:
            req = heapq.heappop(de.finishing)[2]
            de.attended -= self.profile.attended(req.rec.prompt_tokens)
            self._finish(de, req)
        if de.finishing:
            self._decode(de)
        else:
            de.stepping = False

    def _finish(self, de: _Engine, req: _Request) -> None:
        rec = req.rec
        rec.t_done = self.now
        de.hbm.give(req.decode_blocks)
        de.decode_tokens -= rec.prompt_tokens + rec.output_tokens
        self.open_requests -= 1
        self._freed(de)
        s = self.sessions[rec.session]
        turn = s.turns[rec.turn]
        if turn.hash_ids is not None:  # its full blocks are persisted (the DE writes them behind)
            self.stored.update(turn.hash_ids[: (rec.prompt_tokens + rec.output_tokens) // self.cfg.trace_block_tokens])
        if rec.turn + 1 < len(s.turns):  # closed loop: the agent's next turn goes out at once
            self._send(s, rec.turn + 1, rec.prompt_tokens + rec.output_tokens)


def simulate(cfg: SimConfig, profile: Profile, policy: str, sessions: list[Session], warmup_turns: int = 1,
             progress: bool = False) -> RunResult:
    return Simulation(cfg, profile, policy, sessions, progress).run(warmup_turns)
