"""engine/attention.py's paged kernel and engine/fused.py's kernels against the torch path they
replace on a GPU.

On a CPU the kernel runs in Triton's interpreter (a subprocess with TRITON_INTERPRET=1; Triton 3.8
or newer, whose interpreter takes loop bounds loaded from memory); on a GPU compiled, inside whole
model steps: ragged prefill batches, contexts that end mid-block, one-token and long appends, plain
and CUDA-graph decode, GQA and MLA, fp32 and bf16.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from dualpath.engine import attention
from dualpath.engine import model as model_module
from dualpath.engine.kvcache import KVPool
from dualpath.engine.architecture import ModelConfig
from dualpath.engine.model import Batch, Model
from tests.conftest import needs_triton_interpreter, run_in_triton_interpreter

BT = 16

# Attention shapes of the GPU presets (small-gqa: 14 heads over 2 KV heads of 64; small-mla: 16 heads,
# a 512-wide latent and a 64-wide rope key) on a narrow, shallow model so that a test is quick.
CONFIGS = {
    "gqa": ModelConfig(attn="gqa", vocab_size=256, hidden_size=128, n_layers=2, n_heads=14, n_kv_heads=2,
                       head_dim=64, intermediate_size=128, max_position=4096),
    "mla": ModelConfig(attn="mla", vocab_size=256, hidden_size=128, n_layers=2, n_heads=16, q_lora_rank=None,
                       kv_lora_rank=512, qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32,
                       intermediate_size=128, rope_interleave=True, max_position=4096),
}

INTERPRETER_SCRIPT = textwrap.dedent("""
    import torch
    from dualpath.engine.attention import KVLayout, PagedMeta, paged_attention, prefill_block_q
    from dualpath.engine.model import _attend

    def reference(q, kv, layout, seqs, scale):
        outs, start = [], 0
        for table, cached, new in seqs:
            ctx = cached + new
            rows = kv[torch.tensor(table)].flatten(0, 1)[:ctx]
            if layout.dk2 == 0:  # GQA: [K heads | V heads]
                g = layout.n_kv_heads
                k = rows[:, : g * layout.dk1].view(ctx, g, layout.dk1)
                v = rows[:, layout.v_off : layout.v_off + g * layout.dv].view(ctx, g, layout.dv)
            else:  # MLA: one [latent | rope] key for every head, the latent as value
                k = rows[:, None].expand(-1, q.shape[1], -1)
                v = k[..., : layout.dv]
            outs.append(_attend(q[start : start + new], k, v, scale))
            start += new
        return torch.cat(outs)

    torch.manual_seed(0)
    bt = 16
    cases = {"decode": [([3, 5, 7], 40, 1), ([1], 5, 1), ([9, 10, 11, 12, 13], 64, 1)],
             "appends": [([3, 5, 7], 20, 13), ([1], 0, 9), ([9, 10, 11, 12], 37, 20)],
             "fresh": [([2, 4], 0, 32)],
             # contexts past a tile of keys: the unmasked walk before the diagonal
             "long appends": [(list(range(16, 46)), 450, 20), (list(range(2, 12)), 100, 3)],
             "long decode": [(list(range(16, 46)), 470, 1), (list(range(2, 12)), 150, 1)]}
    for layout, heads, width in [(KVLayout.gqa(2, 16), 6, 64), (KVLayout.mla(32, 16), 4, 48)]:
        kv = torch.randn(48, bt, width)
        for name, seqs in cases.items():
            q = torch.randn(sum(n for *_, n in seqs), heads, layout.dk1 + layout.dk2)
            want = reference(q, kv, layout, seqs, 0.3)
            for splits in (None, 1, 3):
                meta = PagedMeta.for_steps(seqs, bt, torch.device("cpu"), prefill_block_q(layout, heads))
                assert meta.decode == name.endswith("decode")
                got = paged_attention(q, kv, layout, meta, 0.3, n_splits=splits)
                err = (got - want).abs().max().item()
                assert err < 1e-4, (layout, name, splits, err)
                print(layout.dk2 and "mla" or "gqa", name, splits, f"{err:.1e}")
    print("ok")
""")


FUSED_SCRIPT = textwrap.dedent("""
    import torch
    from dualpath.engine.fused import add_rms_norm, rope_and_cache
    from dualpath.engine.model import RMSNorm, Rotary

    torch.manual_seed(0)
    norm = RMSNorm(96, 1e-6)
    norm.weight.data.normal_()
    x, res = torch.randn(5, 96), torch.randn(5, 96)
    out, h = add_rms_norm(x, norm.weight.data, 1e-6, residual=res)
    assert torch.equal(h, x + res) and torch.allclose(out, norm(x + res), atol=1e-6)
    wide = torch.randn(5, 120)  # rows with a stride: MLA normalises the latent inside a wider projection
    out, same = add_rms_norm(wide[:, :96], norm.weight.data, 1e-6)
    assert same.data_ptr() == wide.data_ptr() and torch.allclose(out, norm(wide[:, :96]), atol=1e-6)

    pos, slots = torch.tensor([3, 0, 17, 5, 99]), torch.tensor([1, 9, 30, 4, 17])
    for interleave in (False, True):  # GQA: q and k heads rotated, [K | V] written at each slot
        rope = Rotary(16, 10000.0, 128, interleave)
        cs = rope.cos_sin(pos, torch.float32)
        q, k, v = torch.randn(5, 6, 16), torch.randn(5, 2, 16), torch.randn(5, 32)
        pool = torch.zeros(4, 8, 64)
        want = pool.clone()
        want.view(-1, 64)[slots] = torch.cat([rope(k, cs).flatten(1), v], -1)
        q_rot = rope_and_cache(q, 0, k, v, pool, slots, cs, k_dst=0, copy_dst=32, interleave=interleave)
        assert torch.allclose(q_rot, rope(q, cs), atol=1e-6) and torch.allclose(pool, want, atol=1e-6)
    # MLA: the queries' rope part rotated; [latent | rotated shared key] written at each slot
    rope = Rotary(8, 10000.0, 128, True)
    cs = rope.cos_sin(pos, torch.float32)
    q, kv = torch.randn(5, 4, 24), torch.randn(5, 40)
    latent, k_pe = kv.split([32, 8], -1)
    pool = torch.zeros(4, 8, 40)
    want = pool.clone()
    want.view(-1, 40)[slots] = torch.cat([latent, rope(k_pe.unsqueeze(1), cs).squeeze(1)], -1)
    q_pe = rope_and_cache(q, 16, k_pe.unsqueeze(1), latent, pool, slots, cs, k_dst=32, copy_dst=0, interleave=True)
    assert torch.allclose(q_pe, rope(q[..., 16:], cs), atol=1e-6) and torch.allclose(pool, want, atol=1e-6)
    print("ok")
""")


# The model's whole GPU path (q|k|v and gate|up GEMMs, fused norms, RoPE + KV write, SwiGLU, paged
# attention; a ragged prefill step, then a bucketed decode step) against its torch path, fp32.
WHOLE_MODEL_SCRIPT = """
import torch
from dualpath.engine import attention
from dualpath.engine.graphs import DecodeGraphs
from dualpath.engine.kvcache import KVPool
from dualpath.engine import model as model_module
from dualpath.engine.architecture import ModelConfig
from dualpath.engine.model import Batch, Model
from tests.conftest import needs_triton_interpreter, run_in_triton_interpreter
BT = 16
CONFIGS = {
    "gqa": ModelConfig(attn="gqa", vocab_size=128, hidden_size=64, n_layers=2, n_heads=6, n_kv_heads=2,
                       head_dim=16, intermediate_size=96, max_position=1024),
    "mla": ModelConfig(attn="mla", vocab_size=128, hidden_size=64, n_layers=2, n_heads=4, q_lora_rank=24,
                       kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                       intermediate_size=96, rope_interleave=True, max_position=1024),
}
def logits(model, pool, seqs, ids, triton_path):
    attention.ENABLED = triton_path
    try:
        return model.forward_paged(ids, Batch.build(seqs, BT, "cpu"), pool.kv)
    finally:
        attention.ENABLED = True
for kind, cfg in CONFIGS.items():
    torch.manual_seed(1)
    model = Model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.1) if not name.endswith("norm.weight") else p.normal_(1, 0.1)
    pool = KVPool(cfg, 40, BT, "cpu", torch.float32)
    shapes = [(37, 1), (0, 5), (70, 19)]
    tables = [pool.allocator.alloc(pool.blocks_for(c + n + 1)) for c, n in shapes]
    gen = torch.Generator().manual_seed(2)
    for t, (c, _) in zip(tables, shapes):
        if c:
            logits(model, pool, [(t, 0, c)], torch.randint(0, 128, (c,), generator=gen), False)
    seqs = [(t, c, n) for t, (c, n) in zip(tables, shapes)]
    ids = torch.randint(0, 128, (sum(n for _, n in shapes),), generator=gen)
    before = pool.kv.clone()
    want = logits(model, pool, seqs, ids, False)
    kv_want = pool.kv.clone()
    for form in ("absorbed", "expanded") if kind == "mla" else ("auto",):  # MLA's two prefill forms
        model_module.MLA_PREFILL_FORM = form
        pool.kv.copy_(before)
        got = logits(model, pool, seqs, ids, True)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (kind, form, (got - want).abs().max())
        assert torch.allclose(pool.kv, kv_want, atol=1e-5), (kind, form)
    model_module.MLA_PREFILL_FORM = "auto"
    last = [3, 9, 11]
    step = [(t, c + n, 1) for t, (c, n) in zip(tables, shapes)]
    before = pool.kv.clone()
    want = logits(model, pool, step, torch.tensor(last), False)
    pool.kv.copy_(before)
    graphs = DecodeGraphs(model, pool.kv, BT, pool.allocator.alloc(1)[0], capture=False, pad=True)
    got = graphs.run([(tok, c + n, t) for tok, t, (c, n) in zip(last, tables, shapes)])
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (kind, "decode", (got - want).abs().max())
    print(kind, "ok", flush=True)
print("ok")
"""


@needs_triton_interpreter
@pytest.mark.cluster
def test_kernel_in_the_interpreter_equals_attention_per_sequence():
    """GQA and MLA layouts; decode, ragged appends over contexts ending mid-block, a fresh causal
    prefill; with the context in one range and split in three (each merged by its log-sum-exp)."""
    r = run_in_triton_interpreter(INTERPRETER_SCRIPT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith("ok") and r.stdout.count("\n") == 2 * 5 * 3 + 1


@needs_triton_interpreter
@pytest.mark.cluster
def test_fused_norm_and_rope_in_the_interpreter_equal_the_torch_layers():
    """fp32 (the interpreter rounds bf16 its own way; the GPU test covers bf16)."""
    r = run_in_triton_interpreter(FUSED_SCRIPT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


@needs_triton_interpreter
@pytest.mark.cluster
def test_the_models_triton_path_in_the_interpreter_equals_its_torch_path():
    r = run_in_triton_interpreter(WHOLE_MODEL_SCRIPT)
    assert r.returncode == 0 and r.stdout.split() == ["gqa", "ok", "mla", "ok", "ok"], r.stdout + r.stderr


def test_split_choice_fills_the_gpu_and_keeps_ranges_long():
    dev = torch.device("cpu")  # counts 8 SMs
    assert attention.choose_splits(programs=2, max_ctx=20480, device=dev) == 16
    assert attention.choose_splits(programs=96, max_ctx=20480, device=dev) == 1
    assert attention.choose_splits(programs=8, max_ctx=20480, device=dev) == 4
    assert attention.choose_splits(programs=1, max_ctx=300, device=dev) == 1


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or attention.triton is None,
                               reason="needs a GPU with Triton")


def _model(kind: str, dtype: torch.dtype) -> Model:
    torch.manual_seed(1)
    model = Model(CONFIGS[kind])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.05)
    return model.to("cuda", dtype).eval()


def _logits(model: Model, pool: KVPool, seqs, ids: torch.Tensor, paged: bool) -> torch.Tensor:
    attention.ENABLED = paged
    try:
        return model.forward_paged(ids, Batch.build(seqs, BT, "cuda"), pool.kv)
    finally:
        attention.ENABLED = True


@needs_gpu
@pytest.mark.parametrize("kind", ["gqa", "mla"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_steps_equal_the_torch_path_on_gpu(kind, dtype):
    """A prefill step of ragged appends (1, 5, 67 and 300 new tokens over 0-700 cached, some
    ending mid-block), then a decode step of those sequences, plain and from a CUDA graph."""
    from dualpath.engine.graphs import DecodeGraphs

    model = _model(kind, dtype)
    tol = dict(atol=2e-4, rtol=2e-4) if dtype == torch.float32 else dict(atol=0.06, rtol=0.06)
    pool = KVPool(model.cfg, 256, BT, "cuda", dtype)
    gen = torch.Generator().manual_seed(2)
    shapes = [(37, 1), (0, 5), (700, 67), (129, 300)]  # (cached, new)
    tables = [pool.allocator.alloc(pool.blocks_for(c + n + 1)) for c, n in shapes]
    for table, (cached, _) in zip(tables, shapes):  # the cached part, by the torch path
        if cached:
            ids = torch.randint(0, 256, (cached,), generator=gen).cuda()
            _logits(model, pool, [(table, 0, cached)], ids, paged=False)
    seqs = [(t, c, n) for t, (c, n) in zip(tables, shapes)]
    ids = torch.randint(0, 256, (sum(n for _, n in shapes),), generator=gen).cuda()
    kv_before = pool.kv.clone()
    want = _logits(model, pool, seqs, ids, paged=False)
    for form in ("absorbed", "expanded") if kind == "mla" else ("auto",):  # MLA's two prefill forms
        model_module.MLA_PREFILL_FORM = form
        try:
            pool.kv.copy_(kv_before)
            got = _logits(model, pool, seqs, ids, paged=True)
        finally:
            model_module.MLA_PREFILL_FORM = "auto"
        torch.testing.assert_close(got.float(), want.float(), **tol)

    last = torch.randint(0, 256, (len(shapes),), generator=gen).tolist()
    step = [(t, c + n, 1) for t, (c, n) in zip(tables, shapes)]
    kv_before = pool.kv.clone()
    want = _logits(model, pool, step, torch.tensor(last, device="cuda"), paged=False)
    pool.kv.copy_(kv_before)
    got = _logits(model, pool, step, torch.tensor(last, device="cuda"), paged=True)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    pool.kv.copy_(kv_before)
    graphs = DecodeGraphs(model, pool.kv, BT, pool.allocator.alloc(1)[0], capture=True)
    replayed = graphs.run([(tok, c + n, t) for tok, t, (c, n) in zip(last, tables, shapes)])
    torch.testing.assert_close(replayed.float(), want.float(), **tol)


@needs_gpu
@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_long_context_decode_splits_and_merges_on_gpu(kind):
    """One sequence of 20K tokens: its decode is split across many programs (80 here; MLA's merge
    reads them 16 at a time); the merge equals the one-range result."""
    model = _model(kind, torch.bfloat16)
    c = model.cfg
    layout = (attention.KVLayout.gqa(c.n_kv_heads, c.head_dim) if kind == "gqa"
              else attention.KVLayout.mla(c.kv_lora_rank, c.qk_rope_head_dim))
    kv = torch.randn(1300, BT, c.kv_width, device="cuda", dtype=torch.bfloat16)
    seqs = [(list(range(1280)), 20479, 1)]
    meta = attention.PagedMeta.for_steps(seqs, BT, torch.device("cuda"), 1)
    q = torch.randn(1, c.n_heads, layout.dk1 + layout.dk2, device="cuda", dtype=torch.bfloat16)
    one = attention.paged_attention(q, kv, layout, meta, c.scale, n_splits=1)
    many = attention.paged_attention(q, kv, layout, meta, c.scale)
    torch.testing.assert_close(many.float(), one.float(), atol=2e-2, rtol=2e-2)
