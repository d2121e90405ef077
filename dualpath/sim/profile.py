"""How long an engine computes, for the simulator: measured, or a roofline from a model's shape.

Both answer the two questions the simulator asks:
- ``prefill_s(work)``: one prefill step over ``work``, a list of (new tokens, tokens before them);
- ``decode_step_s(batch, attended)``: one decode step of ``batch`` sequences that attend to
  ``attended`` stored tokens in all, where a sequence of n tokens attends to ``attended(n)``.

``GridProfile`` is one machine's measured grids (``python -m dualpath.sim.measure``, runs/sim/profiles/):
the DE's decode step over batch x context per sequence, the PE's step over new x cached tokens, each
interpolated piecewise linearly (held flat below the grid, extended along its last segment above it).
A prefill step of several jobs costs the step of all their new tokens over no context, plus each
job's extra for its cached context (the attention over it).

``ComputeProfile`` is a single `dualpath bench model` point (runs/cpu/bench_model_tiny_gqa.json,
runs/gpu/model_small_gqa.json): prefill time linear in the new tokens, a decode step at the measured
time up to the measured batch and linear past it, whatever the context.

``Roofline`` derives both from a ``ModelShape`` (the paper's three models are in ``SHAPES``) and a
``GpuSpec``: a step takes the longer of its FLOPs at a sustained fraction of peak and its HBM bytes
(weights read once per step, plus the KV it attends to) at a sustained fraction of bandwidth, plus a
fixed launch overhead. It is a bound, not a measurement: real kernels, expert imbalance and
communication make steps slower, and the sustained fractions below stand for all of that.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class Profile(Protocol):
    source: str

    def prefill_s(self, work: list[tuple[int, int]]) -> float: ...

    def decode_step_s(self, batch: int, attended: int) -> float: ...

    def attended(self, context: int) -> int: ...


@dataclass(frozen=True)
class ComputeProfile:
    prefill_tokens_per_s: float
    decode_step_seconds: float  # one step at decode_batch sequences
    decode_batch: int
    source: str = ""

    @staticmethod
    def from_bench(path: str | Path) -> "ComputeProfile":
        m = json.loads(Path(path).read_text())
        return ComputeProfile(m["prefill"]["tokens_per_s"], m["decode"]["step_seconds"], m["decode"]["batch"],
                              f"{path} ({m.get('preset')}, {m.get('device')}, {m.get('dtype')})")

    def prefill_s(self, work: list[tuple[int, int]]) -> float:
        return sum(new for new, _ in work) / self.prefill_tokens_per_s

    def decode_step_s(self, batch: int, attended: int) -> float:
        return self.decode_step_seconds * max(1.0, batch / self.decode_batch)

    def attended(self, context: int) -> int:
        return context


def _segment(xs: tuple[float, ...], x: float) -> tuple[int, float]:
    """The grid segment [i, i+1] x falls in and x's place along it: 0 below the grid (held flat),
    past 1 above it (extended along the last segment)."""
    if len(xs) == 1 or x <= xs[0]:
        return 0, 0.0
    i = min(bisect.bisect_right(xs, x), len(xs) - 1) - 1
    return i, (x - xs[i]) / (xs[i + 1] - xs[i])


@dataclass(frozen=True)
class Grid:
    """Seconds measured at every (x, y) of a grid; piecewise bilinear between the points."""
    xs: tuple[float, ...]
    ys: tuple[float, ...]
    seconds: tuple[tuple[float, ...], ...]  # seconds[i][j] at (xs[i], ys[j])

    @staticmethod
    def of(rows: list[dict], x: str, y: str) -> "Grid":
        xs, ys = sorted({r[x] for r in rows}), sorted({r[y] for r in rows})
        at = {(r[x], r[y]): r["seconds"] for r in rows}
        return Grid(tuple(xs), tuple(ys), tuple(tuple(at[(a, b)] for b in ys) for a in xs))

    def _along_y(self, i: int, y: float) -> float:
        row = self.seconds[i]
        if len(self.ys) == 1:
            return row[0]
        j, f = _segment(self.ys, y)
        return row[j] + f * (row[j + 1] - row[j])

    def at(self, x: float, y: float) -> float:
        if len(self.xs) == 1:
            return self._along_y(0, y)
        i, f = _segment(self.xs, x)
        lo, hi = self._along_y(i, y), self._along_y(i + 1, y)
        return max(0.0, lo + f * (hi - lo))


@dataclass(frozen=True)
class GridProfile:
    """One machine's measured step times (dualpath/sim/measure.py), interpolated."""
    decode: Grid  # x: sequences in the step, y: tokens each attends to
    prefill: Grid  # x: new tokens of one job, y: its cached tokens
    source: str = ""

    @staticmethod
    def from_file(path: str | Path, shared_cores: bool = False) -> "GridProfile":
        """shared_cores: the engines of a host outnumber its cores, so each computes on about one
        (the grids measured at one thread); else those measured at the threads an engine gets alone."""
        m = json.loads(Path(path).read_text())
        threads = "1" if shared_cores else str(m["threads_alone"])
        g = m["grids"][threads]
        return GridProfile(Grid.of(g["decode"], "batch", "context"), Grid.of(g["prefill"], "new", "cached"),
                           f"{path} ({m['preset']}, {m['device']}, {m['dtype']}, {threads} thread(s))")

    def prefill_s(self, work: list[tuple[int, int]]) -> float:
        p = self.prefill
        together = p.at(sum(new for new, _ in work), 0)
        return together + sum(p.at(new, ctx) - p.at(new, 0) for new, ctx in work if ctx)

    def decode_step_s(self, batch: int, attended: int) -> float:
        return self.decode.at(batch, attended / batch) if batch else 0.0

    def attended(self, context: int) -> int:
        return context


@dataclass(frozen=True)
class HostCosts:
    """Seconds a live cluster's engines pay beyond their model steps (all 0: the steps alone, as
    before), as the simulator charges them; measured by ``python -m dualpath.sim.measure --host``."""
    request_s: float = 0.0
    step_s: float = 0.0
    seq_s: float = 0.0
    block_s: float = 0.0

    def decode_extra_s(self, batch: int) -> float:
        return self.step_s + self.seq_s * batch


def host_costs(path: str | Path) -> HostCosts:
    """The host costs a profile file holds (`python -m dualpath.sim.measure --host`); none (all 0) if it has none."""
    m = json.loads(Path(path).read_text())
    return HostCosts(**m["host_costs"]["costs"]) if "host_costs" in m else HostCosts()


def load_profile(path: str | Path, shared_cores: bool = False) -> "GridProfile | ComputeProfile":
    """A measured profile: grids (`python -m dualpath.sim.measure`) or one `bench model` point."""
    if json.loads(Path(path).read_text()).get("bench") == "sim-profile":
        return GridProfile.from_file(path, shared_cores)
    return ComputeProfile.from_bench(path)


@dataclass(frozen=True)
class ModelShape:
    """What the simulator needs of a model: its KV bytes per token and its work per token."""

    name: str
    n_layers: int
    params_total: float  # every weight (all experts)
    params_active: float  # weights one token passes through
    kv_per_token_layer: int  # KV elements one token stores per layer (GQA: 2 * kv_heads * head_dim; MLA: latent + rope)
    attn_flops_per_pair: int  # FLOPs per (query token, attended token) per layer: scores and values
    attn_window: int = 0  # sparse attention: a query attends to at most this many tokens (0: all)
    kv_bytes_per_elem: int = 2  # bf16 KV
    weight_bytes_per_param: float = 2.0
    note: str = ""

    @property
    def kv_bytes_per_token(self) -> int:
        return self.n_layers * self.kv_per_token_layer * self.kv_bytes_per_elem

    def attended(self, context: int) -> int:
        return min(context, self.attn_window) if self.attn_window else context


def _mla(heads: int, nope: int = 128, rope: int = 64, v: int = 128) -> int:
    return 2 * heads * (nope + rope + v)  # non-absorbed prefill attention: q.k over nope+rope dims, p.v


# The paper's three models. Shapes are from the public model configurations; the 660B's attention
# window stands for DeepSeek-V3.2's sparse attention (each query attends to its top 2,048 tokens),
# which is what makes its cache-compute ratio as high as the paper says (22 GB per PFLOP).
SHAPES: dict[str, ModelShape] = {s.name: s for s in (
    ModelShape("deepseek-660b", n_layers=61, params_total=671e9, params_active=37e9, kv_per_token_layer=512 + 64,
               attn_flops_per_pair=_mla(128), attn_window=2048, weight_bytes_per_param=1.0,
               note="DeepSeek-V3.2 shape: MLA (512 + 64 latent), 37B of 671B active, FP8 weights, "
                    "top-2K sparse attention"),
    ModelShape("deepseek-27b", n_layers=30, params_total=27e9, params_active=4.1e9, kv_per_token_layer=512 + 64,
               attn_flops_per_pair=_mla(20), weight_bytes_per_param=2.0,
               note="DeepSeekMoE 27B (DeepSeek-VL2's language model): MLA, 4.1B of 27B active, bf16"),
    ModelShape("qwen2.5-32b", n_layers=64, params_total=32.5e9, params_active=32.5e9,
               kv_per_token_layer=2 * 8 * 128, attn_flops_per_pair=2 * 40 * (128 + 128), weight_bytes_per_param=2.0,
               note="Qwen2.5-32B: GQA with 40 query and 8 KV heads of 128, dense, bf16"),
)}


@dataclass(frozen=True)
class GpuSpec:
    name: str = "H800-class Hopper"
    peak_flops: float = 989e12  # dense bf16
    hbm_Bps: float = 3.35e12
    hbm_bytes: float = 80e9
    mfu: float = 0.45  # sustained fraction of peak in a prefill or decode step
    mbu: float = 0.7  # sustained fraction of HBM bandwidth
    step_overhead_s: float = 0.002  # launches and synchronisation per step

    @staticmethod
    def named(name: str) -> "GpuSpec":
        return {"h800": GpuSpec(), "h200": GpuSpec("H200", hbm_Bps=4.8e12, hbm_bytes=141e9)}[name]


@dataclass(frozen=True)
class Roofline:
    shape: ModelShape
    gpu: GpuSpec
    gpus: int  # GPUs per engine (tensor or expert parallel: their FLOPs and bandwidth add up)

    @property
    def source(self) -> str:
        return f"roofline: {self.shape.name} on {self.gpus} x {self.gpu.name}"

    @property
    def weight_bytes(self) -> float:
        return self.shape.params_total * self.shape.weight_bytes_per_param

    @property
    def kv_hbm_bytes(self) -> float:
        """HBM left for KV on one engine once the weights are in (a tenth kept for activations)."""
        return max(0.0, 0.9 * self.gpus * self.gpu.hbm_bytes - self.weight_bytes)

    def _step(self, flops: float, hbm_bytes: float) -> float:
        g = self.gpu
        return max(flops / (self.gpus * g.peak_flops * g.mfu), hbm_bytes / (self.gpus * g.hbm_Bps * g.mbu)) \
            + g.step_overhead_s

    def _weights_read(self, tokens: int) -> float:
        """An MoE step touches about active params per token, until every expert is in use."""
        s = self.shape
        return min(s.params_total, s.params_active * tokens) * s.weight_bytes_per_param

    def prefill_s(self, work: list[tuple[int, int]]) -> float:
        s, tokens = self.shape, sum(new for new, _ in work)
        pairs = sum(new * s.attended(ctx + new // 2) for new, ctx in work)  # each new token attends to those before it
        flops = 2 * s.params_active * tokens + s.n_layers * s.attn_flops_per_pair * pairs
        kv = sum(s.attended(ctx + new) for new, ctx in work) * s.kv_bytes_per_token
        return self._step(flops, self._weights_read(tokens) + kv)

    def attended(self, context: int) -> int:
        return self.shape.attended(context)

    def decode_step_s(self, batch: int, attended: int) -> float:
        s = self.shape
        flops = 2 * s.params_active * batch + s.n_layers * s.attn_flops_per_pair * attended
        return self._step(flops, self._weights_read(batch) + attended * s.kv_bytes_per_token)
