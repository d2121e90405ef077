"""How long an engine computes, for the simulator: from a `dualpath bench model` measurement.

A profile is the prefill rate (tokens/s) and the decode step time at a batch size, as that bench
writes them (runs/cpu/bench_model_tiny_gqa.json, runs/gpu/model_small_gqa.json). Prefill time is
linear in the new tokens; a decode step costs the measured step time up to the measured batch and
grows linearly past it (the step is bound by fixed costs below that batch, by work above it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ComputeProfile:
    prefill_tokens_per_s: float
    decode_step_s: float  # one step at decode_batch sequences
    decode_batch: int
    source: str = ""

    @staticmethod
    def from_bench(path: str | Path) -> "ComputeProfile":
        m = json.loads(Path(path).read_text())
        return ComputeProfile(m["prefill"]["tokens_per_s"], m["decode"]["step_seconds"], m["decode"]["batch"],
                              f"{path} ({m.get('preset')}, {m.get('device')}, {m.get('dtype')})")

    def prefill_s(self, new_tokens: int) -> float:
        return new_tokens / self.prefill_tokens_per_s

    def decode_step(self, batch: int) -> float:
        return self.decode_step_s * max(1.0, batch / self.decode_batch)
