"""Llama and Qwen3 checkpoints beside Qwen2, and RoPE scaling (linear, Llama 3.1's llama3, yarn; yarn
also in DeepSeek-V3's MLA, whose softmax scale it changes): transformers' fp32 logits with the no-cache
reference and with the paged serving path; the scaled frequencies are transformers' own; RoPE types
and configs not supported are refused by key; Qwen3's q/k norms on the GPU path (Triton's CPU
interpreter) equal the torch path."""

from __future__ import annotations

import json

import pytest
import torch

from dualpath.engine.kvcache import KVPool
from dualpath.engine.architecture import CheckpointError, RopeScaling, config_from_hf
from dualpath.engine.model import Batch, Rotary
from dualpath.engine.weights import load_pretrained
from tests.conftest import (assert_logits_close, assert_paged_steps_match, hf_logits, needs_triton_interpreter,
                            run_in_triton_interpreter)

BT = 16
VOCAB = 300
# A pretraining context shorter than the test sequences' reach (up to 60 tokens), so that every
# scaling's regions (kept, blended, scaled frequencies) are in play.
ORIGINAL = 32
SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256)


def _save(model, path):
    """Weights large enough that attention (and so RoPE) moves the logits; norms around 1 (q/k norms too)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1, 0.1) if "norm" in name else p.normal_(0, 0.1)
    model.save_pretrained(path)
    return path, model.eval()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """Llama 3.1's llama3 scaling; head_dim (24) unlike hidden / heads; tied embeddings; no biases."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(**SIZES, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True,
                                   rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                                                        low_freq_factor=1.0, high_freq_factor=4.0,
                                                        original_max_position_embeddings=ORIGINAL))
    torch.manual_seed(0)
    return _save(transformers.LlamaForCausalLM(cfg), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def llama_bias_dir(tmp_path_factory):
    """attention_bias=true (q, k, v and o biases), linear scaling, untied embeddings."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(**SIZES, num_key_value_heads=1, attention_bias=True, tie_word_embeddings=False,
                                   rope_parameters=dict(rope_type="linear", rope_theta=500.0, factor=3.0))
    torch.manual_seed(0)
    return _save(transformers.LlamaForCausalLM(cfg), tmp_path_factory.mktemp("llama_bias"))


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    """Per-head q/k RMSNorm before RoPE; yarn scaling (cos/sin times yarn's attention factor)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3Config(**SIZES, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
                                   rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                        original_max_position_embeddings=ORIGINAL))
    torch.manual_seed(0)
    return _save(transformers.Qwen3ForCausalLM(cfg), tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="module")
def dsv3_yarn_dir(tmp_path_factory):
    """DeepSeek-V3's MLA with its yarn (mscale != mscale_all_dim: cos/sin and the softmax scale both
    change); every layer dense (first_k_dense_replace = num_hidden_layers)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DeepseekV3Config(**SIZES, num_key_value_heads=4, first_k_dense_replace=2, q_lora_rank=24,
                                        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                                        moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                                        n_group=1, topk_group=1, rope_interleave=True, tie_word_embeddings=False,
                                        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=8.0,
                                                             original_max_position_embeddings=ORIGINAL,
                                                             beta_fast=32, beta_slow=1, mscale=0.8,
                                                             mscale_all_dim=1.0))
    torch.manual_seed(0)
    return _save(transformers.DeepseekV3ForCausalLM(cfg), tmp_path_factory.mktemp("dsv3yarn"))


FAMILIES = ["llama_dir", "llama_bias_dir", "qwen3_dir", "dsv3_yarn_dir"]


def test_configs_map_to_the_model(llama_dir, llama_bias_dir, qwen3_dir, dsv3_yarn_dir):
    llama, bias, qwen3, ds = (config_from_hf(d[0]) for d in (llama_dir, llama_bias_dir, qwen3_dir, dsv3_yarn_dir))
    assert (llama.head_dim, llama.qkv_bias, llama.o_bias, llama.qk_norm, llama.tie_embeddings) == (24, False, False,
                                                                                                  False, True)
    assert llama.rope_scaling == RopeScaling("llama3", factor=8.0, original_max_position_embeddings=ORIGINAL)
    assert (bias.qkv_bias, bias.o_bias, bias.n_kv_heads, bias.rope_theta) == (True, True, 1, 500.0)
    assert bias.rope_scaling.rope_type == "linear" and bias.rope_scaling.factor == 3.0
    assert (qwen3.qk_norm, qwen3.qkv_bias, qwen3.o_bias) == (True, False, False)
    assert qwen3.rope_scaling.rope_type == "yarn" and qwen3.rope_scaling.cos_sin_factor > 1
    assert qwen3.scale == 16 ** -0.5  # Qwen's softmax scale stays plain
    assert ds.moe is None and ds.scale == pytest.approx(24 ** -0.5 * (0.1 * torch.tensor(8.0).log().item() + 1) ** 2)


@pytest.mark.parametrize("which", FAMILIES)
def test_scaled_frequencies_are_transformers(which, request):
    """Rotary's tables: transformers' inverse frequencies and cos/sin factor for the same config."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    path, hf = request.getfixturevalue(which)
    cfg = config_from_hf(path)
    want_inv_freq, want_factor = ROPE_INIT_FUNCTIONS[cfg.rope_scaling.rope_type](hf.config)
    rope = Rotary.of(cfg)
    pos = torch.tensor([1, 17, 60])
    theta = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.rope_dim, 2, dtype=torch.float64) / cfg.rope_dim)
    got_inv_freq = cfg.rope_scaling.inv_freq(theta, cfg.rope_dim, cfg.rope_theta)
    torch.testing.assert_close(got_inv_freq.float(), want_inv_freq, rtol=1e-6, atol=0)
    assert cfg.rope_scaling.cos_sin_factor == pytest.approx(want_factor, rel=1e-12)
    emb = torch.outer(pos.double(), got_inv_freq).repeat(1, 2)
    torch.testing.assert_close(rope.cos[pos], (emb.cos() * want_factor).float(), rtol=0, atol=1e-6)
    assert not torch.allclose(got_inv_freq, theta)  # the scaling changes something


@pytest.mark.parametrize("which", FAMILIES)
def test_forward_reference_matches_transformers(which, request):
    path, hf = request.getfixturevalue(which)
    ours = load_pretrained(str(path))
    tokens = torch.randint(0, VOCAB, (60,), generator=torch.Generator().manual_seed(1))
    assert_logits_close(ours.forward_reference(tokens), hf_logits(hf, tokens), which)


@pytest.mark.parametrize("which", FAMILIES)
def test_paged_prefill_and_decode_match_transformers(which, request):
    """Two sequences: chunked prefills (the second chunk over cached blocks), then batched decode
    steps of both, teacher-forced; every position's logits are transformers' over the whole sequence."""
    path, hf = request.getfixturevalue(which)
    assert_paged_steps_match(load_pretrained(str(path)), hf, [50, 38], [40, 28], 16, VOCAB, which)


def _config(path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_the_legacy_rope_scaling_key_reads_the_same(qwen3_dir, llama_dir, tmp_path):
    """transformers 4's form: ``rope_scaling`` (``type`` or ``rope_type``) with rope_theta beside it."""
    for path, type_key in [(qwen3_dir[0], "type"), (llama_dir[0], "rope_type")]:
        hf = _config(path)
        params = dict(hf.pop("rope_parameters"))
        theta = params.pop("rope_theta")
        params[type_key] = params.pop("rope_type")
        (tmp_path / "config.json").write_text(json.dumps({**hf, "rope_theta": theta, "rope_scaling": params}))
        assert config_from_hf(tmp_path) == config_from_hf(path)


@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("rope_type", ["dynamic", "longrope", "su"])
def test_unsupported_rope_types_are_refused_by_key(qwen3_dir, tmp_path, key, rope_type):
    hf = _config(qwen3_dir[0])
    hf.pop("rope_parameters")
    hf[key] = {"rope_type": rope_type, "factor": 2.0, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=f"{key}.rope_type '{rope_type}' is not supported"):
        load_pretrained(str(tmp_path))


@pytest.mark.parametrize("which, change, key", [
    ("llama_dir", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}},
     "rope_parameters.low_freq_factor"),
    ("llama_bias_dir", {"rope_parameters": {"rope_type": "linear"}}, "rope_parameters.factor"),
    ("qwen3_dir", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ("qwen3_dir", {"use_sliding_window": True}, "use_sliding_window"),
    ("llama_dir", {"mlp_bias": True}, "mlp_bias"),
    ("llama_dir", {"num_key_value_heads": 3}, "n_kv_heads"),
])
def test_unsupported_configs_are_refused_by_key(which, change, key, request, tmp_path):
    path, _ = request.getfixturevalue(which)
    (tmp_path / "config.json").write_text(json.dumps({**_config(path), **change}))
    with pytest.raises(CheckpointError, match=key):
        load_pretrained(str(tmp_path))


# The GPU path of a Qwen3-shaped model (q|k|v GEMM, q/k head norms by the fused norm kernel, RoPE with
# yarn's tables + KV write, paged attention, o_proj bias) against its torch path: a ragged prefill step
# over cached blocks, then a decode step. On a CPU in Triton's interpreter (fp32), on a GPU compiled.
def compare_qwen3_paths(device: str, dtype: torch.dtype, tol: float) -> None:
    from dualpath.engine import attention
    from dualpath.engine.architecture import ModelConfig
    from dualpath.engine.model import Model

    cfg = ModelConfig(attn="gqa", vocab_size=128, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                      intermediate_size=96, qkv_bias=True, o_bias=True, qk_norm=True, max_position=256,
                      rope_scaling=RopeScaling("yarn", factor=4.0, original_max_position_embeddings=32))
    torch.manual_seed(1)
    model = Model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1, 0.1) if name.endswith("norm.weight") else p.normal_(0, 0.1)
    model = model.to(device, dtype).eval()
    pool = KVPool(cfg, 16, BT, device, dtype)

    def logits(seqs, ids, triton_path):
        attention.ENABLED = triton_path
        try:
            return model.forward_paged(ids.to(device), Batch.build(seqs, BT, device), pool.kv)
        finally:
            attention.ENABLED = True

    shapes = [(37, 1), (0, 5), (20, 11)]  # (cached, new)
    tables = [pool.allocator.alloc(pool.blocks_for(c + n + 1)) for c, n in shapes]
    gen = torch.Generator().manual_seed(2)
    for t, (c, _) in zip(tables, shapes):
        if c:
            logits([(t, 0, c)], torch.randint(0, 128, (c,), generator=gen), False)
    for seqs, n_ids in [([(t, c, n) for t, (c, n) in zip(tables, shapes)], sum(n for _, n in shapes)),
                        ([(t, c + n, 1) for t, (c, n) in zip(tables, shapes)], len(shapes))]:
        ids = torch.randint(0, 128, (n_ids,), generator=gen)
        before = pool.kv.clone()
        want = logits(seqs, ids, False)
        kv_want = pool.kv.clone()
        pool.kv.copy_(before)
        got = logits(seqs, ids, True)
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
        torch.testing.assert_close(pool.kv.float(), kv_want.float(), atol=tol, rtol=tol)


TRITON_SCRIPT = """
import torch
from tests.test_families import compare_qwen3_paths
compare_qwen3_paths("cpu", torch.float32, 1e-4)
print("ok")
"""


@needs_triton_interpreter
@pytest.mark.cluster
def test_qwen3_triton_path_in_the_interpreter_equals_its_torch_path():
    r = run_in_triton_interpreter(TRITON_SCRIPT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-4), (torch.bfloat16, 0.06)])
def test_qwen3_kernel_steps_equal_the_torch_path_on_gpu(dtype, tol):
    pytest.importorskip("triton")
    compare_qwen3_paths("cuda", dtype, tol)
