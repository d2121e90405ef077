"""`dualpath bench roofline`: each step kind of the engines against what the GPU allows.

A step's floor is its roofline time, max(bytes it must move / HBM bandwidth, FLOPs it must do /
matmul throughput), with both limits measured in this run (a device-to-device copy and a large
bf16 GEMM), so the shares hold on whatever GPU runs it:

- **decode** (a grid of batch x context): the engine's step as the DE runs it (engine/graphs.py,
  CUDA graphs), bytes = every weight once + every sequence's KV of every layer. Share of HBM bandwidth.
- **fresh prefill** (sequences x tokens in one step): FLOPs = 2 x linear weights per token + causal
  attention. Share of matmul throughput.
- **append** (new tokens over a cached context): the PE's step over a long hit; time / roofline time.

A step is timed with CUDA events around the same call the engines make (best and median of a few).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

import torch

from dualpath.bench.common import write_json
from dualpath.engine import attention
from dualpath.engine.graphs import DecodeGraphs
from dualpath.engine.kvcache import KVPool
from dualpath.engine.architecture import ModelConfig
from dualpath.engine.model import Batch, Model
from dualpath.engine.weights import load_pretrained


@dataclass
class Limits:
    hbm_gbps: float  # device-to-device copy, bytes read + written per second / 1e9
    matmul_tflops: float  # bf16 GEMM 8192^3


@dataclass
class StepRow:
    preset: str
    kind: str  # decode | prefill | append
    batch: int
    new_tokens: int  # per sequence
    context: int  # per sequence, after the step
    ms: float  # median step time
    best_ms: float
    gbytes: float  # bytes the step must move
    tflop: float  # FLOPs the step must do
    roofline_ms: float
    hbm_share: float  # (bytes / bandwidth) / time
    matmul_share: float  # (FLOPs / throughput) / time
    of_roofline: float  # time / roofline time


def _events_ms(fn, repeat: int) -> list[float]:
    fn()  # warm-up: captures graphs, compiles kernels
    torch.cuda.synchronize()
    out = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return out


def measure_limits(device: torch.device) -> Limits:
    src = torch.empty(2 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = min(_events_ms(lambda: dst.copy_(src), 10))
    del src, dst
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    gemm_ms = statistics.median(_events_ms(lambda: a @ b, 10))
    return Limits(hbm_gbps=2 * (2 << 30) / copy_ms / 1e6, matmul_tflops=2 * 8192 ** 3 / gemm_ms / 1e9)


def weight_bytes(model: Model) -> int:
    """Bytes a step reads of the weights: every parameter once; the embedding only as the LM head."""
    embed = model.embed_tokens.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total if model.cfg.tie_embeddings else total - embed.numel() * embed.element_size()


def linear_params(model: Model) -> int:
    """Weights of the step's matrix products per token (MLA's absorbed kv_b_proj is used once per
    token in each of its two halves, as in the expanded form; of an MoE's routed experts, only the
    k a token is sent to)."""
    total = sum(m.weight.numel() for name, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and name != "lm_head" and ".experts." not in name)
    if model.cfg.moe is not None:
        per_expert = 3 * model.cfg.hidden_size * model.cfg.moe.moe_intermediate_size
        moe_layers = sum(model.cfg.is_moe_layer(l) for l in range(model.cfg.n_layers))
        total += moe_layers * model.cfg.moe.num_experts_per_tok * per_expert
    return total


def attention_flops(cfg: ModelConfig, cached: int, new: int) -> float:
    """Causal attention of `new` tokens over `cached + new` keys, every layer: 2 FLOPs a
    multiply-add, for q.k and for p.v of each (query, key, head)."""
    pairs = new * cached + new * (new + 1) / 2
    if cfg.attn == "gqa":
        return pairs * 2 * cfg.n_heads * cfg.head_dim * 2 * cfg.n_layers
    # MLA: the cheaper of its two forms (engine/model.py's MLAttention.expands). Absorbed:
    # q.[latent|rope] and p.latent; expanded: q.[k nope|rope] and p.v, after kv_b_proj expands
    # every context row once.
    absorbed = pairs * 2 * cfg.n_heads * (cfg.kv_width + cfg.kv_lora_rank)
    expanded = pairs * 2 * cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) \
        + (cached + new) * 2 * cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim) * cfg.kv_lora_rank
    return min(absorbed, expanded) * cfg.n_layers


def _row(preset, kind, batch, new, ctx, times, gbytes, tflop, lim: Limits) -> StepRow:
    ms = statistics.median(times)
    t_bytes, t_flops = gbytes / lim.hbm_gbps * 1e3, tflop / lim.matmul_tflops * 1e3
    roof = max(t_bytes, t_flops)
    return StepRow(preset, kind, batch, new, ctx, round(ms, 4), round(min(times), 4), round(gbytes, 4),
                   round(tflop, 5), round(roof, 4), round(t_bytes / ms, 3), round(t_flops / ms, 3),
                   round(ms / roof, 2))


def _pool(model: Model, seqs: int, tokens: int, block_tokens: int) -> tuple[KVPool, list[list[int]]]:
    per_seq = -(-(tokens + 1) // block_tokens)
    pool = KVPool(model.cfg, seqs * per_seq + 1, block_tokens, model.device, model.dtype)
    pool.kv.normal_(0, 0.5)
    return pool, [pool.allocator.alloc(per_seq) for _ in range(seqs)]


def decode_row(model: Model, preset: str, batch: int, context: int, block_tokens: int, lim: Limits,
               repeat: int) -> StepRow:
    pool, tables = _pool(model, batch, context, block_tokens)
    scratch = pool.allocator.alloc(1)[0]
    graphs = DecodeGraphs(model, pool.kv, block_tokens, scratch, capture=True)
    seqs = [(1, context - 1, t) for t in tables]
    times = _events_ms(lambda: graphs.run(seqs), repeat)
    kv_bytes = batch * context * model.cfg.kv_width * pool.kv.element_size() * model.cfg.n_layers
    flops = 2 * batch * (linear_params(model) + model.cfg.vocab_size * model.cfg.hidden_size) \
        + batch * attention_flops(model.cfg, context - 1, 1)
    del graphs, pool
    torch.cuda.empty_cache()
    return _row(preset, "decode", batch, 1, context, times, (weight_bytes(model) + kv_bytes) / 1e9, flops / 1e12,
                lim)


def prefill_row(model: Model, preset: str, batch: int, new: int, cached: int, block_tokens: int, lim: Limits,
                repeat: int) -> StepRow:
    """A PE step as engine/prefill.py runs it: embed, every layer over the pool, logits of each
    sequence's last token. `cached` tokens of each sequence are already in the pool."""
    pool, tables = _pool(model, batch, cached + new, block_tokens)
    ids = torch.randint(0, model.cfg.vocab_size, (batch * new,), device=model.device)
    last = torch.tensor([(i + 1) * new - 1 for i in range(batch)], device=model.device)

    def step():
        b = Batch.build([(t, cached, new) for t in tables], block_tokens, model.device)  # as the PE builds it
        h, cos_sin = model.embed(ids), model.rope_cos_sin(b)
        for l in range(model.cfg.n_layers):
            h = model.layer(l, h, b, pool.layer(l), cos_sin)
        return model.logits(h[last])

    times = _events_ms(step, repeat)
    kv_bytes = batch * (cached + new) * model.cfg.kv_width * pool.kv.element_size() * model.cfg.n_layers
    flops = 2 * batch * new * linear_params(model) + 2 * batch * model.cfg.vocab_size * model.cfg.hidden_size \
        + batch * attention_flops(model.cfg, cached, new)
    del pool
    torch.cuda.empty_cache()
    return _row(preset, "append" if cached else "prefill", batch, new, cached + new, times,
                (weight_bytes(model) + kv_bytes) / 1e9, flops / 1e12, lim)


DECODE_GRID = [(1, 2048), (1, 20480), (8, 20480), (48, 2048), (48, 20480)]
PREFILL = [(8, 1024, 0), (1, 512, 32768), (1, 8192, 0)]  # (sequences, new tokens each, cached each)


def run(presets: tuple[str, ...], out: str, block_tokens: int = 64, repeat: int = 10,
        decode_grid: list[tuple[int, int]] | None = None, prefill: list[tuple[int, int, int]] | None = None,
        paged: bool = True) -> dict:
    """paged=False times the torch attention path instead of engine/attention.py's kernel."""
    attention.ENABLED = paged
    device = torch.device("cuda")
    lim = measure_limits(device)
    print(f"limits: HBM {lim.hbm_gbps:.0f} GB/s (copy), bf16 matmul {lim.matmul_tflops:.0f} TFLOP/s (8192^3)")
    rows: list[StepRow] = []
    for preset in presets:
        model = load_pretrained(preset, device=device, dtype=torch.bfloat16)
        for batch, ctx in decode_grid or DECODE_GRID:
            rows.append(decode_row(model, preset, batch, ctx, block_tokens, lim, repeat))
            print(_fmt(rows[-1]), flush=True)
        for batch, new, cached in prefill or PREFILL:
            rows.append(prefill_row(model, preset, batch, new, cached, block_tokens, lim, repeat))
            print(_fmt(rows[-1]), flush=True)
        del model
        torch.cuda.empty_cache()
    result = {"bench": "roofline", "gpu": torch.cuda.get_device_name(device), "limits": asdict(lim), "paged": paged,
              "block_tokens": block_tokens, "rows": [asdict(r) for r in rows]}
    write_json(out, result)
    return result


def _fmt(r: StepRow) -> str:
    return (f"{r.preset:10s} {r.kind:8s} {r.batch:3d} x {r.new_tokens:5d} ctx {r.context:6d}: {r.ms:8.3f} ms "
            f"(roofline {r.roofline_ms:7.3f} ms, {r.gbytes:6.2f} GB {r.tflop:7.3f} TFLOP) "
            f"HBM {r.hbm_share:5.2f} matmul {r.matmul_share:5.2f} x{r.of_roofline:.1f}")
