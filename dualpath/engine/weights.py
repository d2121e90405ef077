"""Model weights: seeded random presets, or a Hugging Face safetensors checkpoint loaded by name.

Supported checkpoints: ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM`` (per-head q/k norms) and
``LlamaForCausalLM`` (GQA), and ``DeepseekV2ForCausalLM`` / ``DeepseekV3ForCausalLM`` (MLA), dense
or MoE: V2's softmax routing (``greedy``, ``group_limited_greedy``) and V3's sigmoid ``noaux_tc``.
Routed experts load from the per-expert names the released checkpoints use and transformers'
``save_pretrained`` writes (``mlp.experts.{i}.gate_proj.weight``), or from transformers' fused
in-memory form (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I], as
``save_pretrained(save_original_format=False)`` writes it). Tensors are read with safetensors;
nothing is ever unpickled. RoPE may be plain or scaled (``linear``, Llama 3.1's ``llama3``, ``yarn``),
as the config's ``rope_scaling`` (or transformers 5's ``rope_parameters``) names.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from dualpath.engine.model import ROPE_TYPES, TOPK_METHODS, Model, ModelConfig, MoEConfig, RopeScaling, Rotary

PRESETS: dict[str, ModelConfig] = {
    # CI-sized: a few hundred thousand parameters, fp32 on a laptop CPU in milliseconds.
    "tiny-gqa": ModelConfig(attn="gqa", vocab_size=512, hidden_size=64, n_layers=2, n_heads=4,
                            n_kv_heads=2, head_dim=16, intermediate_size=128, max_position=65536),
    "tiny-mla": ModelConfig(attn="mla", vocab_size=512, hidden_size=64, n_layers=2, n_heads=4,
                            q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                            v_head_dim=16, intermediate_size=128, rope_interleave=True, max_position=65536),
    # tiny-mla whose second layer is an MoE, routed as small-moe is
    "tiny-moe": ModelConfig(attn="mla", vocab_size=512, hidden_size=64, n_layers=2, n_heads=4,
                            q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                            v_head_dim=16, intermediate_size=128, rope_interleave=True, max_position=65536,
                            moe=MoEConfig(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                          n_shared_experts=1, first_k_dense_replace=1, scoring_func="sigmoid",
                                          topk_method="noaux_tc", n_group=2, topk_group=1, norm_topk_prob=True,
                                          routed_scaling_factor=2.5)),
    # GPU benchmarks. Attention shapes of Qwen2.5-0.5B and DeepSeek-V2-Lite (random weights,
    # a 32K vocabulary instead of their 150K/100K to keep the embedding small).
    "small-gqa": ModelConfig(attn="gqa", vocab_size=32768, hidden_size=896, n_layers=24, n_heads=14,
                             n_kv_heads=2, head_dim=64, intermediate_size=4864, rope_theta=1e6,
                             max_position=65536, tie_embeddings=True),
    "small-mla": ModelConfig(attn="mla", vocab_size=32768, hidden_size=2048, n_layers=27, n_heads=16,
                             q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                             v_head_dim=128, intermediate_size=10944, rope_interleave=True, max_position=65536),
    # small-mla with DeepSeek-V2-Lite's MoE layers, narrowed to 8 routed experts (top 2) and 1 shared
    # (V2-Lite: 64 routed, top 6, 2 shared; experts of 1408 alike), routed as DeepSeek-V3 routes:
    # sigmoid scores, a correction bias, 2 groups of which a token's experts come from 1.
    # About 2.6B parameters (small-mla: 2.3B), 1.25B of them active per token.
    "small-moe": ModelConfig(attn="mla", vocab_size=32768, hidden_size=2048, n_layers=27, n_heads=16,
                             q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                             v_head_dim=128, intermediate_size=10944, rope_interleave=True, max_position=65536,
                             moe=MoEConfig(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=1408,
                                           n_shared_experts=1, first_k_dense_replace=1, scoring_func="sigmoid",
                                           topk_method="noaux_tc", n_group=2, topk_group=1, norm_topk_prob=True,
                                           routed_scaling_factor=2.5)),
}

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM", "DeepseekV2ForCausalLM",
                           "DeepseekV3ForCausalLM")
GQA_ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM")


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded; the message names the file, field or tensor."""


def _init_random(model: Model, seed: int) -> None:
    """Deterministic on every device: draw on the CPU with a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def config_from_hf(path: Path) -> ModelConfig:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON: {e}") from e
    arch = (hf.get("architectures") or ["<none>"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{cfg_file}: architecture {arch!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

    def need(key: str):
        if key not in hf:
            raise CheckpointError(f"{cfg_file}: missing field {key!r} required by {arch}")
        return hf[key]

    if hf.get("quantization_config"):
        method = (hf["quantization_config"] or {}).get("quant_method", "?")
        raise CheckpointError(f"{cfg_file}: quantization_config ({method!r}) is not supported: "
                              "only unquantized weights (e.g. the bf16 conversion of an fp8 checkpoint)")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{cfg_file}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
    if hf.get("mlp_bias"):
        raise CheckpointError(f"{cfg_file}: mlp_bias=true is not supported")
    max_position = int(hf.get("max_position_embeddings", 32768))
    theta, scaling = _rope_from_hf(hf, cfg_file, max_position)
    common = dict(vocab_size=need("vocab_size"), hidden_size=need("hidden_size"),
                  n_layers=need("num_hidden_layers"), n_heads=need("num_attention_heads"),
                  intermediate_size=need("intermediate_size"), rope_theta=theta, rope_scaling=scaling,
                  rms_eps=float(hf.get("rms_norm_eps", 1e-6)), max_position=max_position,
                  tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    if arch in GQA_ARCHITECTURES:
        if hf.get("use_sliding_window"):
            raise CheckpointError(f"{cfg_file}: use_sliding_window=true is not supported (full attention only)")
        n_heads = common["n_heads"]
        # Qwen2: q/k/v biases, none on o_proj; Llama and Qwen3: attention_bias on all four (default off).
        # A head_dim the file leaves out is transformers' default: hidden / heads, Qwen3's 128.
        bias = True if arch == "Qwen2ForCausalLM" else bool(hf.get("attention_bias", False))
        head_dim = hf.get("head_dim") or (128 if arch == "Qwen3ForCausalLM" else common["hidden_size"] // n_heads)
        try:
            return ModelConfig(attn="gqa", n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=head_dim,
                               qkv_bias=bias, o_bias=bias and arch != "Qwen2ForCausalLM",
                               qk_norm=arch == "Qwen3ForCausalLM", **common).validate()
        except ValueError as e:
            raise CheckpointError(f"{cfg_file}: {e}") from e
    if hf.get("attention_bias"):
        raise CheckpointError(f"{cfg_file}: attention_bias=true is not supported for MLA")
    cfg = ModelConfig(attn="mla", q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=need("kv_lora_rank"),
                      qk_nope_head_dim=need("qk_nope_head_dim"), qk_rope_head_dim=need("qk_rope_head_dim"),
                      v_head_dim=need("v_head_dim"),
                      rope_interleave=bool(hf.get("rope_interleave", True)) or arch == "DeepseekV2ForCausalLM",
                      moe=_moe_from_hf(hf, arch, cfg_file, need), **common)
    if cfg.moe is not None and not any(cfg.is_moe_layer(l) for l in range(cfg.n_layers)):
        cfg.moe = None  # every layer dense (first_k_dense_replace >= num_hidden_layers)
    try:
        return cfg.validate()
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from e


def _rope_from_hf(hf: dict, cfg_file: Path, max_position: int) -> tuple[float, RopeScaling | None]:
    """(rope_theta, its scaling or None) from a config.json: transformers 4's ``rope_scaling`` (theta
    beside it) or transformers 5's ``rope_parameters`` (theta inside), with transformers' defaults."""
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = hf.get(key) or {}
    if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
        raise CheckpointError(f"{cfg_file}: {key} per layer type is not supported (one RoPE for every layer)")
    theta = float(rope.get("rope_theta") or hf.get("rope_theta") or 10000.0)
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type == "default":
        return theta, None
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(f"{cfg_file}: {key}.rope_type {rope_type!r} is not supported "
                              f"(supported: default, {', '.join(ROPE_TYPES)})")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise CheckpointError(f"{cfg_file}: {key}.partial_rotary_factor {partial!r} is not supported (only 1.0)")

    def get(name: str, default=None):
        value = rope.get(name)
        if value is None and default is None:
            raise CheckpointError(f"{cfg_file}: {key}.{name} is required by rope_type {rope_type!r}")
        return default if value is None else value

    # as transformers: a top-level original_max_position_embeddings (Phi-3's place) wins, then the
    # scaling's own, then max_position_embeddings
    original = int(hf.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
                   or max_position)
    if rope_type == "linear":
        scaling = RopeScaling("linear", factor=float(get("factor")))
    elif rope_type == "llama3":
        scaling = RopeScaling("llama3", factor=float(get("factor")), original_max_position_embeddings=original,
                              low_freq_factor=float(get("low_freq_factor")),
                              high_freq_factor=float(get("high_freq_factor")))
    else:  # yarn; with no factor, the extension max_position_embeddings makes (DeepSeek-V3's reading)
        scaling = RopeScaling("yarn", factor=float(get("factor", max_position / original)),
                              original_max_position_embeddings=original,
                              beta_fast=float(rope.get("beta_fast") or 32),
                              beta_slow=float(rope.get("beta_slow") or 1),
                              mscale=rope.get("mscale"), mscale_all_dim=rope.get("mscale_all_dim"),
                              attention_factor=rope.get("attention_factor"),
                              truncate=bool(rope.get("truncate", True)))
    try:
        return theta, scaling.validate()
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: {key}: {e}") from e


# What transformers assumes for an MoE key a config.json leaves out (its DeepseekV2Config / V3Config
# defaults); V2 routes with softmax scores, V3 with sigmoid ones by noaux_tc, whatever the file says.
_MOE_DEFAULTS = {
    "DeepseekV2ForCausalLM": dict(first_k_dense_replace=0, n_shared_experts=2, routed_scaling_factor=1.0,
                                  topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
                                  n_group=None, topk_group=None),
    "DeepseekV3ForCausalLM": dict(first_k_dense_replace=3, n_shared_experts=1, routed_scaling_factor=2.5,
                                  topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                                  n_group=8, topk_group=4),
}
_TOPK_METHODS = {"DeepseekV2ForCausalLM": ("greedy", "group_limited_greedy"), "DeepseekV3ForCausalLM": ("noaux_tc",)}


def _moe_from_hf(hf: dict, arch: str, cfg_file: Path, need) -> MoEConfig | None:
    """The MoE layers of a DeepSeek config.json; None when it has no routed experts."""
    if not hf.get("n_routed_experts"):
        return None  # as DeepSeek's code reads it: no routed experts, every layer dense
    defaults = _MOE_DEFAULTS[arch]

    def get(key: str):
        return hf[key] if key in hf else defaults[key]

    method, scoring = get("topk_method"), get("scoring_func")
    if method not in _TOPK_METHODS[arch]:
        raise CheckpointError(f"{cfg_file}: topk_method {method!r} is not supported for {arch} "
                              f"(supported: {', '.join(_TOPK_METHODS[arch])})")
    if scoring != TOPK_METHODS[method]:
        raise CheckpointError(f"{cfg_file}: scoring_func {scoring!r} is not supported for {arch} with topk_method "
                              f"{method!r} (supported: {TOPK_METHODS[method]!r})")
    top_k = need("num_experts_per_tok")
    if arch == "DeepseekV2ForCausalLM" and get("norm_topk_prob") and top_k > 1:
        # DeepSeek-V2's own code then renormalises the weights instead of scaling them, and
        # transformers ignores the key: two definitions, so neither is guessed
        raise CheckpointError(f"{cfg_file}: norm_topk_prob=true is not supported for {arch}")
    return MoEConfig(n_routed_experts=hf["n_routed_experts"], num_experts_per_tok=top_k,
                     moe_intermediate_size=need("moe_intermediate_size"),
                     n_shared_experts=get("n_shared_experts") or 0,
                     first_k_dense_replace=get("first_k_dense_replace") or 0,
                     moe_layer_freq=hf.get("moe_layer_freq") or 1, scoring_func=scoring, topk_method=method,
                     n_group=get("n_group") or 1, topk_group=get("topk_group") or 1,
                     norm_topk_prob=bool(get("norm_topk_prob")),
                     routed_scaling_factor=float(1.0 if get("routed_scaling_factor") is None
                                                 else get("routed_scaling_factor")))


def _load_hf_tensors(model: Model, path: Path) -> None:
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files (pickle checkpoints are never loaded)")
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                where[k] = f
    def read(hf_name: str) -> torch.Tensor:
        with safe_open(str(where[hf_name]), framework="pt") as sf:
            return sf.get_tensor(hf_name)

    fused: dict[str, torch.Tensor] = {}  # the fused experts tensors of the layer being loaded

    def expert_from_fused(hf_name: str) -> torch.Tensor | None:
        """Expert e's gate/up/down weight from transformers' fused form, when the file has that."""
        m = _EXPERT.fullmatch(hf_name)
        if m is None:
            return None
        prefix, e, proj = m.group(1), int(m.group(2)), m.group(3)
        source = f"{prefix}.gate_up_proj" if proj in ("gate", "up") else f"{prefix}.down_proj"
        if source not in where:
            return None
        if source not in fused:
            if not any(k.startswith(prefix + ".") for k in fused):
                fused.clear()  # a new layer: drop the last one's
            fused[source] = read(source)
        t = fused[source]
        if e >= len(t):
            return None
        if proj == "down":
            return t[e]  # [E, H, I]
        inter = t.shape[1] // 2  # [E, 2I, H]: gate rows, then up rows
        return t[e, :inter] if proj == "gate" else t[e, inter:]

    params = dict(model.named_parameters(remove_duplicate=True))
    with torch.no_grad():
        for name, p in params.items():
            hf_name = name if name == "lm_head.weight" else f"model.{name}"
            t = read(hf_name) if hf_name in where else expert_from_fused(hf_name)
            if t is None:
                if name == "lm_head.weight" and model.cfg.tie_embeddings:
                    continue
                raise CheckpointError(f"{path}: missing tensor {hf_name!r} (shape {tuple(p.shape)})")
            if tuple(t.shape) != tuple(p.shape):
                raise CheckpointError(f"{path}: tensor {hf_name!r} has shape {tuple(t.shape)}, "
                                      f"expected {tuple(p.shape)}")
            p.copy_(t.to(p.dtype))


_EXPERT = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight")


def model_identity(path_or_preset: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[ModelConfig, bytes]:
    """(architecture, fingerprint) without loading weights: what the coordinator needs to hash blocks.

    The fingerprint (16 bytes) names weights, architecture and dtype. It is part of every KV block's
    key and header, so KV of one model is never served to another."""
    if path_or_preset in PRESETS:
        cfg, source = ModelConfig(**vars(PRESETS[path_or_preset])), f"preset:{path_or_preset}:seed={seed}"
    else:
        path = Path(path_or_preset)
        if not path.is_dir():
            raise CheckpointError(f"{path_or_preset!r} is neither a preset ({', '.join(PRESETS)}) "
                                  "nor a checkpoint directory")
        cfg = config_from_hf(path)
        # A checkpoint is named by its tensor files' names, sizes and mtimes (cheap, no full hash).
        stats = [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in sorted(path.glob("*.safetensors"))]
        source = f"hf:{path.resolve()}:{stats}"
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{source}|{sorted(vars(cfg).items())}|{dtype}".encode())
    return cfg, h.digest()


def load_pretrained(path_or_preset: str, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, seed: int = 0) -> Model:
    """A preset name (seeded random weights) or a Hugging Face checkpoint directory."""
    cfg, fp = model_identity(path_or_preset, dtype, seed)
    model = Model(cfg)
    if path_or_preset in PRESETS:
        _init_random(model, seed)
    else:
        _load_hf_tensors(model, Path(path_or_preset))
    model = model.cast(device, dtype).eval()
    # Rotary tables stay fp32 whatever the weights' dtype (rebuilt: a bf16 round trip would lose bits).
    model.rope = Rotary.of(cfg).to(device)
    model.fingerprint = fp
    return model
