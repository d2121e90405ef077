"""The model: Hugging Face parity of forward_reference, and paged layer-by-layer execution
(chunked prefill over cached blocks + batched decode) equal to forward_reference."""

import json
import random

import pytest
import torch

from dualpath.engine.kvcache import KVPool
from dualpath.engine.model import Batch, Packed, _gather, flash_available, last_token_index
from dualpath.engine.architecture import CheckpointError
from dualpath.engine.weights import load_pretrained

BT = 16  # small blocks so that short sequences cross many block boundaries


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF zero-initialises biases; give them values so the test covers them
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("qwen2")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DeepseekV3Config(vocab_size=300, hidden_size=64, intermediate_size=96,
                                        moe_intermediate_size=32, num_hidden_layers=2, first_k_dense_replace=2,
                                        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24,
                                        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                                        max_position_embeddings=512, n_routed_experts=4, num_experts_per_tok=2,
                                        n_group=1, topk_group=1, rope_interleave=True, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("dsv3")
    model.save_pretrained(path)
    return path, model


@pytest.mark.parametrize("which", ["qwen2_dir", "deepseek_dir"])
def test_forward_reference_matches_transformers(which, request):
    path, hf = request.getfixturevalue(which)
    ours = load_pretrained(str(path))
    tokens = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens.unsqueeze(0)).logits[0]
    got = ours.forward_reference(tokens)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match="LlamaForCausalLM"):
        load_pretrained(str(tmp_path))


def test_missing_and_misshaped_tensors_are_named(qwen2_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = qwen2_dir
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    tensors = load_file(str(path / "model.safetensors"))
    broken = dict(tensors)
    del broken["model.layers.1.mlp.up_proj.weight"]
    save_file(broken, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        load_pretrained(str(tmp_path))
    broken = dict(tensors)
    broken["model.norm.weight"] = torch.ones(7)
    save_file(broken, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.norm.weight.*shape"):
        load_pretrained(str(tmp_path))


def test_bad_config_and_unknown_preset_fail_clearly(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match="neither a preset"):
        load_pretrained("no-such-preset")


def test_moe_config_without_its_expert_keys_is_refused_by_name(tmp_path):
    """MoE layers load (tests/test_moe.py); a config that leaves out what sizes them is named."""
    cfg = {"architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 300, "hidden_size": 64,
           "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 96,
           "n_routed_experts": 8, "first_k_dense_replace": 1, "kv_lora_rank": 32,
           "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="num_experts_per_tok"):
        load_pretrained(str(tmp_path))


def _prefill(model, pool, table, tokens, cached, chunks, device="cpu"):
    """Prefill tokens[cached:] on top of `cached` tokens already in the pool, in chunks, layer by layer."""
    logits, pos = [], cached
    for n in chunks:
        batch = Batch.build([(table, pos, n)], BT, device)
        h = model.embed(tokens[pos : pos + n])
        for l in range(model.cfg.n_layers):
            h = model.layer(l, h, batch, pool.layer(l))
        logits.append(model.logits(h))
        pos += n
    return torch.cat(logits)


@pytest.mark.parametrize("cached", [0, 1, BT - 1, BT, BT + 5, 3 * BT, 70])
def test_prefill_over_cached_blocks_equals_reference(preset, cached):
    model = load_pretrained(preset)
    tokens = torch.randint(0, model.cfg.vocab_size, (90,), generator=torch.Generator().manual_seed(cached))
    ref = model.forward_reference(tokens)
    pool = KVPool(model.cfg, 32, BT, "cpu", torch.float32)
    table = pool.allocator.alloc(pool.blocks_for(len(tokens)))
    if cached:  # the cached part is computed separately, as a previous turn would have
        _prefill(model, pool, table, tokens, 0, [cached])
    rest = len(tokens) - cached
    chunks = [min(13, rest)] + ([rest - 13] if rest > 13 else [])
    got = _prefill(model, pool, table, tokens, cached, chunks)
    torch.testing.assert_close(got, ref[cached:], atol=2e-5, rtol=1e-4)


def test_batched_decode_with_mixed_lengths_equals_reference(preset):
    model = load_pretrained(preset)
    rng = random.Random(0)
    pool = KVPool(model.cfg, 64, BT, "cpu", torch.float32)
    seqs = []
    for i, length in enumerate([5, 16, 33, 47]):
        toks = [rng.randrange(model.cfg.vocab_size) for _ in range(length)]
        table = pool.allocator.alloc(pool.blocks_for(length + 12))
        logits = _prefill(model, pool, table, torch.tensor(toks), 0, [length])
        toks.append(int(logits[-1].argmax()))
        seqs.append((toks, table))
    for _ in range(10):  # 10 batched greedy decode steps; every sequence crosses block boundaries
        batch = Batch.build([(t, len(s) - 1, 1) for s, t in seqs], BT, "cpu")
        logits = model.forward_paged(torch.tensor([s[-1] for s, _ in seqs]), batch, pool.kv)
        for (s, _), row in zip(seqs, logits[last_token_index(batch)]):
            s.append(int(row.argmax()))
    for s, _ in seqs:
        ref_tokens = s[:]  # greedy tokens must equal a no-cache forward over the full sequence
        ref = model.forward_reference(torch.tensor(ref_tokens[:-1]))
        n_prompt = len(s) - 11
        assert ref[n_prompt - 1 :].argmax(-1).tolist() == s[n_prompt:]


def _appends_step(model, device: str, dtype: torch.dtype):
    """Agents' next turns in one prefill step: appends of 1 to 9 tokens after cached contexts of
    different lengths (one inside its first block). -> (batch, pool, ids, sequences)."""
    gen = torch.Generator().manual_seed(5)
    pool = KVPool(model.cfg, 64, BT, device, dtype)
    seqs = []
    for cached, new in [(40, 3), (7, 9), (64, 1), (33, 5)]:
        tokens = torch.randint(0, model.cfg.vocab_size, (cached + new,), generator=gen)
        table = pool.allocator.alloc(pool.blocks_for(cached + new))
        _prefill(model, pool, table, tokens.to(device), 0, [cached], device)
        seqs.append((tokens, table, cached, new))
    batch = Batch.build([(table, cached, new) for _, table, cached, new in seqs], BT, device)
    ids = torch.cat([tokens[cached:] for tokens, _, cached, _ in seqs]).to(device)
    return batch, pool, ids, seqs


def _step_logits(model, batch, pool, ids) -> torch.Tensor:
    h = model.embed(ids)
    for l in range(model.cfg.n_layers):
        h = model.layer(l, h, batch, pool.layer(l))
    return model.logits(h)


def test_a_step_of_several_appends_equals_the_reference(preset):
    model = load_pretrained(preset)
    batch, pool, ids, seqs = _appends_step(model, "cpu", torch.float32)
    got, start = _step_logits(model, batch, pool, ids), 0
    for tokens, _, cached, new in seqs:
        torch.testing.assert_close(got[start : start + new], model.forward_reference(tokens)[cached:],
                                   atol=2e-5, rtol=1e-4)
        start += new


def test_packed_step_gathers_every_context_in_order():
    """Packed (the GPU's one attention call per layer): its slots gather each sequence's context
    exactly as the per-sequence path does, and its starts split queries and keys per sequence."""
    seqs = [([5, 2, 9], 40, 3), ([7], 7, 9), ([1, 3, 4, 8, 0], 64, 1)]
    p = Packed.build(seqs, BT, torch.device("cpu"))
    kv_layer = torch.randn(10, BT, 6)
    want = torch.cat([_gather(kv_layer, torch.tensor(t), c + n) for t, c, n in seqs])
    torch.testing.assert_close(kv_layer.view(-1, 6)[p.key_slots], want, atol=0, rtol=0)
    assert p.cu_q.tolist() == [0, 3, 12, 13] and p.cu_k.tolist() == [0, 43, 59, 124]
    assert (p.max_q, p.max_k) == (9, 65) and p.cu_q.dtype == torch.int32


@pytest.mark.skipif(not flash_available(torch.device("cuda")) if torch.cuda.is_available() else True,
                    reason="needs a GPU with the flash kernel")
def test_packed_flash_step_equals_one_call_per_sequence_on_gpu():
    """bf16 on the GPU: the one flash call per layer gives the per-sequence path's logits within bf16
    noise, and is as close as that path to the fp32 no-cache reference (a causal mask aligned to the
    wrong corner, or a context gathered out of order, would be far off)."""
    model = load_pretrained("tiny-gqa", device="cuda", dtype=torch.bfloat16)
    batch, pool, ids, seqs = _appends_step(model, "cuda", torch.bfloat16)
    assert batch.packed is not None
    packed = _step_logits(model, batch, pool, ids).float()
    batch.packed = None
    plain = _step_logits(model, batch, pool, ids).float()
    torch.testing.assert_close(packed, plain, atol=0.05, rtol=0.05)
    fp32 = load_pretrained("tiny-gqa", device="cuda")  # the same seeded weights, unrounded
    ref = torch.cat([fp32.forward_reference(tokens.cuda())[cached:] for tokens, _, cached, _ in seqs])
    err_packed, err_plain = (packed - ref).abs().max().item(), (plain - ref).abs().max().item()
    assert err_packed <= 1.5 * err_plain + 0.01, (err_packed, err_plain)


def test_bucketed_decode_step_matches_the_plain_step(preset):
    """engine/graphs.py's step (batch and block tables padded to buckets, padding rows on a scratch
    block), run eagerly, gives the logits of the plain step and the same KV."""
    from dualpath.engine.graphs import DecodeGraphs

    torch.manual_seed(0)
    model = load_pretrained(preset)
    bt, n_blocks = 4, 40
    kv_plain = torch.zeros(model.cfg.n_layers, n_blocks, bt, model.cfg.kv_width)
    seqs = [(list(range(0, 5)), 17), (list(range(5, 12)), 26), (list(range(12, 14)), 6)]  # (blocks, context)
    for blocks, ctx in seqs:  # fill each sequence's cache with a prefill
        tokens = torch.randint(0, model.cfg.vocab_size, (ctx,))
        model.forward_paged(tokens, Batch.build([(blocks, 0, ctx)], bt, "cpu"), kv_plain)
    kv_graph, kv_cpu = kv_plain.clone(), kv_plain.clone()
    last = [7, 9, 11]
    plain = model.forward_paged(torch.tensor(last), Batch.build([(b, c, 1) for b, c in seqs], bt, "cpu"), kv_plain)
    graphs = DecodeGraphs(model, kv_graph, bt, scratch_block=n_blocks - 1, capture=False, pad=True)
    stepped = graphs.run([(tok, ctx, blocks) for tok, (blocks, ctx) in zip(last, seqs)])
    assert stepped.shape == plain.shape and torch.allclose(stepped, plain, atol=1e-5)
    assert list(graphs.steps) == [(4, 8)]  # 3 sequences -> a batch of 4; 7 blocks -> tables of 8
    # the same KV was written, and the padding row wrote nowhere but the scratch block
    torch.testing.assert_close(kv_graph[:, : n_blocks - 1], kv_plain[:, : n_blocks - 1], atol=1e-6, rtol=1e-5)
    assert kv_plain[:, n_blocks - 1].abs().sum() == 0 and kv_graph[:, n_blocks - 1].abs().sum() > 0
    # as a DE on a CPU runs it: not padded, nothing bucketed, the same logits and KV
    on_cpu = DecodeGraphs(model, kv_cpu, bt, scratch_block=n_blocks - 1)
    assert torch.allclose(on_cpu.run([(tok, ctx, blocks) for tok, (blocks, ctx) in zip(last, seqs)]), plain, atol=1e-5)
    assert not on_cpu.steps and torch.equal(kv_cpu, kv_plain)
