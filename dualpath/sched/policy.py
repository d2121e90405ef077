"""Scheduling policies: pure functions from a request and the cluster's load to a Decision.

No I/O here, so the coordinator and any simulator share them, and tests call them directly.

A request's hit blocks are read from storage either by its prefill engine (path A) or by its
decode engine (path B, then sent to the PE over the compute network). The Decision says how many
of the leading hit blocks the DE reads (``de_blocks``); the PE reads the rest. Policies:

- ``pe-read``: classic PD disaggregation; the PE reads everything (path A).
- ``de-read``: the DE reads everything (path B).
- ``dualpath`` (the paper's, §6.1): pick the PE with the fewest queued prefill tokens and, among
  the DEs whose decode load stays balanced, the one with the shortest storage read queue; then the
  whole read goes to whichever of the two would finish it first. Every storage NIC in the cluster
  serves as one pool.
- ``dualpath-split`` (beyond the paper, which names it as future work): same engines, but the
  hit blocks are split so that both read queues drain at the same time.

Queues can be compared as *drain times*, beyond the paper, which compares queue lengths (its storage
NICs all run at one rate, and the NIC is what drains a queue): given each engine's measured drain
rate (``read_rate_bps``), an engine whose own load pipeline, not its NIC, is the bottleneck gets
its fair share and no more. Path B is also charged what it costs the DE beyond the read (also beyond
the paper): its deliveries slow the DE's decoding, by ``delivery_cost`` seconds of its sequences'
decoding per second of delivery, as the DE measures it. Without rates (the coordinator passes them,
and the cost, only with scheduler.drain_rates on; see config.py for why it is off), bytes stand in
for time.

Every policy chooses only among engines with room for the request (free DRAM-buffer and HBM
blocks, as last reported); ``NoRoom`` when no engine of a role has it right now.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from operator import attrgetter

PATH_A, PATH_B, PATH_SPLIT = "A", "B", "A+B"  # the PE reads, the DE reads, both read


@dataclass(slots=True)
class EngineLoad:
    """What an engine reports by heartbeat (plus what the coordinator assigned since).

    A value: replaced, never changed in place, as the ClusterView keeps it sorted by its fields.
    (Not frozen only because one is built per engine and decision, and frozen's __init__ is 5x slower.)"""

    name: str
    role: str  # "prefill" | "decode"
    node: int
    queued_prefill_tokens: int = 0
    running_decode_tokens: int = 0  # a DE: prompt + max_tokens of each request it holds (its full length)
    read_queue_bytes: int = 0
    free_buffer_blocks: int = 0
    free_hbm_blocks: int = 0
    read_rate_bps: float = 0.0  # measured drain rate of its read queue; 0 = not measured yet
    # A DE: seconds of its running sequences' decoding lost per second it spends delivering path-B
    # KV (measured; 0 = none seen). Path B is charged it: its reads and sends share the DE.
    delivery_cost: float = 0.0

    def plus(self, queued_prefill_tokens: int = 0, running_decode_tokens: int = 0, read_queue_bytes: int = 0,
             buffer_blocks: int = 0, hbm_blocks: int = 0) -> EngineLoad:
        """This engine with work and memory just assigned to it (see ``assigned``)."""
        return EngineLoad(self.name, self.role, self.node, self.queued_prefill_tokens + queued_prefill_tokens,
                          self.running_decode_tokens + running_decode_tokens,
                          self.read_queue_bytes + read_queue_bytes, self.free_buffer_blocks - buffer_blocks,
                          self.free_hbm_blocks - hbm_blocks, self.read_rate_bps, self.delivery_cost)


# The orders the policies read engines in, by role. Each key ends with the engine's name, so ties go
# to the first name and a decision does not depend on the order engines were added in.
_ORDERS: dict[str, tuple[str, Callable[[EngineLoad], tuple]]] = {
    "prefill": ("prefill", attrgetter("queued_prefill_tokens", "read_queue_bytes", "name")),
    "decode_load": ("decode", attrgetter("running_decode_tokens", "name")),
    "read_queue": ("decode", attrgetter("read_queue_bytes", "running_decode_tokens", "name")),
    # only the DEs that measured their drain rate; read once all of them have
    "drain_time": ("decode", lambda e: (e.read_queue_bytes / e.read_rate_bps, e.running_decode_tokens, e.name)),
}
# The orders an engine is kept in, by its role and whether it has measured its drain rate
_KEPT_IN = {(role, rated): [(o, key) for o, (r, key) in _ORDERS.items() if r == role and (rated or o != "drain_time")]
            for role in ("prefill", "decode") for rated in (False, True)}


class ClusterView:
    """The live engines, each as last heard of plus what was assigned to it since, kept sorted in
    the orders the policies read them in (a sorted list of keys per order). A decision reads the
    engines at the front of an order instead of all of them: at 48P96D that is a few of 144, for a
    decision every few hundred microseconds (`dualpath bench scheduler`). Updating an engine's load
    moves its keys, a bisect in each of its role's orders."""

    def __init__(self, engines: Iterable[EngineLoad] = ()) -> None:
        self.loads: dict[str, EngineLoad] = {}
        self.keys: dict[str, list[tuple]] = {order: [] for order in _ORDERS}
        self.unrated_decode = 0  # decode engines that have not measured their drain rate yet
        for e in engines:
            self.put(e)

    def put(self, e: EngineLoad) -> None:
        """Add an engine, or replace its load."""
        self.drop(e.name)
        self.loads[e.name] = e
        for order, key in _KEPT_IN[e.role, e.read_rate_bps > 0]:
            insort(self.keys[order], key(e))
        self.unrated_decode += e.role == "decode" and not e.read_rate_bps > 0

    def drop(self, name: str) -> None:
        """Forget an engine (it died or left); nothing if it is not here."""
        e = self.loads.pop(name, None)
        if e is None:
            return
        for order, key in _KEPT_IN[e.role, e.read_rate_bps > 0]:
            keys = self.keys[order]
            del keys[bisect_left(keys, key(e))]
        self.unrated_decode -= e.role == "decode" and not e.read_rate_bps > 0

    def in_order(self, order: str) -> Iterator[EngineLoad]:
        loads = self.loads
        return (loads[key[-1]] for key in self.keys[order])


@dataclass(frozen=True, slots=True)
class RequestInfo:
    prompt_tokens: int
    hit_blocks: int
    block_bytes: int  # bytes of one stored block (all layers)
    max_tokens: int
    prompt_blocks: int = 0  # DRAM-buffer blocks on both engines, and HBM blocks on the PE
    decode_blocks: int = 0  # HBM blocks on the DE: prompt plus every token it may generate

    @property
    def read_bytes(self) -> int:
        return self.hit_blocks * self.block_bytes


@dataclass(frozen=True, slots=True)
class Decision:
    pe: str
    de: str
    hit_blocks: int
    de_blocks: int  # leading hit blocks read by the DE (path B); the PE reads the rest (path A)

    @property
    def pe_blocks(self) -> int:
        return self.hit_blocks - self.de_blocks

    @property
    def path(self) -> str:
        """How the hit KV travels: A (the PE reads it all), B (the DE reads it all) or A+B (a split)."""
        if self.de_blocks == 0:
            return PATH_A
        return PATH_B if self.pe_blocks == 0 else PATH_SPLIT


class NoEngine(RuntimeError):
    """No live engine of a needed role."""


class NoRoom(NoEngine):
    """Live engines of a needed role, but none with room for this request right now."""

    def __init__(self, message: str, role: str = ""):
        super().__init__(message)
        self.role = role  # the role without room


def _fits(e: EngineLoad, req: RequestInfo, skip: Collection[str]) -> bool:
    """Room for the request as last reported: the prompt's blocks in the engine's DRAM buffer, and in
    HBM the prompt's (a PE) or the prompt's and answer's (a DE)."""
    hbm = req.prompt_blocks if e.role == "prefill" else req.decode_blocks
    return e.free_buffer_blocks >= req.prompt_blocks and e.free_hbm_blocks >= hbm and e.name not in skip


def _first_fit(view: ClusterView, order: str, req: RequestInfo, skip: Collection[str]) -> EngineLoad:
    """The first engine in an order with room for the request (NoRoom if none has it now)."""
    for e in view.in_order(order):
        if _fits(e, req, skip):
            return e
    role = _ORDERS[order][0]
    if not view.keys[order]:  # (engines passed over are live: they refused for want of room)
        raise NoEngine(f"no live {role} engine")
    raise NoRoom(f"no {role} engine has room for this request now ({req.prompt_blocks} buffer blocks"
                 f"{f', {req.decode_blocks} HBM blocks' if role == 'decode' else ''})", role)


def _shortest_queue(view: ClusterView, req: RequestInfo, skip: Collection[str], ceiling: int) -> EngineLoad:
    """Among the DEs with room that run at most `ceiling` tokens (the balanced ones), the one with the
    shortest read queue: in drain time once every DE has measured its rate, else in bytes.
    Two walks reach it: the k balanced DEs, lightest first, or every DE in queue order up to the
    first balanced one (about n/k); the shorter is taken."""
    order = "drain_time" if view.unrated_decode == 0 else "read_queue"
    by_load = view.keys["decode_load"]
    k = bisect_left(by_load, (ceiling + 1,))  # the balanced DEs are the first k by decode load
    if k * k <= len(by_load):
        return min((e for e in islice(view.in_order("decode_load"), k) if _fits(e, req, skip)),
                   key=_ORDERS[order][1])
    return next(e for e in view.in_order(order) if e.running_decode_tokens <= ceiling and _fits(e, req, skip))


def _rates(*engines: EngineLoad) -> list[float]:
    """Their measured drain rates, or all 1.0 (time measured in bytes) unless every one has one."""
    rates = [e.read_rate_bps for e in engines]
    return rates if all(r > 0 for r in rates) else [1.0] * len(engines)


def _drain_s(e: EngineLoad, rate: float, extra_bytes: float = 0) -> float:
    return (e.read_queue_bytes + extra_bytes) / rate


def split_blocks(req: RequestInfo, pe: EngineLoad, de: EngineLoad) -> int:
    """Blocks for the DE such that both queues drain together, the DE's share charged its
    delivery cost c: (pe_queue + (hit - x) * b) / pe_rate == (de_queue + x * b * (1 + c)) / de_rate."""
    b, (rp, rd), c = req.block_bytes, _rates(pe, de), de.delivery_cost
    x = (rd * (pe.read_queue_bytes + req.hit_blocks * b) - rp * de.read_queue_bytes) / (b * (rp * (1 + c) + rd))
    return max(0, min(req.hit_blocks, round(x)))


def choose(policy: str, req: RequestInfo, view: ClusterView, skip: Collection[str] = ()) -> Decision:
    """The engines and path for a request; engines named in `skip` are passed over (they refused it)."""
    pe = _first_fit(view, "prefill", req, skip)  # the fewest queued prefill tokens
    lightest = _first_fit(view, "decode_load", req, skip)  # the fewest running decode tokens
    if policy in ("pe-read", "de-read"):
        de, de_blocks = lightest, req.hit_blocks if policy == "de-read" else 0
    elif policy in ("dualpath", "dualpath-split"):
        # the read-queue choice must not unbalance decoding: at most one request's worth of tokens
        # beyond the least loaded DE
        de = _shortest_queue(view, req, skip, lightest.running_decode_tokens + req.prompt_tokens + req.max_tokens)
        if policy == "dualpath-split":
            de_blocks = split_blocks(req, pe, de)
        else:  # the side that would finish the read first reads all; a tie goes to the PE (no extra hop)
            rp, rd = _rates(pe, de)
            path_b_s = _drain_s(de, rd, req.read_bytes * (1 + de.delivery_cost))  # charged as split_blocks does
            de_blocks = req.hit_blocks if path_b_s < _drain_s(pe, rp, req.read_bytes) else 0
    else:
        raise ValueError(f"unknown policy {policy!r}")
    return Decision(pe.name, de.name, req.hit_blocks, de_blocks)


def assigned(d: Decision, req: RequestInfo, block_tokens: int) -> tuple[dict[str, int], dict[str, int]]:
    """What a decision gives its PE and its DE (``EngineLoad.plus`` arguments), counted in their loads
    until their next heartbeats show it, so that a burst of requests does not all go to the engine
    that looked idlest at the last heartbeat."""
    pe = {"queued_prefill_tokens": req.prompt_tokens - d.hit_blocks * block_tokens,
          "read_queue_bytes": d.pe_blocks * req.block_bytes, "buffer_blocks": req.prompt_blocks,
          "hbm_blocks": req.prompt_blocks}
    de = {"running_decode_tokens": req.prompt_tokens + req.max_tokens,
          "read_queue_bytes": d.de_blocks * req.block_bytes, "buffer_blocks": req.prompt_blocks,
          "hbm_blocks": req.decode_blocks}
    return pe, de
