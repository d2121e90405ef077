"""Attention that reads the paged KV pool in place (GPU, Triton).

One kernel serves every step kind. A program takes a tile of query rows of one sequence and one KV
head, walks that sequence's block table over a range of the context, and keeps a running softmax
(FlashAttention's online form). Nothing is gathered or padded: each key tile is loaded straight from
the pool blocks the table names.

- **Rows** are (token, head) pairs of one KV head's group: ``BLOCK_Q`` new tokens x the ``R`` query
  heads that share the KV head (padded to a power of two). The group's heads read their KV head once.
  A decode step has one token a sequence, so its rows are the group's heads.
- **Splits** (Flash-Decoding): where rows are few (decode, short appends) the context is cut into
  ``n_splits`` ranges, each its own program, so a long context fills the GPU; each range writes its
  normalised output and its log-sum-exp, and ``_merge_kernel`` combines them.
- **MLA** in the absorbed form is the same kernel with one KV head shared by all query heads: the key
  is a cached row ``[latent (r) | rope part]`` and the value is its latent, read from the same tile
  (``V_IS_K1``), so the latent is never expanded per head (as DeepSeek's FlashMLA does).

Pool layout (engine/kvcache.py): ``kv_layer[block, offset, W]``; per token row, GQA holds
``[K head 0 .. K head G-1 | V head 0 .. V head G-1]`` (W = 2 G d) and MLA ``[latent | rope]``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

ENABLED = True  # model.py attends through here on a GPU; False selects its torch path (tests compare them)
# Triton's CPU interpreter (TRITON_INTERPRET=1) runs the same kernels on CPU tensors: the tests use
# it to check the whole GPU path of a model where no GPU exists.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

triton = None  # where no kernel can run (no GPU, no interpreter) the engine attends with torch
if torch.cuda.is_available() or INTERPRETED:  # (and a CPU engine starts without Triton's 0.3 s import)
    try:
        import triton
        import triton.language as tl
    except ImportError:  # an install without Triton: the torch path too
        triton = None


@dataclass(frozen=True)
class KVLayout:
    """Where a KV head's key and value sit in a cached row, and the query's matching split.

    The key is ``[K1 | K2]``: K1 at column ``g * dk1`` for KV head g, K2 (MLA's rope part; width 0
    for GQA) at ``k2_off``; the value at ``v_off + g * dv``. The query is ``[q1 (dk1) | q2 (dk2)]``.
    """

    n_kv_heads: int
    dk1: int
    dk2: int
    dv: int
    k2_off: int
    v_off: int

    @staticmethod
    def gqa(n_kv_heads: int, head_dim: int) -> "KVLayout":
        return KVLayout(n_kv_heads, head_dim, 0, head_dim, 0, n_kv_heads * head_dim)

    @staticmethod
    def mla(kv_lora_rank: int, rope_dim: int) -> "KVLayout":
        return KVLayout(1, kv_lora_rank, rope_dim, kv_lora_rank, kv_lora_rank, 0)


@dataclass
class PagedMeta:
    """A step's sequences as the kernel reads them, made once per step and used by every layer.

    tables: IntTensor[S, max_blocks], each sequence's pool blocks (padding entries are never read).
    ctx_lens: IntTensor[S], tokens each sequence holds after this step (cached + new).
    q_start: IntTensor[S], where each sequence's new tokens start among the step's N tokens.
    new_lens: IntTensor[S], new tokens of each sequence.
    tile_seq, tile_q: IntTensor[T], the sequence of each query tile and its first token (index into N);
        None for a decode step, whose tile i is sequence i's one token.
    max_ctx: the longest context the tables can hold (sets the splits; for a CUDA graph, its bucket's).
    """

    tables: torch.Tensor
    ctx_lens: torch.Tensor
    q_start: torch.Tensor
    new_lens: torch.Tensor
    tile_seq: torch.Tensor | None
    tile_q: torch.Tensor | None
    max_ctx: int
    block_q: int

    @property
    def decode(self) -> bool:
        return self.tile_seq is None

    @property
    def n_tiles(self) -> int:
        return len(self.ctx_lens) if self.decode else len(self.tile_seq)

    @staticmethod
    def for_decode(tables: torch.Tensor, ctx_lens: torch.Tensor, block_tokens: int) -> "PagedMeta":
        """B sequences of one new token each (tables [B, nb] may be a CUDA graph's fixed buffers)."""
        idx = torch.arange(len(ctx_lens), device=ctx_lens.device, dtype=ctx_lens.dtype)
        return PagedMeta(tables, ctx_lens, idx, torch.ones_like(ctx_lens), None, None,
                         tables.shape[1] * block_tokens, 1)

    @staticmethod
    def for_steps(seqs: list[tuple[list[int], int, int]], block_tokens: int, device: torch.device,
                  block_q: int) -> "PagedMeta":
        """(block_table, cached, new) sequences; query tiles of block_q tokens, none across sequences.
        A step whose sequences all have one new token is a decode step (one tile each)."""
        width = max(len(t) for t, _, _ in seqs)
        tables = torch.zeros(len(seqs), width, dtype=torch.int32)
        for i, (t, _, _) in enumerate(seqs):
            tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        if all(n == 1 for _, _, n in seqs):
            lens = torch.tensor([c + n for _, c, n in seqs], dtype=torch.int32)
            return PagedMeta.for_decode(tables.to(device, non_blocking=True), lens.to(device, non_blocking=True),
                                        block_tokens)
        starts, tile_seq, tile_q, start = [], [], [], 0
        for i, (_, _, n) in enumerate(seqs):
            starts.append(start)
            for q in range(start, start + n, block_q):
                tile_seq.append(i)
                tile_q.append(q)
            start += n

        def ints(xs: list[int]) -> torch.Tensor:
            return torch.tensor(xs, dtype=torch.int32)

        host = [tables, ints([c + n for _, c, n in seqs]), ints(starts), ints([n for _, _, n in seqs]),
                ints(tile_seq), ints(tile_q)]
        dev = [x.to(device, non_blocking=True) for x in host]
        return PagedMeta(*dev, max(c + n for _, c, n in seqs), block_q)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def choose_splits(programs: int, max_ctx: int, device: torch.device, min_chunk: int = 256,
                  per_sm: int = 4) -> int:
    """Context ranges per (tile, KV head): about per_sm programs on every SM (a decode step is
    bound by memory latency; more programs keep more loads in flight), none shorter than
    min_chunk keys (a split has a fixed cost: its partial output, then the merge)."""
    want = -(-per_sm * _sm_count(device) // programs)
    return max(1, min(want, max_ctx // min_chunk))


if triton is not None:

    @triton.jit
    def _attend_keys(m, l, acc, q1, q2, KV, Table, g, pos, start_key, end_key, hi, stride_kvb, stride_kvt,
                     scale_log2, BLOCK_N: tl.constexpr, BT: tl.constexpr, DK1: tl.constexpr, DK2: tl.constexpr,
                     DV: tl.constexpr, K2_OFF: tl.constexpr, V_OFF: tl.constexpr, V_IS_K1: tl.constexpr,
                     IEEE: tl.constexpr, MASKED: tl.constexpr):
        """The online softmax over keys [start_key, end_key) of one sequence's block table, in tiles of
        BLOCK_N. MASKED: keys past ``hi`` or past a row's position are dropped (the diagonal, the
        range's end); unmasked tiles are wholly visible to every row."""
        cols1, colsv = tl.arange(0, DK1), tl.arange(0, DV)
        for start in range(start_key, end_key, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            key_ok = keys < hi
            if MASKED:
                block = tl.load(Table + keys // BT, mask=key_ok, other=0)
            else:
                block = tl.load(Table + keys // BT)
            row_ptr = KV + block.to(tl.int64) * stride_kvb + (keys % BT) * stride_kvt  # [BLOCK_N] cached rows
            if MASKED:
                k1 = tl.load(row_ptr[:, None] + g * DK1 + cols1[None, :], mask=key_ok[:, None], other=0.0)
            else:
                k1 = tl.load(row_ptr[:, None] + g * DK1 + cols1[None, :])
            k1 = k1.to(q1.dtype)
            if IEEE:
                s = tl.dot(q1, tl.trans(k1), input_precision="ieee")
            else:
                s = tl.dot(q1, tl.trans(k1))
            if DK2 > 0:
                if MASKED:
                    k2 = tl.load(row_ptr[:, None] + K2_OFF + tl.arange(0, DK2)[None, :], mask=key_ok[:, None],
                                 other=0.0)
                else:
                    k2 = tl.load(row_ptr[:, None] + K2_OFF + tl.arange(0, DK2)[None, :])
                k2 = k2.to(q2.dtype)
                if IEEE:
                    s += tl.dot(q2, tl.trans(k2), input_precision="ieee")
                else:
                    s += tl.dot(q2, tl.trans(k2))
            s = s * scale_log2
            if MASKED:
                s = tl.where(key_ok[None, :] & (keys[None, :] <= pos[:, None]), s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet stays all zero
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m - m_safe)
            l = l * alpha + tl.sum(p, 1)
            if V_IS_K1:
                v = k1
            elif MASKED:
                v = tl.load(row_ptr[:, None] + V_OFF + g * DV + colsv[None, :], mask=key_ok[:, None], other=0.0)
            else:
                v = tl.load(row_ptr[:, None] + V_OFF + g * DV + colsv[None, :])
            v = v.to(q1.dtype)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        return m, l, acc

    @triton.jit
    def _attention_kernel(
        Q, KV, Out, Part, Lse, Tables, CtxLens, QStart, NewLens, TileSeq, TileQ,
        stride_qn, stride_qh, stride_kvb, stride_kvt, stride_tab, stride_on, stride_oh,
        stride_ps, stride_pn, stride_ph, stride_ls, stride_ln,
        scale_log2, chunk,
        R: tl.constexpr, RP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BT: tl.constexpr,
        DK1: tl.constexpr, DK2: tl.constexpr, DV: tl.constexpr, K2_OFF: tl.constexpr, V_OFF: tl.constexpr,
        V_IS_K1: tl.constexpr, DECODE: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
    ):
        """Grid (tiles, KV heads, splits). Rows r = t * RP + j: token q0 + t, query head g * R + j."""
        tile, g, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        if DECODE:
            seq, q0 = tile, tile
        else:
            seq, q0 = tl.load(TileSeq + tile), tl.load(TileQ + tile)
        ctx = tl.load(CtxLens + seq)
        q_end = tl.load(QStart + seq) + tl.load(NewLens + seq)  # one past the sequence's last new token
        first_pos = ctx - q_end  # context position of the step's token 0 of this sequence, minus its index

        rows = tl.arange(0, BLOCK_Q * RP)
        tok, head = q0 + rows // RP, g * R + rows % RP
        row_ok = (rows % RP < R) & (tok < q_end)
        pos = first_pos + tok  # each row's own position: it sees keys 0..pos (causal, lower right)

        # keys this program reads: its split's range, cut at the tile's last row's position
        lo = split * chunk
        hi = tl.minimum(lo + chunk, tl.minimum(ctx, first_pos + tl.minimum(q0 + BLOCK_Q, q_end)))

        q_ptr = Q + tok[:, None] * stride_qn + head[:, None] * stride_qh
        q1 = tl.load(q_ptr + tl.arange(0, DK1)[None, :], mask=row_ok[:, None], other=0.0)
        if DK2 > 0:
            q2 = tl.load(q_ptr + DK1 + tl.arange(0, DK2)[None, :], mask=row_ok[:, None], other=0.0)
        else:
            q2 = q1  # unused: GQA's key has no second part

        m = tl.full([BLOCK_Q * RP], float("-inf"), tl.float32)  # running max (log2 domain)
        l = tl.zeros([BLOCK_Q * RP], tl.float32)  # running sum of exp2
        acc = tl.zeros([BLOCK_Q * RP, DV], tl.float32)
        # Keys every row of the tile sees (up to its first row's position) need no mask: walk them
        # first, then the diagonal and the range's ragged end with masks (FlashAttention's split).
        seen_by_all = tl.minimum(hi, first_pos + q0 + 1)
        mid = lo + tl.maximum(seen_by_all - lo, 0) // BLOCK_N * BLOCK_N
        m, l, acc = _attend_keys(m, l, acc, q1, q2, KV, Tables + seq * stride_tab, g, pos, lo, mid, hi,
                                 stride_kvb, stride_kvt, scale_log2, BLOCK_N, BT, DK1, DK2, DV, K2_OFF, V_OFF,
                                 V_IS_K1, IEEE, False)
        m, l, acc = _attend_keys(m, l, acc, q1, q2, KV, Tables + seq * stride_tab, g, pos, mid, hi, hi,
                                 stride_kvb, stride_kvt, scale_log2, BLOCK_N, BT, DK1, DK2, DV, K2_OFF, V_OFF,
                                 V_IS_K1, IEEE, True)

        out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
        colsv = tl.arange(0, DV)
        if SPLIT:
            lse = tl.where(l == 0.0, float("-inf"), m + tl.log2(l))
            part = Part + split * stride_ps + tok[:, None] * stride_pn + head[:, None] * stride_ph + colsv[None, :]
            tl.store(part, out, mask=row_ok[:, None])
            tl.store(Lse + split * stride_ls + tok * stride_ln + head, lse, mask=row_ok)
        else:
            o_ptr = Out + tok[:, None] * stride_on + head[:, None] * stride_oh + colsv[None, :]
            tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _merge_kernel(Out, Part, Lse, n_splits, H, stride_on, stride_oh, stride_ps, stride_pn, stride_ph,
                      stride_ls, stride_ln, DV: tl.constexpr, BLOCK_S: tl.constexpr):
        """One program per (token, head): out = Σ_s 2^(lse_s - M) part_s / Σ_s 2^(lse_s - M).

        Splits are read BLOCK_S at a time (a vector of log-sum-exps, a [BLOCK_S, DV] tile of partial
        outputs): a long context has ~80 splits, and one load per split leaves the merge waiting on
        memory latency 80 times in a row."""
        n, h = tl.program_id(0) // H, tl.program_id(0) % H
        cols, ss = tl.arange(0, DV), tl.arange(0, BLOCK_S)
        lse_row = Lse + n * stride_ln + h
        big = tl.full([BLOCK_S], float("-inf"), tl.float32)
        for s0 in range(0, n_splits, BLOCK_S):
            big = tl.maximum(big, tl.load(lse_row + (s0 + ss) * stride_ls, mask=s0 + ss < n_splits,
                                          other=float("-inf")))
        top = tl.max(big, 0)
        total = tl.zeros([BLOCK_S], tl.float32)
        acc = tl.zeros([DV], tl.float32)
        for s0 in range(0, n_splits, BLOCK_S):
            s = s0 + ss
            ok = s < n_splits
            w = tl.exp2(tl.load(lse_row + s * stride_ls, mask=ok, other=float("-inf")) - top)  # [BLOCK_S]
            total += w
            part = tl.load(Part + s[:, None] * stride_ps + n * stride_pn + h * stride_ph + cols[None, :],
                           mask=ok[:, None], other=0.0)
            acc += tl.sum(w[:, None] * part, 0)
        tl.store(Out + n * stride_on + h * stride_oh + cols, (acc / tl.sum(total, 0)).to(Out.dtype.element_ty))


@dataclass(frozen=True)
class Tuning:
    """Tile shape of a launch (measured on an H200 by `dualpath bench roofline`)."""

    block_n: int
    num_warps: int
    num_stages: int


def _tuning(layout: KVLayout, decode: bool) -> Tuning:
    """Best of a sweep on an H100 (bench roofline's shapes: decode 48 x 20K, append 512 over 32K)."""
    if layout.dv >= 256:  # MLA absorbed: wide latent rows, the accumulator is [rows, 512]
        return Tuning(64, 8, 3) if decode else Tuning(64, 8, 2)
    if not decode and layout.dk2 > 0:  # MLA expanded: one query head per KV head, keys of 128 + 64
        return Tuning(128, 8, 3)
    return Tuning(128, 8, 2) if decode else Tuning(64, 4, 2)


def prefill_block_q(layout: KVLayout, n_heads: int) -> int:
    """New tokens per query tile in prefill: 64 rows (tokens x heads of a group), 128 where each KV
    head serves one query head (MLA expanded: the sweep's best, 0.65 against 0.71 ms at 64)."""
    rp = triton.next_power_of_2(n_heads // layout.n_kv_heads) if triton else 1
    return 128 if rp == 1 and layout.dk2 > 0 else max(1, 64 // rp)


def paged_attention(q: torch.Tensor, kv_layer: torch.Tensor, layout: KVLayout, meta: PagedMeta,
                    scale: float, n_splits: int | None = None, tune: Tuning | None = None) -> torch.Tensor:
    """q [N, H, dk1 + dk2] of the step's new tokens (already written into the pool) -> out [N, H, dv].

    Each new token attends causally over its sequence's context in ``kv_layer`` [blocks, BT, W]."""
    n, h, _ = q.shape
    r = h // layout.n_kv_heads
    rp = max(triton.next_power_of_2(r), 1)
    block_q = meta.block_q
    if meta.decode and rp < 16:  # tl.dot wants at least 16 rows; a decode tile is one token
        rp = 16
    tune = tune or _tuning(layout, meta.decode)
    programs = meta.n_tiles * layout.n_kv_heads
    splits = n_splits or choose_splits(programs, meta.max_ctx, q.device)
    chunk = -(-meta.max_ctx // splits)
    chunk = -(-chunk // tune.block_n) * tune.block_n
    splits = -(-meta.max_ctx // chunk)
    out = torch.empty(n, h, layout.dv, dtype=q.dtype, device=q.device)
    if splits > 1:
        part = torch.empty(splits, n, h, layout.dv, dtype=torch.float32, device=q.device)
        lse = torch.empty(splits, n, h, dtype=torch.float32, device=q.device)
    else:
        part = lse = out  # unused
    tiles = meta.tile_seq if meta.tile_seq is not None else meta.ctx_lens
    _attention_kernel[(meta.n_tiles, layout.n_kv_heads, splits)](
        q, kv_layer, out, part, lse, meta.tables, meta.ctx_lens, meta.q_start, meta.new_lens,
        tiles, meta.tile_q if meta.tile_q is not None else tiles,
        q.stride(0), q.stride(1), kv_layer.stride(0), kv_layer.stride(1), meta.tables.stride(0),
        out.stride(0), out.stride(1),
        part.stride(0) if splits > 1 else 0, part.stride(1) if splits > 1 else 0, part.stride(2) if splits > 1 else 0,
        lse.stride(0) if splits > 1 else 0, lse.stride(1) if splits > 1 else 0,
        scale * 1.4426950408889634, chunk,
        R=r, RP=rp, BLOCK_Q=block_q, BLOCK_N=tune.block_n, BT=kv_layer.shape[1],
        DK1=layout.dk1, DK2=layout.dk2, DV=layout.dv, K2_OFF=layout.k2_off, V_OFF=layout.v_off,
        V_IS_K1=layout.v_off == 0 and layout.dv == layout.dk1 and layout.n_kv_heads == 1,
        DECODE=meta.decode, SPLIT=splits > 1, IEEE=q.dtype == torch.float32,
        num_warps=tune.num_warps, num_stages=tune.num_stages,
    )
    if splits > 1:
        _merge_kernel[(n * h,)](out, part, lse, splits, h, out.stride(0), out.stride(1), part.stride(0),
                                part.stride(1), part.stride(2), lse.stride(0), lse.stride(1), DV=layout.dv,
                                BLOCK_S=min(triton.next_power_of_2(splits), max(2, 8192 // layout.dv)))
    return out
