"""What a model is, without torch: its architecture (``ModelConfig``, with ``MoEConfig`` and
``RopeScaling``), the presets, a Hugging Face checkpoint's ``config.json`` read into one, and the
fingerprint that names a model in every KV block's key.

The coordinator hashes prompts with the fingerprint and never runs the model, so it imports this
module and not torch (a second of start-up for every cluster). engine/model.py builds the model
from these configs; engine/weights.py loads its tensors.

Supported checkpoints: ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM`` (per-head q/k norms) and
``LlamaForCausalLM`` (GQA), and ``DeepseekV2ForCausalLM`` / ``DeepseekV3ForCausalLM`` (MLA), dense
or MoE: V2's softmax routing (``greedy``, ``group_limited_greedy``) and V3's sigmoid ``noaux_tc``.
RoPE may be plain or scaled (``linear``, Llama 3.1's ``llama3``, ``yarn``), as the config's
``rope_scaling`` (or transformers 5's ``rope_parameters``) names.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch  # inv_freq's tensors

TOPK_METHODS = {  # DeepSeek's routing methods -> the scoring function each is defined with
    "greedy": "softmax",                # V2: the top-k experts by score
    "group_limited_greedy": "softmax",  # V2: top-k within the topk_group groups of highest max score
    "noaux_tc": "sigmoid",              # V3: top-k by score + bias within the groups of highest top-2 sum
}


@dataclass
class MoEConfig:
    """DeepSeek's mixture of experts (the field names are DeepSeek's config.json keys).

    An MoE layer's MLP is ``n_shared_experts`` shared SwiGLU experts (run on every token, as one MLP
    of ``n_shared_experts * moe_intermediate_size``) plus the sum of ``num_experts_per_tok`` routed
    experts (each of ``moe_intermediate_size``) chosen per token by the gate, weighted by its scores.
    """

    n_routed_experts: int = 8
    num_experts_per_tok: int = 2       # k: routed experts per token
    moe_intermediate_size: int = 32    # width of each routed expert
    n_shared_experts: int = 1          # 0: no shared experts
    first_k_dense_replace: int = 1     # layers [0, k) keep a dense MLP
    moe_layer_freq: int = 1            # from layer k on, every freq-th layer is MoE (DeepSeek's remote code)
    scoring_func: str = "softmax"      # "softmax" (V2) or "sigmoid" (V3) of the gate's logits
    topk_method: str = "greedy"        # a key of TOPK_METHODS
    n_group: int = 1                   # experts are split into n_group equal groups ...
    topk_group: int = 1                # ... and a token's experts come from its topk_group best groups
    norm_topk_prob: bool = False       # the k weights are renormalised to sum to 1 ...
    routed_scaling_factor: float = 1.0  # ... then multiplied by this

    def validate(self) -> "MoEConfig":
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"model config moe '{key}' = {getattr(self, key)!r}: {why}")

        if self.topk_method not in TOPK_METHODS:
            raise bad("topk_method", f"expected one of {', '.join(TOPK_METHODS)}")
        if self.scoring_func != TOPK_METHODS[self.topk_method]:
            raise bad("scoring_func", f"topk_method {self.topk_method!r} is defined with "
                                      f"{TOPK_METHODS[self.topk_method]!r} scores")
        for key in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "moe_layer_freq",
                    "n_group", "topk_group"):
            if getattr(self, key) <= 0:
                raise bad(key, "must be > 0")
        if self.n_shared_experts < 0 or self.first_k_dense_replace < 0:
            raise bad("n_shared_experts" if self.n_shared_experts < 0 else "first_k_dense_replace", "must be >= 0")
        if self.n_routed_experts % self.n_group:
            raise bad("n_group", f"must divide n_routed_experts = {self.n_routed_experts}")
        if self.topk_group > self.n_group:
            raise bad("topk_group", f"must be <= n_group = {self.n_group}")
        # k experts must fit in the groups kept, so a dropped group's expert is never chosen (how the
        # group limit masks them, 0 in V2's code and -inf in V3's, then cannot matter)
        grouped = self.topk_method != "greedy" and self.n_group > 1
        room = self.topk_group * (self.n_routed_experts // self.n_group) if grouped else self.n_routed_experts
        if self.num_experts_per_tok > room:
            raise bad("num_experts_per_tok", f"more than the {room} experts the kept groups hold")
        if self.topk_method == "noaux_tc" and grouped and self.n_routed_experts // self.n_group < 2:
            raise bad("n_group", "noaux_tc scores a group by its top 2 experts: groups need >= 2")
        return self


ROPE_TYPES = ("linear", "llama3", "yarn")  # the RoPE scalings RopeScaling implements


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context ``factor`` times longer (its paper's Eq. 21)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass
class RopeScaling:
    """RoPE scaled for contexts longer than pretraining (the keys of a config's ``rope_scaling`` /
    ``rope_parameters``, with transformers' defaults). Each type rescales the rotary frequencies; yarn
    also multiplies cos and sin by ``cos_sin_factor`` and, in DeepSeek's MLA, the softmax scale by
    ``softmax_factor``. Everything lands in ``Rotary``'s tables and ``ModelConfig.scale``, so every
    path (the torch one and the fused kernels, which read those tables) runs it unchanged.
    """

    rope_type: str = "linear"            # a key of ROPE_TYPES
    factor: float = 1.0                  # how many times longer than the pretraining context
    original_max_position_embeddings: int = 8192  # llama3, yarn: the pretraining context ("old" below)
    low_freq_factor: float = 1.0         # llama3: wavelengths over old / low_freq_factor slowed by factor,
    high_freq_factor: float = 4.0        # under old / high_freq_factor kept, a smooth blend between
    beta_fast: float = 32.0              # yarn: dims turning over beta_fast times in old kept,
    beta_slow: float = 1.0               # under beta_slow times slowed by factor, a linear ramp between
    mscale: float | None = None          # yarn: cos/sin times yarn_mscale(factor, mscale) / yarn_mscale(factor,
    mscale_all_dim: float | None = None  # mscale_all_dim); MLA's softmax scale times yarn_mscale(factor, this)²
    attention_factor: float | None = None  # yarn: the cos/sin factor itself, where the config names it
    truncate: bool = True                # yarn: the ramp's ends rounded outwards to whole dims

    def validate(self) -> "RopeScaling":
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"model config rope_scaling 'rope_type' = {self.rope_type!r}: "
                             f"expected one of {', '.join(ROPE_TYPES)}")
        if self.factor <= 0:
            raise ValueError(f"model config rope_scaling 'factor' = {self.factor!r}: must be > 0")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"model config rope_scaling 'high_freq_factor' = {self.high_freq_factor!r}: "
                             f"must be > low_freq_factor = {self.low_freq_factor!r}")
        return self

    def inv_freq(self, inv_freq: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
        """The scaled frequencies of a rotary of ``dim`` dims, from its plain ones theta^(-2i/dim)."""
        import torch  # here only: the configs are read without torch (the module's docstring says why)

        if self.rope_type == "linear":  # positions divided by factor
            return inv_freq / self.factor
        old = self.original_max_position_embeddings
        if self.rope_type == "llama3":
            wavelen = 2 * math.pi / inv_freq
            smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            blend = (1 - smooth) * inv_freq / self.factor + smooth * inv_freq
            return torch.where(wavelen < old / self.high_freq_factor, inv_freq,
                               torch.where(wavelen > old / self.low_freq_factor, inv_freq / self.factor, blend))

        def dim_turning(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times in old
            return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = dim_turning(self.beta_fast), dim_turning(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        high = high + 0.001 if low == high else high  # as transformers: no division by zero
        ramp = ((torch.arange(dim // 2, dtype=inv_freq.dtype) - low) / (high - low)).clamp(0, 1)  # 1: interpolate
        return inv_freq / self.factor * ramp + inv_freq * (1 - ramp)

    @property
    def cos_sin_factor(self) -> float:
        """What cos and sin are multiplied by (yarn's attention temperature; 1 otherwise)."""
        if self.rope_type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)

    @property
    def softmax_factor(self) -> float:
        """DeepSeek's MLA multiplies its softmax scale by this (its reference code and transformers'
        ``yarn_apply_mscale`` do), so that the non-rotary dims are scaled as well."""
        return yarn_mscale(self.factor, self.mscale_all_dim) ** 2 if self.mscale_all_dim else 1.0


@dataclass
class ModelConfig:
    """Architecture of the decoder.

    attn: "gqa" or "mla".
    vocab_size, hidden_size, n_layers, n_heads, intermediate_size: the usual.
    n_kv_heads, head_dim, qkv_bias: GQA only; o_bias: o_proj has a bias (Llama / Qwen3 attention_bias);
    qk_norm: Qwen3's per-head RMSNorm of q and k (over head_dim) before RoPE.
    q_lora_rank: MLA low-rank query (None = a full q projection); kv_lora_rank: latent width;
    qk_nope_head_dim / qk_rope_head_dim: per-head query split into non-rotary and rotary parts;
    v_head_dim: per-head value width; rope_interleave: DeepSeek's interleaved rotary pairs.
    rope_scaling: None = plain RoPE; else its frequency scaling (linear, llama3, yarn).
    softmax_scale: None = 1/sqrt(query head width) (times yarn's softmax_factor for MLA).
    moe: None = a dense MLP in every layer; else the MoE layers' shape and routing (DeepSeek).
    """

    attn: str = "gqa"
    vocab_size: int = 512
    hidden_size: int = 64
    n_layers: int = 2
    n_heads: int = 4
    intermediate_size: int = 128
    n_kv_heads: int = 2
    head_dim: int = 16
    qkv_bias: bool = True
    o_bias: bool = False
    qk_norm: bool = False
    q_lora_rank: int | None = None
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    rope_interleave: bool = False
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_eps: float = 1e-6
    max_position: int = 32768
    tie_embeddings: bool = False
    softmax_scale: float | None = None
    moe: MoEConfig | None = None

    def is_moe_layer(self, l: int) -> bool:
        """Layer l's MLP is an MoE: DeepSeek's rule (layers from first_k_dense_replace on, every
        moe_layer_freq-th; transformers builds the same layers for the released freq of 1)."""
        m = self.moe
        return m is not None and l >= m.first_k_dense_replace and l % m.moe_layer_freq == 0

    @property
    def kv_width(self) -> int:
        """Cached values per token per layer."""
        if self.attn == "gqa":
            return 2 * self.n_kv_heads * self.head_dim
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def rope_dim(self) -> int:
        return self.head_dim if self.attn == "gqa" else self.qk_rope_head_dim

    @property
    def scale(self) -> float:
        if self.softmax_scale is not None:
            return self.softmax_scale
        if self.attn == "gqa":
            return self.head_dim ** -0.5
        mscale = self.rope_scaling.softmax_factor if self.rope_scaling is not None else 1.0
        return (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5 * mscale

    def validate(self) -> "ModelConfig":
        if self.attn not in ("gqa", "mla"):
            raise ValueError(f"model config 'attn' = {self.attn!r}: expected 'gqa' or 'mla'")
        for name in ("vocab_size", "hidden_size", "n_layers", "n_heads", "intermediate_size", "max_position"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model config '{name}' = {getattr(self, name)!r}: must be > 0")
        if self.attn == "gqa" and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            raise ValueError(f"model config 'n_kv_heads' = {self.n_kv_heads}: must divide n_heads = {self.n_heads}")
        if self.rope_dim % 2:
            raise ValueError(f"model config rotary dim = {self.rope_dim}: must be even")
        if self.moe is not None:
            self.moe.validate()
        if self.rope_scaling is not None:
            self.rope_scaling.validate()
        return self


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


def model_identity(path_or_preset: str, dtype: str = "float32", seed: int = 0) -> tuple[ModelConfig, bytes]:
    """(architecture, fingerprint) without loading weights: what the coordinator needs to hash blocks.
    ``dtype`` is the KV's (a key of config.DTYPE_BYTES).

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
    # the dtype as torch names it, as it always was: stores written before keep their fingerprint
    h.update(f"{source}|{sorted(vars(cfg).items())}|torch.{dtype}".encode())
    return cfg, h.digest()
