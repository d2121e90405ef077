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
its fair share and no more. Without rates (the coordinator passes them only with
scheduler.drain_rates on; see config.py for why it is off), bytes stand in for time.

Every policy chooses only among engines with room for the request (free DRAM-buffer and HBM
blocks, as last reported); ``NoRoom`` when no engine of a role has it right now.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from operator import attrgetter

PATH_A, PATH_B, PATH_SPLIT = "A", "B", "A+B"  # the PE reads, the DE reads, both read


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """What an engine reports by heartbeat (plus what the coordinator assigned since)."""

    name: str
    role: str  # "prefill" | "decode"
    node: int
    queued_prefill_tokens: int = 0
    running_decode_tokens: int = 0
    read_queue_bytes: int = 0
    free_buffer_blocks: int = 0
    free_hbm_blocks: int = 0
    read_rate_bps: float = 0.0  # measured drain rate of its read queue; 0 = not measured yet

    def plus(self, queued_prefill_tokens: int = 0, running_decode_tokens: int = 0, read_queue_bytes: int = 0,
             buffer_blocks: int = 0, hbm_blocks: int = 0) -> EngineLoad:
        """This engine with work and memory just assigned to it (see ``assigned``)."""
        return EngineLoad(self.name, self.role, self.node, self.queued_prefill_tokens + queued_prefill_tokens,
                          self.running_decode_tokens + running_decode_tokens,
                          self.read_queue_bytes + read_queue_bytes, self.free_buffer_blocks - buffer_blocks,
                          self.free_hbm_blocks - hbm_blocks, self.read_rate_bps)


@dataclass(frozen=True, slots=True)
class ClusterView:
    """The live engines by role, each as last heard of plus what was assigned to it since."""

    prefill: list[EngineLoad]
    decode: list[EngineLoad]

    @staticmethod
    def of(engines: Iterable[EngineLoad]) -> ClusterView:
        engines = list(engines)
        return ClusterView([e for e in engines if e.role == "prefill"], [e for e in engines if e.role == "decode"])

    def without(self, names: set[str]) -> ClusterView:
        return ClusterView([e for e in self.prefill if e.name not in names],
                           [e for e in self.decode if e.name not in names])


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


# Sort keys (attrgetter builds the tuple in C: these run over every engine of every decision)
_PREFILL_ORDER = attrgetter("queued_prefill_tokens", "read_queue_bytes", "name")
_DECODE_ORDER = attrgetter("running_decode_tokens", "name")
_READ_QUEUE_ORDER = attrgetter("read_queue_bytes", "running_decode_tokens", "name")
_DECODE_LOAD = attrgetter("running_decode_tokens")


def _roomy(engines: list[EngineLoad], role: str, req: RequestInfo) -> list[EngineLoad]:
    """The live engines of a role with room for the request: the prompt's blocks in its DRAM buffer,
    and in HBM the prompt's (a PE) or the prompt's and answer's (a DE)."""
    buffer, hbm = req.prompt_blocks, req.prompt_blocks if role == "prefill" else req.decode_blocks
    roomy = [e for e in engines if e.free_buffer_blocks >= buffer and e.free_hbm_blocks >= hbm]
    if roomy:
        return roomy
    if not engines:
        raise NoEngine(f"no live {role} engine")
    raise NoRoom(f"no {role} engine has room for this request now ({req.prompt_blocks} buffer blocks"
                 f"{f', {req.decode_blocks} HBM blocks' if role == 'decode' else ''})")


def _balanced_decode_engines(des: list[EngineLoad], req: RequestInfo) -> list[EngineLoad]:
    """DEs that could take this request without running more than one request's worth of tokens
    beyond the least loaded DE: the read-queue choice must not unbalance decoding."""
    ceiling = min(map(_DECODE_LOAD, des)) + req.prompt_tokens + req.max_tokens
    return [e for e in des if e.running_decode_tokens <= ceiling]


def _rates(*engines: EngineLoad) -> list[float]:
    """Their measured drain rates, or all 1.0 (time measured in bytes) unless every one has one."""
    rates = [e.read_rate_bps for e in engines]
    return rates if all(r > 0 for r in rates) else [1.0] * len(engines)


def _drain_s(e: EngineLoad, rate: float, extra_bytes: int = 0) -> float:
    return (e.read_queue_bytes + extra_bytes) / rate


def split_blocks(req: RequestInfo, pe: EngineLoad, de: EngineLoad) -> int:
    """Blocks for the DE such that both queues drain together:
    (pe_queue + (hit - x) * b) / pe_rate == (de_queue + x * b) / de_rate."""
    b, (rp, rd) = req.block_bytes, _rates(pe, de)
    x = (rd * (pe.read_queue_bytes + req.hit_blocks * b) - rp * de.read_queue_bytes) / (b * (rp + rd))
    return max(0, min(req.hit_blocks, round(x)))


def choose(policy: str, req: RequestInfo, view: ClusterView) -> Decision:
    pes, des = _roomy(view.prefill, "prefill", req), _roomy(view.decode, "decode", req)
    # ties go to the first name, so a decision does not depend on the order engines are listed in
    pe = min(pes, key=_PREFILL_ORDER)
    if policy in ("pe-read", "de-read"):
        de = min(des, key=_DECODE_ORDER)
        de_blocks = req.hit_blocks if policy == "de-read" else 0
    elif policy in ("dualpath", "dualpath-split"):
        balanced = _balanced_decode_engines(des, req)
        if all(e.read_rate_bps > 0 for e in balanced):  # measured drain rates: compare drain times
            de = min(balanced, key=lambda e: (_drain_s(e, e.read_rate_bps), e.running_decode_tokens, e.name))
        else:  # bytes stand in for time
            de = min(balanced, key=_READ_QUEUE_ORDER)
        if policy == "dualpath-split":
            de_blocks = split_blocks(req, pe, de)
        else:  # the side that would finish the read first reads all; a tie goes to the PE (no extra hop)
            rp, rd = _rates(pe, de)
            de_blocks = req.hit_blocks if _drain_s(de, rd, req.read_bytes) < _drain_s(pe, rp, req.read_bytes) else 0
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
