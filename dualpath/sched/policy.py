"""Scheduling policies: pure functions from a request and the cluster's load to a Decision.

No I/O here, so the coordinator and any simulator share them, and tests call them directly.
The paper's policy (``dualpath``): pick the PE with the fewest queued prefill tokens and the DE
with the fewest running decode tokens, then read the hit KV on whichever of the two has the
shorter storage read queue, so every storage NIC in the cluster serves as one pool.
"""

from __future__ import annotations

from dataclasses import dataclass

PE_SIDE, DE_SIDE = "pe", "de"


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class RequestInfo:
    prompt_tokens: int
    hit_blocks: int
    block_bytes: int  # bytes of one stored block (all layers)
    max_tokens: int

    @property
    def read_bytes(self) -> int:
        return self.hit_blocks * self.block_bytes


@dataclass(frozen=True)
class Decision:
    pe: str
    de: str
    read_side: str  # PE_SIDE (path A) or DE_SIDE (path B)


class NoEngine(RuntimeError):
    """No live engine of a needed role."""


def _pick(engines: list[EngineLoad], role: str, key) -> EngineLoad:
    live = [e for e in engines if e.role == role]
    if not live:
        raise NoEngine(f"no live {role} engine")
    return min(live, key=lambda e: (key(e), e.name))


def choose(policy: str, req: RequestInfo, engines: list[EngineLoad]) -> Decision:
    pe = _pick(engines, "prefill", lambda e: e.queued_prefill_tokens)
    de = _pick(engines, "decode", lambda e: e.running_decode_tokens)
    if req.hit_blocks == 0 or policy == "pe-read":
        side = PE_SIDE
    elif policy == "de-read":
        side = DE_SIDE
    elif policy == "dualpath":
        # Shorter storage read queue reads; a tie goes to the PE (path A needs no compute-network hop).
        side = DE_SIDE if de.read_queue_bytes < pe.read_queue_bytes else PE_SIDE
    else:
        raise ValueError(f"unknown policy {policy!r}")
    return Decision(pe.name, de.name, side)
