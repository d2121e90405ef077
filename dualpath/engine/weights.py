"""Model weights: seeded random presets, or a Hugging Face safetensors checkpoint loaded by name.

Supported checkpoints: ``Qwen2ForCausalLM`` (GQA) and ``DeepseekV2ForCausalLM`` /
``DeepseekV3ForCausalLM`` with dense layers only (MLA). Tensors are read with safetensors;
nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from dualpath.engine.model import Model, ModelConfig, Rotary

PRESETS: dict[str, ModelConfig] = {
    # CI-sized: a few hundred thousand parameters, fp32 on a laptop CPU in milliseconds.
    "tiny-gqa": ModelConfig(attn="gqa", vocab_size=512, hidden_size=64, n_layers=2, n_heads=4,
                            n_kv_heads=2, head_dim=16, intermediate_size=128, max_position=65536),
    "tiny-mla": ModelConfig(attn="mla", vocab_size=512, hidden_size=64, n_layers=2, n_heads=4,
                            q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                            v_head_dim=16, intermediate_size=128, rope_interleave=True, max_position=65536),
    # GPU benchmarks. Attention shapes of Qwen2.5-0.5B and DeepSeek-V2-Lite (random weights,
    # a 32K vocabulary instead of their 150K/100K to keep the embedding small).
    "small-gqa": ModelConfig(attn="gqa", vocab_size=32768, hidden_size=896, n_layers=24, n_heads=14,
                             n_kv_heads=2, head_dim=64, intermediate_size=4864, rope_theta=1e6,
                             max_position=65536, tie_embeddings=True),
    "small-mla": ModelConfig(attn="mla", vocab_size=32768, hidden_size=2048, n_layers=27, n_heads=16,
                             q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                             v_head_dim=128, intermediate_size=10944, rope_interleave=True, max_position=65536),
}

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")


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

    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = (rope.get("rope_type") or (hf.get("rope_scaling") or {}).get("type") or "default")
    if rope_type not in ("default", None):
        raise CheckpointError(f"{cfg_file}: rope scaling {rope_type!r} is not supported (only plain RoPE)")
    common = dict(vocab_size=need("vocab_size"), hidden_size=need("hidden_size"),
                  n_layers=need("num_hidden_layers"), n_heads=need("num_attention_heads"),
                  intermediate_size=need("intermediate_size"), rope_theta=float(theta),
                  rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
                  max_position=int(hf.get("max_position_embeddings", 32768)),
                  tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    if arch == "Qwen2ForCausalLM":
        n_heads = common["n_heads"]
        return ModelConfig(attn="gqa", n_kv_heads=hf.get("num_key_value_heads", n_heads),
                           head_dim=hf.get("head_dim") or common["hidden_size"] // n_heads, qkv_bias=True,
                           **common).validate()
    n_routed = hf.get("n_routed_experts") or 0
    first_dense = hf.get("first_k_dense_replace", 0) or 0
    if n_routed and first_dense < common["n_layers"]:
        raise CheckpointError(f"{cfg_file}: MoE layers (n_routed_experts={n_routed}, first_k_dense_replace="
                              f"{first_dense} < num_hidden_layers={common['n_layers']}) are not supported; "
                              "only dense DeepSeek layers")
    if hf.get("attention_bias"):
        raise CheckpointError(f"{cfg_file}: attention_bias=true is not supported for MLA")
    return ModelConfig(attn="mla", q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=need("kv_lora_rank"),
                       qk_nope_head_dim=need("qk_nope_head_dim"), qk_rope_head_dim=need("qk_rope_head_dim"),
                       v_head_dim=need("v_head_dim"),
                       rope_interleave=bool(hf.get("rope_interleave", True)) or arch == "DeepseekV2ForCausalLM",
                       **common).validate()


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
    params = dict(model.named_parameters(remove_duplicate=True))
    with torch.no_grad():
        for name, p in params.items():
            hf_name = name if name == "lm_head.weight" else f"model.{name}"
            if hf_name not in where:
                if name == "lm_head.weight" and model.cfg.tie_embeddings:
                    continue
                raise CheckpointError(f"{path}: missing tensor {hf_name!r} (shape {tuple(p.shape)})")
            with safe_open(str(where[hf_name]), framework="pt") as sf:
                t = sf.get_tensor(hf_name)
            if tuple(t.shape) != tuple(p.shape):
                raise CheckpointError(f"{path}: tensor {hf_name!r} has shape {tuple(t.shape)}, "
                                      f"expected {tuple(p.shape)}")
            p.copy_(t.to(p.dtype))


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
    model = model.to(device=device, dtype=dtype).eval()
    # Rotary tables stay fp32 whatever the weights' dtype (rebuilt: a bf16 round trip would lose bits).
    model.rope = Rotary(cfg.rope_dim, cfg.rope_theta, cfg.max_position, cfg.rope_interleave).to(device)
    model.fingerprint = fp
    return model
