"""Fused element-wise steps of a layer (GPU, Triton): one launch where torch takes several.

A prefill or small decode step of a small model is bound by how many kernels the host launches
(each ~5-10 µs of Python and dispatch), not by the GPU: torch's RMSNorm as Qwen2 and DeepSeek write
it (to fp32, normalise, back, times the weight) is four launches, a residual add a fifth. These
kernels compute exactly the same roundings in one launch each.
"""

from __future__ import annotations

import torch

from dualpath.engine.attention import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _add_rms_norm_kernel(X, Res, W, Out, ResOut, stride_x, eps, D: tl.constexpr, BLOCK: tl.constexpr,
                             HAS_RES: tl.constexpr):
        """One row per program: h = x (+ res, rounded to x's dtype as torch's add is);
        out = w * (h / rms(h) in fp32, rounded to x's dtype)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < D
        h = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
        if HAS_RES:
            h = (h.to(tl.float32) + tl.load(Res + row * D + cols, mask=ok, other=0.0).to(tl.float32)).to(h.dtype)
            tl.store(ResOut + row * D + cols, h, mask=ok)
        hf = h.to(tl.float32)
        normed = (hf * tl.rsqrt(tl.sum(hf * hf, 0) / D + eps)).to(h.dtype)
        w = tl.load(W + cols, mask=ok, other=0.0)
        tl.store(Out + row * D + cols, (normed.to(tl.float32) * w.to(tl.float32)).to(h.dtype), mask=ok)


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised, h) for x [N, D] (rows contiguous; residual and the outputs contiguous):
    h = x + residual (or x), normalised = RMSNorm(h)."""
    n, d = x.shape
    out = torch.empty(n, d, dtype=x.dtype, device=x.device)
    h = torch.empty_like(out) if residual is not None else x
    _add_rms_norm_kernel[(n,)](x, residual if residual is not None else x, weight, out, h, x.stride(0), eps, D=d,
                               BLOCK=triton.next_power_of_2(d), HAS_RES=residual is not None,
                               num_warps=4 if d <= 2048 else 8)
    return out, h


if triton is not None:

    @triton.jit
    def _rotate(x_ptr, rows, row_ok, cos_a, sin_a, cos_b, sin_b, HALF: tl.constexpr, INTERLEAVE: tl.constexpr):
        """RoPE in the rotate-half form of rows [rows, 2 * HALF] (de-interleaved first where DeepSeek
        interleaves pairs): (a, b) -> (a cos - b sin, b cos + a sin), each product rounded to the
        input's dtype as torch's element-wise ops are."""
        i = tl.arange(0, HALF)
        if INTERLEAVE:
            ia, ib = 2 * i, 2 * i + 1
        else:
            ia, ib = i, HALF + i
        a = tl.load(x_ptr + rows[:, None] + ia[None, :], mask=row_ok[:, None], other=0.0)
        b = tl.load(x_ptr + rows[:, None] + ib[None, :], mask=row_ok[:, None], other=0.0)
        dt = a.dtype
        af, bf = a.to(tl.float32), b.to(tl.float32)
        out_a = (af * cos_a).to(dt).to(tl.float32) + (-bf * sin_a).to(dt).to(tl.float32)
        out_b = (bf * cos_b).to(dt).to(tl.float32) + (af * sin_b).to(dt).to(tl.float32)
        return out_a.to(dt), out_b.to(dt)

    @triton.jit
    def _rope_and_cache_kernel(Q, QOut, K, Copy, Pool, Slots, Cos, Sin,
                               stride_qn, stride_qh, q_off, stride_kn, stride_kh, stride_cn, pool_row,
                               k_dst, copy_dst,
                               HQ: tl.constexpr, HQP: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                               HALF: tl.constexpr, COPY_W: tl.constexpr, COPY_BLOCK: tl.constexpr,
                               INTERLEAVE: tl.constexpr):
        """One token per program: rotate its query heads' rope part into QOut [N, HQ, 2 HALF]; write
        its cached row at its pool slot: the rotated key heads at k_dst, the copied part at copy_dst."""
        n = tl.program_id(0).to(tl.int64)
        i = tl.arange(0, HALF)
        cos_a, cos_b = tl.load(Cos + n * 2 * HALF + i).to(tl.float32), tl.load(Cos + n * 2 * HALF + HALF + i).to(tl.float32)
        sin_a, sin_b = tl.load(Sin + n * 2 * HALF + i).to(tl.float32), tl.load(Sin + n * 2 * HALF + HALF + i).to(tl.float32)

        h = tl.arange(0, HQP)
        qa, qb = _rotate(Q + n * stride_qn + q_off, h * stride_qh, h < HQ, cos_a[None, :], sin_a[None, :],
                         cos_b[None, :], sin_b[None, :], HALF, INTERLEAVE)
        q_out = QOut + n * HQ * 2 * HALF + h[:, None] * 2 * HALF
        tl.store(q_out + i[None, :], qa, mask=(h < HQ)[:, None])
        tl.store(q_out + HALF + i[None, :], qb, mask=(h < HQ)[:, None])

        row = Pool + tl.load(Slots + n) * pool_row
        g = tl.arange(0, GP)
        ka, kb = _rotate(K + n * stride_kn, g * stride_kh, g < G, cos_a[None, :], sin_a[None, :],
                         cos_b[None, :], sin_b[None, :], HALF, INTERLEAVE)
        k_out = row + k_dst + g[:, None] * 2 * HALF
        tl.store(k_out + i[None, :], ka.to(Pool.dtype.element_ty), mask=(g < G)[:, None])
        tl.store(k_out + HALF + i[None, :], kb.to(Pool.dtype.element_ty), mask=(g < G)[:, None])

        c = tl.arange(0, COPY_BLOCK)
        v = tl.load(Copy + n * stride_cn + c, mask=c < COPY_W)
        tl.store(row + copy_dst + c, v.to(Pool.dtype.element_ty), mask=c < COPY_W)


def rope_and_cache(q: torch.Tensor, q_off: int, k: torch.Tensor, copy: torch.Tensor, kv_layer: torch.Tensor,
                   slots: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], k_dst: int, copy_dst: int,
                   interleave: bool) -> torch.Tensor:
    """The step's RoPE and KV write in one launch. q [N, HQ, *]: its columns q_off.. q_off + R are
    rotated and returned, [N, HQ, R]; k [N, G, R] is rotated into each new token's pool row at
    column k_dst (head g at k_dst + g R), and copy [N, C] goes in unrotated at copy_dst.
    GQA: q all of it, k its heads, copy = V. MLA: q's rope part, k = the shared rope key, copy = the latent."""
    n, hq = q.shape[0], q.shape[1]
    g, r = k.shape[1], k.shape[2]
    cos, sin = cos_sin
    out = torch.empty(n, hq, r, dtype=q.dtype, device=q.device)
    _rope_and_cache_kernel[(n,)](
        q, out, k, copy, kv_layer, slots, cos.reshape(n, r), sin.reshape(n, r),
        q.stride(0), q.stride(1), q_off, k.stride(0), k.stride(1), copy.stride(0), kv_layer.stride(1),
        k_dst, copy_dst, HQ=hq, HQP=triton.next_power_of_2(hq), G=g, GP=triton.next_power_of_2(g), HALF=r // 2,
        COPY_W=copy.shape[1], COPY_BLOCK=triton.next_power_of_2(copy.shape[1]), INTERLEAVE=interleave,
        num_warps=4)
    return out


if triton is not None:

    @triton.jit
    def _silu_mul_kernel(GU, Out, I: tl.constexpr, BLOCK: tl.constexpr):
        """Row n, columns of one block: out = silu(gate) * up, gate|up side by side in GU [N, 2 I]."""
        n, cols = tl.program_id(0).to(tl.int64), tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < I
        g = tl.load(GU + n * 2 * I + cols, mask=ok, other=0.0)
        u = tl.load(GU + n * 2 * I + I + cols, mask=ok, other=0.0)
        gf = g.to(tl.float32)
        s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # rounded as torch's silu output is, before the product
        tl.store(Out + n * I + cols, (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[N, 2 I] (gate | up, contiguous) -> silu(gate) * up, [N, I]."""
    n, two_i = gate_up.shape
    i = two_i // 2
    out = torch.empty(n, i, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(i))
    _silu_mul_kernel[(n, triton.cdiv(i, block))](gate_up, out, I=i, BLOCK=block, num_warps=4)
    return out


def concat_linears(*linears: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for Linear layers that read the same input, so that one GEMM does the
    work of several (one launch instead of three for q, k and v). Each layer's parameters become
    views of the joint tensor: no memory is doubled, and checkpoints still load by name."""
    with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, as the parameters were made
        weight = torch.cat([l.weight.data for l in linears])
        bias = torch.cat([l.bias.data for l in linears]) if linears[0].bias is not None else None
        start = 0
        for l in linears:
            rows = l.weight.shape[0]
            l.weight.data = weight[start : start + rows]
            if bias is not None:
                l.bias.data = bias[start : start + rows]
            start += rows
    return weight, bias
