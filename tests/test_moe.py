"""DeepSeek MoE layers (engine/model.py's Gate and MoE): the logits of transformers' DeepseekV2 and
DeepseekV3 MoE models, with the no-cache reference and with the paged serving path; routing methods
and configs that are not supported are refused by name; a 1P2D cluster serving an MoE checkpoint
gives transformers' greedy tokens on paths A and B."""

from __future__ import annotations

import json

import pytest
import torch

from dualpath.engine.kvcache import KVPool
from dualpath.engine.architecture import CheckpointError, MoEConfig, ModelConfig, config_from_hf
from dualpath.engine.model import Batch, Gate, MoE, last_token_index
from dualpath.engine.weights import load_pretrained
from dualpath.launcher import LocalCluster, complete
from tests.test_serving import cluster_config
from tests.conftest import (assert_logits_close, assert_paged_steps_match, hf_logits, needs_triton_interpreter,
                            run_in_triton_interpreter)

BT = 16
VOCAB = 300

# Shared by both checkpoints: 3 layers, the first dense; 8 routed experts, 2 per token.
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
              first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32,
              qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=512,
              n_routed_experts=8, num_experts_per_tok=2, tie_word_embeddings=False)


def _save(model, path, **kw):
    """Weights of a size at which routing and experts move the logits (transformers draws them at
    0.02, where every expert's output is lost in the residual); V3's correction bias nonzero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.15)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)
    model.save_pretrained(path, **kw)
    return path, model.eval()


@pytest.fixture(scope="module")
def v2_dir(tmp_path_factory):
    """DeepSeek-V2: softmax scores, group_limited_greedy (2 groups of 4, a token's 2 experts from the
    group of the best max: with as many groups kept as experts chosen, a max-scored limit would never
    bind), no q low-rank (as V2-Lite), 2 shared experts."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DeepseekV2Config(**COMMON, q_lora_rank=None, n_shared_experts=2, n_group=2, topk_group=1,
                                        topk_method="group_limited_greedy", routed_scaling_factor=1.5)
    torch.manual_seed(0)
    return _save(transformers.DeepseekV2ForCausalLM(cfg), tmp_path_factory.mktemp("dsv2moe"))


@pytest.fixture(scope="module")
def v3_dir(tmp_path_factory):
    """DeepSeek-V3: sigmoid scores, noaux_tc with a correction bias (4 groups of 2, the best 2 by top-2
    sum kept), normalised weights scaled by 2.5."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DeepseekV3Config(**COMMON, q_lora_rank=24, n_shared_experts=1, n_group=4, topk_group=2,
                                        routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=True)
    torch.manual_seed(0)
    return _save(transformers.DeepseekV3ForCausalLM(cfg), tmp_path_factory.mktemp("dsv3moe"))


@pytest.mark.parametrize("which", ["v2_dir", "v3_dir"])
def test_forward_reference_matches_transformers(which, request):
    path, hf = request.getfixturevalue(which)
    ours = load_pretrained(str(path))
    assert [type(layer.mlp).__name__ for layer in ours.layers] == ["MLP", "MoE", "MoE"]
    tokens = torch.randint(0, VOCAB, (48,), generator=torch.Generator().manual_seed(1))
    assert_logits_close(ours.forward_reference(tokens), hf_logits(hf, tokens), which)


def test_fused_experts_checkpoint_loads_the_same_model(v2_dir, tmp_path):
    """transformers' in-memory form (save_original_format=False: experts.gate_up_proj / down_proj)."""
    path, hf = v2_dir
    hf.save_pretrained(tmp_path, save_original_format=False)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert "model.layers.1.mlp.experts.gate_up_proj" in f.keys()
    tokens = torch.arange(40) % VOCAB
    torch.testing.assert_close(load_pretrained(str(tmp_path)).forward_reference(tokens),
                               load_pretrained(str(path)).forward_reference(tokens), atol=0, rtol=0)


def test_routing_depends_on_the_group_limit_and_the_bias(v2_dir, v3_dir):
    """The checkpoints exercise what they claim to: some tokens' experts change without V2's group
    limit, or without V3's correction bias (so matching transformers covers both)."""
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(3))
    v2 = load_pretrained(str(v2_dir[0])).layers[1].mlp.gate
    v3 = load_pretrained(str(v3_dir[0])).layers[1].mlp.gate
    for gate, change in [(v2, dict(topk_method="greedy")), (v3, dict(n_group=1, topk_group=1))]:
        plain = Gate(ModelConfig(hidden_size=64, moe=MoEConfig(**{**vars(gate.moe), **change})))
        plain.load_state_dict(gate.state_dict())
        assert not torch.equal(gate(x)[1].sort(-1)[0], plain(x)[1].sort(-1)[0])
    without_bias = Gate(ModelConfig(hidden_size=64, moe=v3.moe))
    without_bias.weight.data.copy_(v3.weight)
    assert v3.e_score_correction_bias.abs().sum() > 0
    assert not torch.equal(v3(x)[1].sort(-1)[0], without_bias(x)[1].sort(-1)[0])


@pytest.mark.parametrize("which", ["v2_dir", "v3_dir"])
def test_paged_prefill_and_decode_match_transformers(which, request):
    """Two sequences: chunked prefills (the second chunk over cached blocks), then batched decode
    steps of both, teacher-forced; every position's logits are transformers' over the whole sequence."""
    path, hf = request.getfixturevalue(which)
    assert_paged_steps_match(load_pretrained(str(path)), hf, [45, 30], [35, 20], 32, VOCAB, which)


def _step(model, pool, seqs, ids) -> torch.Tensor:
    return model.forward_paged(ids, Batch.build(seqs, BT, "cpu"), pool.kv)


def test_tiny_moe_preset_serves_the_reference_tokens():
    """The CI-sized preset: a step of appends over cached blocks, then batched greedy decode, give
    forward_reference's logits and greedy tokens."""
    model = load_pretrained("tiny-moe")
    assert type(model.layers[1].mlp) is MoE and model.has_moe
    gen = torch.Generator().manual_seed(4)
    pool = KVPool(model.cfg, 64, BT, "cpu", torch.float32)
    seqs = []
    for cached, new in [(40, 3), (7, 9), (33, 5)]:
        tokens = torch.randint(0, model.cfg.vocab_size, (cached + new,), generator=gen).tolist()
        table = pool.allocator.alloc(pool.blocks_for(cached + new + 8))
        _step(model, pool, [(table, 0, cached)], torch.tensor(tokens[:cached]))
        seqs.append((tokens, table, cached))
    batch = [(t, c, len(s) - c) for s, t, c in seqs]
    logits = _step(model, pool, batch, torch.tensor([x for s, _, c in seqs for x in s[c:]]))
    start = 0
    for s, _, c in seqs:
        torch.testing.assert_close(logits[start : start + len(s) - c], model.forward_reference(torch.tensor(s))[c:],
                                   atol=2e-5, rtol=1e-4)
        start += len(s) - c
    for s, row in zip(seqs, logits[last_token_index(Batch.build(batch, BT, "cpu"))]):
        s[0].append(int(row.argmax()))
    for _ in range(6):
        b = Batch.build([(t, len(s) - 1, 1) for s, t, _ in seqs], BT, "cpu")
        rows = model.forward_paged(torch.tensor([s[-1] for s, _, _ in seqs]), b, pool.kv)
        for (s, _, _), row in zip(seqs, rows):
            s.append(int(row.argmax()))
    for s, _, _ in seqs:
        ref = model.forward_reference(torch.tensor(s[:-1]))
        assert ref[-7:].argmax(-1).tolist() == s[-7:]


def test_the_dense_form_for_cuda_graphs_equals_the_grouped_one():
    """MoE._routed_dense (what a captured decode step runs) sums what _routed_grouped sums."""
    moe = load_pretrained("tiny-moe").layers[1].mlp
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(5))
    weights, indices = moe.gate(x)
    torch.testing.assert_close(moe._routed_dense(x, weights, indices), moe._routed_grouped(x, weights, indices),
                               atol=1e-6, rtol=1e-5)


def test_bf16_model_keeps_its_gates_in_fp32():
    model = load_pretrained("tiny-moe", dtype=torch.bfloat16)
    gate = model.layers[1].mlp.gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert model.dtype == torch.bfloat16 and model.layers[1].mlp.experts[0].up_proj.weight.dtype == torch.bfloat16
    fp32 = load_pretrained("tiny-moe")
    assert torch.equal(gate.weight, fp32.layers[1].mlp.gate.weight)  # not rounded on the way
    assert model.forward_reference(torch.arange(20)).isfinite().all()


def _config(path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.mark.parametrize("which, change, key", [
    ("v2_dir", {"topk_method": "random_topk"}, "topk_method"),
    ("v3_dir", {"topk_method": "greedy"}, "topk_method"),
    ("v2_dir", {"scoring_func": "sigmoid"}, "scoring_func"),
    ("v3_dir", {"scoring_func": "softmax"}, "scoring_func"),
    ("v2_dir", {"norm_topk_prob": True}, "norm_topk_prob"),
    ("v3_dir", {"n_group": 3}, "n_group"),
    ("v2_dir", {"num_experts_per_tok": 5}, "num_experts_per_tok"),  # more than the kept group holds
    ("v3_dir", {"hidden_act": "gelu"}, "hidden_act"),
    ("v3_dir", {"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
])
def test_unsupported_moe_configs_are_refused_by_key(which, change, key, request, tmp_path):
    path, _ = request.getfixturevalue(which)
    (tmp_path / "config.json").write_text(json.dumps({**_config(path), **change}))
    with pytest.raises(CheckpointError, match=key):
        load_pretrained(str(tmp_path))


def test_config_keys_map_to_the_moe_layers(v3_dir, tmp_path):
    path, _ = v3_dir
    cfg = config_from_hf(path)
    assert cfg.moe == MoEConfig(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                n_shared_experts=1, first_k_dense_replace=1, scoring_func="sigmoid",
                                topk_method="noaux_tc", n_group=4, topk_group=2, norm_topk_prob=True,
                                routed_scaling_factor=2.5)
    hf = {**_config(path), "num_hidden_layers": 6, "moe_layer_freq": 2}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert [config_from_hf(tmp_path).is_moe_layer(l) for l in range(6)] == [False, False, True, False, True, False]
    (tmp_path / "config.json").write_text(json.dumps({**hf, "first_k_dense_replace": 6}))
    assert config_from_hf(tmp_path).moe is None  # every layer dense: a dense model
    (tmp_path / "config.json").write_text(json.dumps({**hf, "n_routed_experts": None}))
    assert config_from_hf(tmp_path).moe is None


# The model's GPU path (fused norms, paged attention; MoE layers through MoE.forward) against its torch
# path in Triton's CPU interpreter: a ragged prefill step, then a bucketed decode step.
TRITON_SCRIPT = """
import torch
from dualpath.engine import attention
from dualpath.engine.graphs import DecodeGraphs
from dualpath.engine.kvcache import KVPool
from dualpath.engine.model import Batch, MoE
from dualpath.engine.weights import load_pretrained
BT = 16
model = load_pretrained("tiny-moe")
assert isinstance(model.layers[1].mlp, MoE)
def logits(seqs, ids, triton_path):
    attention.ENABLED = triton_path
    try:
        return model.forward_paged(ids, Batch.build(seqs, BT, "cpu"), pool.kv)
    finally:
        attention.ENABLED = True
pool = KVPool(model.cfg, 24, BT, "cpu", torch.float32)
shapes = [(37, 1), (0, 5), (20, 11)]
tables = [pool.allocator.alloc(pool.blocks_for(c + n + 1)) for c, n in shapes]
gen = torch.Generator().manual_seed(2)
for t, (c, _) in zip(tables, shapes):
    if c:
        logits([(t, 0, c)], torch.randint(0, 512, (c,), generator=gen), False)
seqs = [(t, c, n) for t, (c, n) in zip(tables, shapes)]
ids = torch.randint(0, 512, (sum(n for _, n in shapes),), generator=gen)
before = pool.kv.clone()
want = logits(seqs, ids, False)
pool.kv.copy_(before)
got = logits(seqs, ids, True)
assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
last = [3, 9, 11]
before = pool.kv.clone()
want = logits([(t, c + n, 1) for t, (c, n) in zip(tables, shapes)], torch.tensor(last), False)
pool.kv.copy_(before)
graphs = DecodeGraphs(model, pool.kv, BT, pool.allocator.alloc(1)[0], capture=False, pad=True)
got = graphs.run([(tok, c + n, t) for tok, t, (c, n) in zip(last, tables, shapes)])
assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), ("decode", (got - want).abs().max())
print("ok")
"""


@needs_triton_interpreter
@pytest.mark.cluster
def test_the_moe_models_triton_path_in_the_interpreter_equals_its_torch_path():
    r = run_in_triton_interpreter(TRITON_SCRIPT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def _hf_greedy(hf, tokens: list[int], n: int) -> list[int]:
    seq = list(tokens)
    for _ in range(n):
        seq.append(int(hf_logits(hf, torch.tensor(seq))[-1].argmax()))
    return seq[len(tokens):]


@pytest.mark.cluster
def test_a_cluster_serves_the_moe_checkpoint_with_transformers_tokens(v3_dir, tmp_path):
    """1P2D on the V3 MoE checkpoint: each policy's conversation gives transformers' greedy tokens,
    and its second turn loads its cached KV on the path the policy names."""
    path, hf = v3_dir
    cfg = cluster_config(2, "tiny-moe", str(tmp_path / "store"))
    cfg.model.weights = str(path)
    gen = torch.Generator().manual_seed(6)
    with LocalCluster(cfg, str(tmp_path / "run")) as c:
        for policy, side in [("pe-read", "A"), ("de-read", "B")]:
            tokens = torch.randint(0, 256, (37,), generator=gen).tolist()
            for turn in range(2):
                r = complete(c.url, {"prompt": tokens, "max_tokens": 6, "temperature": 0, "dualpath_policy": policy})
                out = r["choices"][0]["token_ids"]
                assert out == _hf_greedy(hf, tokens, 6), f"{policy} turn {turn + 1}"
                if turn:
                    assert r["dualpath"]["path"] == side
                    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] >= 2 * BT
                tokens = tokens + out + torch.randint(0, 256, (11,), generator=gen).tolist()
