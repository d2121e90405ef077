"""A compact decoder with two attention kinds, run layer by layer over a paged KV pool.

- GQA (Qwen2, Qwen3, Llama): q/k/v projections (with bias for Qwen2), fewer KV heads than query
  heads; Qwen3 normalises each query and key head (RMSNorm over head_dim) before RoPE.
  Cache per token per layer: K and V of the KV heads, ``2 * n_kv_heads * head_dim`` values.
- MLA (DeepSeek-V2/V3-style): optional low-rank q, a compressed KV latent ``c`` (``kv_lora_rank``)
  and one decoupled RoPE key shared by all heads (``qk_rope_head_dim``).
  Cache per token per layer: ``kv_lora_rank + qk_rope_head_dim`` values; no per-head K/V.

Two ways to run it:

- ``forward_reference(tokens)``: a plain forward without any cache, written in the textbook
  ("naive") form. It is the oracle of every correctness test in the project.
- ``embed`` → ``layer(l, h, batch, kv)`` for each layer → ``logits``: the serving path. New tokens of
  several sequences are flattened into one batch; each layer first writes their KV into the paged
  pool, then attends over everything the sequence holds in the pool (cached blocks included). An
  engine can therefore wait for layer *l*'s cached KV to arrive before it calls layer *l*.
  MLA uses the absorbed form here (``W_UK`` folded into the query, ``W_UV`` applied after the
  latent attention), so the latent is attended directly. On a GPU (``use_triton``) a layer
  attends with engine/attention.py's kernel over the pool in place and runs its norms, RoPE + KV
  write and SwiGLU as engine/fused.py's kernels; the torch code below is the CPU's path.

MLP: dense SwiGLU, or DeepSeek's mixture of experts (``MoE``: shared experts plus top-k routed
experts chosen by a ``Gate``, DeepSeek-V2's softmax or V3's sigmoid routing, group-limited) in the
layers ``ModelConfig.moe`` names. ``Gate`` and ``MoE`` are written to be read beside DeepSeek-V3's
``inference/model.py``; both paths above use them.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dualpath.engine import attention, fused
from dualpath.engine.architecture import ModelConfig, RopeScaling
from dualpath.engine.attention import KVLayout, PagedMeta



MASK_MAX_ELEMENTS = 1 << 22  # above this an explicit [n, ctx] mask costs more memory than it saves time
FLASH_DTYPES = (torch.float16, torch.bfloat16)
# MLA's prefill form on the GPU: "auto" takes whichever costs fewer FLOPs (MLAttention.expands);
# tests force one. The expanded copy of a step's context is capped at MLA_EXPAND_BYTES.
MLA_PREFILL_FORM = "auto"  # "auto" | "expanded" | "absorbed"
MLA_EXPAND_BYTES = 1 << 30

# cuDNN's attention (which SDPA prefers for a boolean mask on Hopper) compiles a kernel for each new
# shape, 0.5-1.3 s each on an H200, and every agent's turn has a new context length. The kernels
# used instead (flash, memory-efficient, math) are precompiled.
torch.backends.cuda.enable_cudnn_sdp(False)


def use_triton(x: torch.Tensor) -> bool:
    """Run the GPU's kernels (engine/attention.py's paged attention, engine/fused.py's norms and
    RoPE): on a GPU where Triton runs, unless turned off (``attention.ENABLED = False``: the GPU
    tests compare them with the torch path, which a CPU always takes)."""
    return (x.is_cuda or attention.INTERPRETED) and attention.triton is not None and attention.ENABLED


@functools.lru_cache(maxsize=None)
def flash_available(device: torch.device) -> bool:
    """The flash kernel runs here: a CUDA build that has it, on an Ampere or newer GPU."""
    return (device.type == "cuda" and torch.backends.cuda.is_flash_attention_available()
            and torch.cuda.get_device_capability(device) >= (8, 0))


@dataclass
class Packed:
    """A prefill step's sequences packed end to end for one flash-attention call per layer (GQA,
    half precision, CUDA, where the Triton kernels are off or missing; engine/attention.py needs no
    gather): each sequence's context gathered from the pool in order, and where each
    sequence's new tokens and context start. One call attends every sequence, whatever the lengths,
    with no padding and no mask tensor (causal, aligned to the lower right).

    key_slots: LongTensor[sum of contexts], the pool slot of every context token, sequence by sequence.
    cu_q, cu_k: IntTensor[B + 1], where each sequence's new tokens / context tokens start.
    """

    key_slots: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int

    @staticmethod
    def build(seqs: list[tuple[list[int], int, int]], block_tokens: int, device: torch.device) -> "Packed":
        """For (block_table, cached, new) sequences."""
        offsets = torch.arange(block_tokens)
        slots = [(torch.tensor(t, dtype=torch.long).unsqueeze(1) * block_tokens + offsets).flatten()[: c + n]
                 for t, c, n in seqs]
        new, ctx = [n for _, _, n in seqs], [c + n for _, c, n in seqs]

        def starts(lengths: list[int]) -> torch.Tensor:
            return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)

        return Packed(torch.cat(slots).to(device), starts(new), starts(ctx), max(new), max(ctx))


@dataclass
class Batch:
    """New tokens of several sequences, flattened (N = total new tokens).

    positions: LongTensor[N], absolute position of each new token.
    slots: LongTensor[N], flat pool slot (block_id * block_tokens + offset) where its KV goes.
    ctx_lens: tokens each sequence holds after this step (cached + new).
    new_lens: new tokens of each sequence in this step.
    block_tables: LongTensor[n_blocks] per sequence, covering ctx_lens tokens.
    padded_tables, lens: a decode batch may give its block tables already padded, LongTensor[B, max_blocks],
        and its context lengths as LongTensor[B] instead (the CUDA-graph decode, engine/graphs.py:
        every tensor of a captured step is a fixed buffer, nothing is built from Python lists).
    """

    positions: torch.Tensor
    slots: torch.Tensor
    ctx_lens: list[int]
    new_lens: list[int]
    block_tables: list[torch.Tensor]
    padded_tables: torch.Tensor | None = None
    lens: torch.Tensor | None = None
    seqs: list[tuple[list[int], int, int]] = field(default_factory=list)  # as given to build
    block_tokens: int = 0
    _metas: dict[tuple[str, int], PagedMeta] = field(default_factory=dict, repr=False)

    @staticmethod
    def build(seqs: list[tuple[list[int], int, int]], block_tokens: int, device: torch.device | str) -> "Batch":
        """seqs: (block_table, cached_tokens, new_tokens) for each sequence. Positions and slots are
        computed with numpy (a prefill step has thousands of tokens) and go to the device in one
        copy; block tables stay on the host (the kernels read PagedMeta's, the torch path indexes
        with them)."""
        pos = np.concatenate([np.arange(c, c + n) for _, c, n in seqs])
        blocks = np.concatenate([np.asarray(t, dtype=np.int64)[np.arange(c, c + n) // block_tokens]
                                 for t, c, n in seqs])
        both = torch.from_numpy(np.stack([pos, blocks * block_tokens + pos % block_tokens])).to(device)
        return Batch(
            positions=both[0],
            slots=both[1],
            ctx_lens=[c + n for _, c, n in seqs],
            new_lens=[n for _, _, n in seqs],
            block_tables=[torch.tensor(t, dtype=torch.long) for t, _, _ in seqs],
            seqs=seqs, block_tokens=block_tokens,
        )

    @functools.cached_property
    def packed(self) -> Packed | None:
        """The step packed for one flash-attention call per layer, made when an attention first
        asks (GQA in half precision on a GPU with flash); None for a decode step."""
        if self.is_decode or not self.seqs:
            return None
        return Packed.build(self.seqs, self.block_tokens, self.positions.device)

    def paged_meta(self, block_q: int, block_tokens: int) -> PagedMeta:
        """The step as the paged kernel reads it (engine/attention.py), made when the first layer
        asks and kept for the others; a padded decode step reads its fixed buffers in place."""
        meta = self._metas.get(("pool", block_q))
        if meta is None:
            if self.padded_tables is not None:
                meta = PagedMeta.for_decode(self.padded_tables, self.lens, block_tokens)
            else:
                meta = PagedMeta.for_steps(self.seqs, block_tokens, self.positions.device, block_q)
            self._metas[("pool", block_q)] = meta
        return meta

    @functools.cached_property
    def context_block_counts(self) -> list[int]:
        """Pool blocks each sequence's context (cached + new) takes."""
        return [-(-ctx // self.block_tokens) for ctx in self.ctx_lens]

    @functools.cached_property
    def context_blocks(self) -> torch.Tensor:
        """Every pool block the step's sequences read, sequence after sequence (LongTensor on the
        device): MLA's expanded prefill copies these rows out of the pool, in this order."""
        ids = [b for (t, _, _), nb in zip(self.seqs, self.context_block_counts) for b in t[:nb]]
        return torch.tensor(ids, dtype=torch.long).to(self.positions.device, non_blocking=True)

    def context_meta(self, block_q: int) -> PagedMeta:
        """The step as the kernel reads it from the copy of ``context_blocks``: the same sequences,
        their tables renumbered into the copy."""
        meta = self._metas.get(("copy", block_q))
        if meta is None:
            seqs, start = [], 0
            for (_, c, n), nb in zip(self.seqs, self.context_block_counts):
                seqs.append((list(range(start, start + nb)), c, n))
                start += nb
            meta = self._metas[("copy", block_q)] = PagedMeta.for_steps(seqs, self.block_tokens,
                                                                        self.positions.device, block_q)
        return meta

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.new_lens)

    @property
    def padded(self) -> bool:
        """The torch path attends over padded block tables: a step whose tables came padded
        (engine/graphs.py's), or a decode step of several sequences on a GPU without the Triton
        kernels (one batched call instead of one per sequence).
        A CPU attends one sequence at a time: gathering every sequence's KV into one padded tensor
        cost tiny-gqa 28 ms a step against 22 ms for 24 sequences of 3.5K tokens."""
        return self.padded_tables is not None or (self.is_decode and len(self.new_lens) > 1
                                                  and self.positions.is_cuda)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalised in fp32 (as the Qwen2 / DeepSeek reference code does), then back to x's dtype
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


class Rotary(nn.Module):
    """RoPE in the rotate-half form. DeepSeek's interleaved pairs (x0,x1),(x2,x3).. are first
    de-interleaved; q and k get the same permutation, so every q·k dot product is unchanged.
    A scaling (``RopeScaling``) changes the frequencies and multiplies the cos/sin tables."""

    def __init__(self, dim: int, theta: float, max_position: int, interleave: bool,
                 scaling: RopeScaling | None = None):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        if scaling is not None:
            inv_freq = scaling.inv_freq(inv_freq, dim, theta)
        t = torch.arange(max_position, dtype=torch.float64)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        m = scaling.cos_sin_factor if scaling is not None else 1.0
        self.register_buffer("cos", (emb.cos() * m).float(), persistent=False)
        self.register_buffer("sin", (emb.sin() * m).float(), persistent=False)
        self.interleave = interleave

    @staticmethod
    def of(cfg: ModelConfig) -> "Rotary":
        """The model's rotary (fp32 tables whatever the weights' dtype)."""
        return Rotary(cfg.rope_dim, cfg.rope_theta, cfg.max_position, cfg.rope_interleave, cfg.rope_scaling)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at the positions, [N, 1, dim] each: made once per step, used by every layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: [N, heads, dim], cos_sin: from ``cos_sin`` for the N positions."""
        if self.interleave:
            x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
        cos, sin = cos_sin
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _causal_mask(n_new: int, ctx: int, device: torch.device) -> torch.Tensor:
    """[n_new, ctx] bool: new token i (at position ctx - n_new + i) sees keys 0..its position."""
    q_pos = torch.arange(ctx - n_new, ctx, device=device).unsqueeze(1)
    return torch.arange(ctx, device=device).unsqueeze(0) <= q_pos




@functools.lru_cache(maxsize=64)
def _lower_right_mask(n: int, ctx: int, device: torch.device) -> torch.Tensor:
    return _causal_mask(n, ctx, device)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Prefill attention of n new queries [n, H, d] over ctx keys/values [ctx, G, d] (G divides H),
    the new tokens being the last n of the context: causal, aligned to the lower right (query i sees
    keys up to ctx - n + i). One call per sequence: the CPU's path, and the GPU's for fp32 and MLA
    (``_attend_packed`` is the GPU's for GQA). The mask takes the cheapest form that SDPA's fused
    kernels accept: none for one query (it sees every key), is_causal when n == ctx, a cached boolean
    [n, ctx] mask for short appends (a CausalBias is decided in Python on every call), and a
    CausalBias for long ones (no [n, ctx] tensor at all)."""
    n, ctx = len(q), len(k)
    q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, heads, len, d]: fused kernels want 4-D
    mask, causal = None, n == ctx and n > 1
    if 1 < n < ctx:
        if n * ctx <= MASK_MAX_ELEMENTS:
            mask = _lower_right_mask(n, ctx, q.device)
        else:  # imported here: torch.nn.attention.bias imports torch._dynamo, 1.2 s of every engine's start
            from torch.nn.attention.bias import causal_lower_right
            mask = causal_lower_right(n, ctx)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out[0].transpose(0, 1)


def _attend_packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Packed, scale: float) -> torch.Tensor:
    """``_attend`` for every sequence of a step in one call: q [new tokens, H, d] and k, v
    [context tokens, G, d], packed as ``p`` says. This is the flash kernel's variable-length entry
    (``torch.nn.attention.varlen`` wraps it from torch 2.10 on, but its signature still changes
    between releases). It takes grouped heads as they are, and aligns the causal mask of a sequence
    with fewer queries than keys to the lower right."""
    return torch.ops.aten._flash_attention_forward(q, k, v, p.cu_q, p.cu_k, p.max_q, p.max_k, 0.0, True, False,
                                                   scale=scale)[0]


def _gather(kv_layer: torch.Tensor, table: torch.Tensor, ctx: int) -> torch.Tensor:
    """kv_layer: [n_blocks, block_tokens, W] -> this sequence's first ctx tokens, [ctx, W]."""
    return kv_layer[table].flatten(0, 1)[:ctx]


def _gather_padded(kv_layer: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """All sequences' KV padded to the longest: ([B, Lmax, W], valid mask [B, Lmax])."""
    bt = kv_layer.shape[1]
    if batch.padded_tables is not None:
        padded, lens = batch.padded_tables, batch.lens
    else:
        padded = torch.zeros(len(batch.block_tables), max(len(t) for t in batch.block_tables), dtype=torch.long,
                             device=kv_layer.device)
        for i, t in enumerate(batch.block_tables):
            padded[i, : len(t)] = t
        lens = torch.tensor(batch.ctx_lens, device=kv_layer.device)
    n_blocks = padded.shape[1]
    kv = kv_layer[padded].flatten(1, 2)  # [B, n_blocks * bt, W]
    valid = torch.arange(n_blocks * bt, device=kv_layer.device).unsqueeze(0) < lens.unsqueeze(1)
    return kv, valid


class GQAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.n_heads * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, cfg.n_kv_heads * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, cfg.n_kv_heads * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * d, h, bias=cfg.o_bias)
        if cfg.qk_norm:  # Qwen3: each head of q and k normalised over head_dim, before RoPE
            self.q_norm = RMSNorm(d, cfg.rms_eps)
            self.k_norm = RMSNorm(d, cfg.rms_eps)
        self._joint: tuple[torch.Tensor, torch.Tensor | None] | None = None  # q|k|v weight, bias (GPU path)

    def _qkv_joint(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [N, H, d], k [N, G, d], v [N, G d] from one GEMM (views of its output)."""
        c = self.cfg
        if self._joint is None:
            self._joint = fused.concat_linears(self.q_proj, self.k_proj, self.v_proj)
        qkv = F.linear(x, *self._joint)
        q, k, v = qkv.split([c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim], -1)
        return q.view(-1, c.n_heads, c.head_dim), k.view(-1, c.n_kv_heads, c.head_dim), v

    def _qkv(self, x: torch.Tensor, rope: Rotary, cos_sin):
        c = self.cfg
        q = self.q_proj(x).view(-1, c.n_heads, c.head_dim)
        k = self.k_proj(x).view(-1, c.n_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        v = self.v_proj(x).view(-1, c.n_kv_heads, c.head_dim)
        return rope(q, cos_sin), rope(k, cos_sin), v

    def _fused_head_norm(self, heads: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """``norm`` of every head of heads [N, H, d] (a strided view of the joint GEMM's output) in one
        launch over its N * H rows (copied contiguous first: the kernel reads rows of one stride)."""
        out, _ = fused.add_rms_norm(heads.reshape(-1, heads.shape[-1]), norm.weight, self.cfg.rms_eps)
        return out.view(heads.shape)

    def forward_reference(self, x: torch.Tensor, positions: torch.Tensor, rope: Rotary) -> torch.Tensor:
        c = self.cfg
        q, k, v = self._qkv(x, rope, rope.cos_sin(positions, x.dtype))
        rep = c.n_heads // c.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * c.scale
        scores = scores.masked_fill(~_causal_mask(len(x), len(x), x.device), float("-inf"))
        out = torch.einsum("hqk,khd->qhd", scores.softmax(-1, dtype=torch.float32).to(v.dtype), v)
        return self.o_proj(out.reshape(len(x), -1))

    def forward(self, x: torch.Tensor, batch: Batch, kv_layer: torch.Tensor, rope: Rotary, cos_sin) -> torch.Tensor:
        """x: [N, hidden]; kv_layer: [n_blocks, block_tokens, 2 * n_kv * head_dim] (K then V)."""
        c = self.cfg
        if use_triton(x):  # q, k, v in one GEMM; RoPE and the KV write in one launch; attention in place
            q, k, v = self._qkv_joint(x)
            if c.qk_norm:
                q, k = self._fused_head_norm(q, self.q_norm), self._fused_head_norm(k, self.k_norm)
            q = fused.rope_and_cache(q, 0, k, v, kv_layer, batch.slots, cos_sin, k_dst=0,
                                     copy_dst=c.n_kv_heads * c.head_dim, interleave=rope.interleave)
            layout = KVLayout.gqa(c.n_kv_heads, c.head_dim)
            meta = batch.paged_meta(attention.prefill_block_q(layout, c.n_heads), kv_layer.shape[1])
            out = attention.paged_attention(q, kv_layer, layout, meta, c.scale)
            return self.o_proj(out.reshape(len(x), -1))
        q, k, v = self._qkv(x, rope, cos_sin)
        kv_layer.view(-1, c.kv_width)[batch.slots] = torch.cat([k.flatten(1), v.flatten(1)], -1).to(kv_layer.dtype)
        rep = c.n_heads // c.n_kv_heads
        if batch.padded:
            kv, valid = _gather_padded(kv_layer, batch)  # [B, L, W]
            kk, vv = kv.to(q.dtype).view(*kv.shape[:2], 2, c.n_kv_heads, c.head_dim).unbind(2)
            qq = q.view(-1, c.n_kv_heads, rep, c.head_dim)  # [B, kvh, rep, d]
            scores = torch.einsum("bgrd,blgd->bgrl", qq, kk) * c.scale
            scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
            out = torch.einsum("bgrl,blgd->bgrd", scores.softmax(-1, dtype=torch.float32).to(q.dtype), vv)
            return self.o_proj(out.reshape(len(x), -1))
        if q.dtype in FLASH_DTYPES and c.head_dim <= 256 and flash_available(q.device) and batch.packed is not None:
            p = batch.packed
            kv = kv_layer.view(-1, c.kv_width)[p.key_slots].to(q.dtype).view(-1, 2, c.n_kv_heads, c.head_dim)
            return self.o_proj(_attend_packed(q, kv[:, 0], kv[:, 1], p, c.scale).reshape(len(x), -1))
        outs, start = [], 0
        for table, ctx, n in zip(batch.block_tables, batch.ctx_lens, batch.new_lens):
            kv = _gather(kv_layer, table, ctx).to(q.dtype).view(ctx, 2, c.n_kv_heads, c.head_dim)
            outs.append(_attend(q[start : start + n], kv[:, 0], kv[:, 1], c.scale))
            start += n
        return self.o_proj(torch.cat(outs).reshape(len(x), -1))


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, H = cfg.hidden_size, cfg.n_heads
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(h, H * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, h, bias=False)
        self._kv_b_split: torch.Tensor | None = None  # kv_b_proj's rows regrouped (the expanded form)

    def _q_unrotated(self, x: torch.Tensor) -> torch.Tensor:
        """[N, H, nope + rope] before RoPE."""
        c = self.cfg
        q = self.q_proj(x) if c.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.view(len(x), c.n_heads, -1)

    def _q(self, x: torch.Tensor, rope: Rotary, cos_sin):
        c = self.cfg
        q_nope, q_pe = self._q_unrotated(x).split([c.qk_nope_head_dim, c.qk_rope_head_dim], -1)
        return q_nope, rope(q_pe, cos_sin)

    def _latent(self, x: torch.Tensor, rope: Rotary, cos_sin):
        """-> (c_kv [N, kv_lora_rank] normalised latent, k_pe [N, rope_dim] rotated shared key)."""
        c = self.cfg
        ckv, k_pe = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, c.qk_rope_head_dim], -1)
        return self.kv_a_layernorm(ckv), rope(k_pe.unsqueeze(1), cos_sin).squeeze(1)

    def forward_reference(self, x: torch.Tensor, positions: torch.Tensor, rope: Rotary) -> torch.Tensor:
        """Naive form: expand the latent into per-head K and V, then ordinary attention."""
        c = self.cfg
        cos_sin = rope.cos_sin(positions, x.dtype)
        q_nope, q_pe = self._q(x, rope, cos_sin)
        ckv, k_pe = self._latent(x, rope, cos_sin)
        kv = self.kv_b_proj(ckv).view(len(x), c.n_heads, -1)
        k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], -1)
        q = torch.cat([q_nope, q_pe], -1)
        k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(-1, c.n_heads, -1)], -1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * c.scale
        scores = scores.masked_fill(~_causal_mask(len(x), len(x), x.device), float("-inf"))
        out = torch.einsum("hqk,khd->qhd", scores.softmax(-1, dtype=torch.float32).to(v.dtype), v)
        return self.o_proj(out.reshape(len(x), -1))

    def expands(self, batch: Batch) -> bool:
        """Attend a prefill step in the expanded form: when it costs fewer FLOPs than the absorbed one
        and its copy fits MLA_EXPAND_BYTES. Per (query, key, head) the absorbed form does
        2 (r + rope) + 2 r FLOPs and the expanded 2 (nope + rope) + 2 v; expanding costs
        2 H (nope + v) r per context key, paid once for all of the step's queries (a decode step's
        one query never repays it: DeepSeek's FlashMLA decodes absorbed, vLLM and SGLang prefill expanded)."""
        if batch.is_decode or not batch.seqs:
            return False
        if MLA_PREFILL_FORM != "auto":
            return MLA_PREFILL_FORM == "expanded"
        c = self.cfg
        keys = sum(batch.context_block_counts) * batch.block_tokens  # rows the copy holds
        if keys * self.expanded_width * 2 > MLA_EXPAND_BYTES:
            return False
        pairs = sum(n * (ctx - n) + n * (n + 1) / 2 for n, ctx in zip(batch.new_lens, batch.ctx_lens))
        absorbed = pairs * 2 * (c.kv_width + c.kv_lora_rank)
        expanded = pairs * 2 * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) \
            + keys * 2 * (c.qk_nope_head_dim + c.v_head_dim) * c.kv_lora_rank
        return expanded < absorbed

    @property
    def expanded_width(self) -> int:
        """A context row in the expanded form: [K nope of every head | V of every head | shared rope key]."""
        c = self.cfg
        return c.n_heads * (c.qk_nope_head_dim + c.v_head_dim) + c.qk_rope_head_dim

    def _attend_expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_layer: torch.Tensor,
                         batch: Batch) -> torch.Tensor:
        """Multi-head attention over an expanded copy of the step's context: q_nope [N, H, nope] and
        q_pe [N, H, rope] (rotated) -> out [N, H, v].

        The context's latent rows go through kv_b_proj once (one GEMM, whose output lands in the
        copy's K and V columns), the rotated rope key is copied beside them, and the paged kernel reads
        the copy as a pool of H KV heads whose key has a second part shared by all heads."""
        c = self.cfg
        H, nope, v, r = c.n_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank
        if self._kv_b_split is None:  # kv_b_proj's rows as [K nope of every head | V of every head]
            w = self.kv_b_proj.weight.view(H, nope + v, r)
            self._kv_b_split = torch.cat([w[:, :nope].reshape(H * nope, r), w[:, nope:].reshape(H * v, r)])
        rows = kv_layer[batch.context_blocks]  # [blocks, BT, r + rope]
        copy = torch.empty(*rows.shape[:2], self.expanded_width, dtype=rows.dtype, device=rows.device)
        flat = copy.view(-1, self.expanded_width)
        torch.mm(rows.view(-1, rows.shape[-1])[:, :r], self._kv_b_split.t(), out=flat[:, : H * (nope + v)])
        flat[:, H * (nope + v) :] = rows.view(-1, rows.shape[-1])[:, r:]
        layout = KVLayout(n_kv_heads=H, dk1=nope, dk2=c.qk_rope_head_dim, dv=v, k2_off=H * (nope + v), v_off=H * nope)
        meta = batch.context_meta(attention.prefill_block_q(layout, H))
        return attention.paged_attention(torch.cat([q_nope, q_pe], -1), copy, layout, meta, c.scale)

    def forward(self, x: torch.Tensor, batch: Batch, kv_layer: torch.Tensor, rope: Rotary, cos_sin) -> torch.Tensor:
        """Absorbed form; on the GPU a prefill that ``expands`` takes ``_attend_expanded``.
        kv_layer: [n_blocks, block_tokens, kv_lora_rank + rope_dim].

        score_h(t) = (q_nope_h W_UK_h) · c_t + q_pe_h · k_pe_t;  out_h = (Σ_t p_h(t) c_t) W_UV_h
        """
        c = self.cfg
        w = self.kv_b_proj.weight.view(c.n_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        w_uk, w_uv = w[:, : c.qk_nope_head_dim], w[:, c.qk_nope_head_dim :]  # [H, nope, r], [H, v, r]
        if use_triton(x):  # the latent's norm, RoPE and the KV write in two launches; attention in place
            q = self._q_unrotated(x)
            ckv, k_pe = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, c.qk_rope_head_dim], -1)
            ckv, _ = fused.add_rms_norm(ckv, self.kv_a_layernorm.weight, c.rms_eps)
            q_pe = fused.rope_and_cache(q, c.qk_nope_head_dim, k_pe.unsqueeze(1), ckv, kv_layer, batch.slots, cos_sin,
                                        k_dst=c.kv_lora_rank, copy_dst=0, interleave=rope.interleave)
            if self.expands(batch):
                out = self._attend_expanded(q[..., : c.qk_nope_head_dim], q_pe, kv_layer, batch)
                return self.o_proj(out.reshape(len(x), -1))
            q_lat = torch.einsum("nhd,hdr->nhr", q[..., : c.qk_nope_head_dim], w_uk)  # [N, H, r]
            layout = KVLayout.mla(c.kv_lora_rank, c.qk_rope_head_dim)
            meta = batch.paged_meta(attention.prefill_block_q(layout, c.n_heads), kv_layer.shape[1])
            o_lat = attention.paged_attention(torch.cat([q_lat, q_pe], -1), kv_layer, layout, meta, c.scale)
            return self.o_proj(torch.einsum("nhr,hvr->nhv", o_lat, w_uv).reshape(len(x), -1))
        q_nope, q_pe = self._q(x, rope, cos_sin)
        ckv, k_pe = self._latent(x, rope, cos_sin)
        kv_layer.view(-1, c.kv_width)[batch.slots] = torch.cat([ckv, k_pe], -1).to(kv_layer.dtype)
        q_lat = torch.einsum("nhd,hdr->nhr", q_nope, w_uk)  # [N, H, r]
        if batch.padded:
            kv, valid = _gather_padded(kv_layer, batch)
            kv = kv.to(q_lat.dtype)
            lat, pe = kv[..., : c.kv_lora_rank], kv[..., c.kv_lora_rank :]
            scores = (torch.einsum("bhr,blr->bhl", q_lat, lat) + torch.einsum("bhr,blr->bhl", q_pe, pe)) * c.scale
            scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
            o_lat = torch.einsum("bhl,blr->bhr", scores.softmax(-1, dtype=torch.float32).to(lat.dtype), lat)
        else:
            # Absorbed MLA is multi-query attention over the cached rows: key = [latent, rope part]
            # (one head shared by all), value = the latent, query = [q_lat, q_pe].
            q_cat, outs, start = torch.cat([q_lat, q_pe], -1), [], 0
            for table, ctx, n in zip(batch.block_tables, batch.ctx_lens, batch.new_lens):
                kv = _gather(kv_layer, table, ctx).to(q_lat.dtype)[:, None].expand(-1, c.n_heads, -1)
                # expanded (a view, no copy) rather than enable_gqa: the memory-efficient kernel, the
                # fused one that takes MLA's 576-wide heads, does not take grouped heads
                outs.append(_attend(q_cat[start : start + n], kv, kv[..., : c.kv_lora_rank], c.scale))
                start += n
            o_lat = torch.cat(outs)
        out = torch.einsum("nhr,hvr->nhv", o_lat, w_uv)
        return self.o_proj(out.reshape(len(x), -1))


class MLP(nn.Module):
    """SwiGLU: a dense layer's MLP, and each expert of an MoE (``intermediate_size`` then given)."""

    def __init__(self, cfg: ModelConfig, intermediate_size: int | None = None):
        super().__init__()
        inter = cfg.intermediate_size if intermediate_size is None else intermediate_size
        self.gate_proj = nn.Linear(cfg.hidden_size, inter, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, inter, bias=False)
        self.down_proj = nn.Linear(inter, cfg.hidden_size, bias=False)
        self._gate_up: torch.Tensor | None = None  # gate|up weight (GPU path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + MLP(x) in three launches: gate and up in one GEMM, silu * up in one kernel, and
        the down projection with the residual added in the GEMM's epilogue."""
        if self._gate_up is None:
            self._gate_up, _ = fused.concat_linears(self.gate_proj, self.up_proj)
        act = fused.silu_mul(F.linear(x, self._gate_up))
        return torch.addmm(residual, act, self.down_proj.weight.t())


class Gate(nn.Module):
    """DeepSeek's router: for each token, k routed experts and their weights.

    V2 (softmax scores): ``greedy`` takes the k best experts; ``group_limited_greedy`` first keeps
    the ``topk_group`` groups whose best expert scores highest. V3 (``noaux_tc``, sigmoid scores):
    the choice ranks score + ``e_score_correction_bias`` (a load-balancing bias that only steers
    the choice, never the weights) and keeps the groups of highest top-2 sum. The weights are the
    chosen experts' scores, renormalised if ``norm_topk_prob``, times ``routed_scaling_factor``.
    Routing runs in fp32 whatever the model's dtype (as DeepSeek's and transformers' code do).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.moe = cfg.moe
        self.weight = nn.Parameter(torch.empty(cfg.moe.n_routed_experts, cfg.hidden_size))
        # A Parameter rather than a buffer so that it loads by name with the weights (nothing trains here).
        self.e_score_correction_bias = (nn.Parameter(torch.zeros(cfg.moe.n_routed_experts), requires_grad=False)
                                        if cfg.moe.topk_method == "noaux_tc" else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, hidden] -> (weights FloatTensor[N, k] fp32, indices LongTensor[N, k])."""
        m = self.moe
        logits = F.linear(x.float(), self.weight.float())  # [N, E]
        scores = logits.softmax(-1) if m.scoring_func == "softmax" else logits.sigmoid()  # [N, E]
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias.float()
        if m.topk_method != "greedy" and m.n_group > 1:
            groups = choice.view(len(x), m.n_group, -1)  # [N, G, E / G]
            if m.topk_method == "noaux_tc":
                group_scores = groups.topk(2, dim=-1)[0].sum(-1)  # [N, G]
            else:
                group_scores = groups.amax(-1)  # [N, G]
            kept = group_scores.topk(m.topk_group, dim=-1)[1]  # [N, topk_group]
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, kept, False)  # [N, G]
            choice = groups.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)  # [N, E]
        indices = choice.topk(m.num_experts_per_tok, dim=-1, sorted=False)[1]  # [N, k]
        weights = scores.gather(1, indices)  # [N, k]
        if m.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * m.routed_scaling_factor, indices


class MoE(nn.Module):
    """DeepSeek's MoE MLP: shared experts(x) + Σ_k weight_k · routed expert_k(x).

    The routed experts run on sorted token groups: the (token, expert) pairs are sorted by expert,
    each expert that got tokens runs once on its contiguous slice, and the weighted outputs are
    added back into their tokens' rows. Experts no token chose cost nothing. Parameter names are
    the checkpoints' (``gate.weight``, ``experts.{i}.gate_proj.weight``, ``shared_experts.*``).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.moe
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(MLP(cfg, m.moe_intermediate_size) for _ in range(m.n_routed_experts))
        self.shared_experts = (MLP(cfg, m.n_shared_experts * m.moe_intermediate_size)
                               if m.n_shared_experts else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, hidden] -> [N, hidden]."""
        weights, indices = self.gate(x)  # [N, k] each
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            routed = self._routed_dense(x, weights, indices)  # a CUDA graph cannot size by routing
        else:
            routed = self._routed_grouped(x, weights, indices)
        y = routed.to(x.dtype)
        return y if self.shared_experts is None else y + self.shared_experts(x)

    def _routed_grouped(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Σ_k weight_k · expert_k(x) by sorted token groups -> [N, hidden] fp32."""
        k = indices.shape[1]
        experts, order = indices.flatten().sort(stable=True)  # [N * k] pairs, grouped by expert
        tokens = order // k  # [N * k]: the token of each sorted pair
        counts = torch.bincount(experts, minlength=len(self.experts)).tolist()  # one sync: the slices' sizes
        xs = x[tokens]  # [N * k, hidden]: each expert's tokens contiguous
        out = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n:
                out[start : start + n] = self.experts[e](xs[start : start + n])
                start += n
        weighted = out.float() * weights.flatten()[order].unsqueeze(1)  # [N * k, hidden]
        return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, tokens, weighted)

    def _routed_dense(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The same sum with shapes that do not depend on the routing, for a decode step captured in a
        CUDA graph (engine/graphs.py): every expert runs on every token of the (small) batch, weighted
        by 0 where not chosen. Its cost grows with the experts' count: fine for a few experts."""
        dense = torch.zeros(len(x), len(self.experts), dtype=torch.float32, device=x.device)
        dense.scatter_(1, indices, weights)  # [N, E]: the routing weights, 0 for experts not chosen
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e, expert in enumerate(self.experts):
            y += expert(x).float() * dense[:, e : e + 1]
        return y


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, l: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.self_attn = GQAttention(cfg) if cfg.attn == "gqa" else MLAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp: MLP | MoE = MoE(cfg) if cfg.is_moe_layer(l) else MLP(cfg)


class Model(nn.Module):
    """Parameter names follow Hugging Face's (minus the leading ``model.``), so checkpoints load by name."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, l) for l in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = Rotary.of(cfg)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def has_moe(self) -> bool:
        return any(isinstance(layer.mlp, MoE) for layer in self.layers)

    def cast(self, device: str | torch.device, dtype: torch.dtype) -> "Model":
        """``.to(device, dtype)``, except that the MoE gates' weights stay fp32: a router rounded to
        bf16 would pick other experts for some tokens (transformers keeps them fp32 as well)."""
        for module in self.modules():
            if not isinstance(module, Gate):
                for p in module.parameters(recurse=False):
                    p.data = p.data.to(dtype)
        return self.to(device=device)  # cast first: the fp32 copy never lands on the device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @torch.inference_mode()
    def forward_reference(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids: LongTensor[T] -> logits FloatTensor[T, vocab]. No cache, no paging."""
        positions = torch.arange(len(token_ids), device=token_ids.device)
        h = self.embed_tokens(token_ids)
        for layer in self.layers:
            h = h + layer.self_attn.forward_reference(layer.input_layernorm(h), positions, self.rope)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm_head(self.norm(h)).float()

    # -- serving path: one call per layer, so an engine can wait for layer l's KV before calling it --

    @torch.inference_mode()
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(token_ids)

    @torch.inference_mode()
    def rope_cos_sin(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's rotary cos and sin, to make once per step and pass to every ``layer`` call."""
        return self.rope.cos_sin(batch.positions, self.dtype)

    @torch.inference_mode()
    def layer(self, l: int, h: torch.Tensor, batch: Batch, kv_layer: torch.Tensor, cos_sin=None) -> torch.Tensor:
        """Run layer l for the batch's new tokens; writes their KV into kv_layer first."""
        layer = self.layers[l]
        cos_sin = self.rope_cos_sin(batch) if cos_sin is None else cos_sin
        if use_triton(h):  # each norm one launch, the first residual add inside the second
            x, _ = fused.add_rms_norm(h, layer.input_layernorm.weight, self.cfg.rms_eps)
            a = layer.self_attn(x, batch, kv_layer, self.rope, cos_sin)
            x, h = fused.add_rms_norm(a, layer.post_attention_layernorm.weight, self.cfg.rms_eps, residual=h)
            if isinstance(layer.mlp, MoE):  # its experts run as the torch path does
                return h + layer.mlp(x)
            return layer.mlp.forward_add(x, h)
        h = h + layer.self_attn(layer.input_layernorm(h), batch, kv_layer, self.rope, cos_sin)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    @torch.inference_mode()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h)).float()

    @torch.inference_mode()
    def forward_paged(self, token_ids: torch.Tensor, batch: Batch, kv: torch.Tensor) -> torch.Tensor:
        """All layers at once (kv: [n_layers, n_blocks, block_tokens, W]); logits of every new token."""
        h, cos_sin = self.embed(token_ids), self.rope_cos_sin(batch)
        for l in range(self.cfg.n_layers):
            h = self.layer(l, h, batch, kv[l], cos_sin)
        return self.logits(h)


def last_token_index(batch: Batch) -> list[int]:
    """Index (into the flattened batch) of each sequence's last new token."""
    out, end = [], 0
    for n in batch.new_lens:
        end += n
        out.append(end - 1)
    return out
