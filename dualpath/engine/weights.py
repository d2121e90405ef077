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

import re
from pathlib import Path

import torch

from dualpath.engine.architecture import PRESETS, CheckpointError, model_identity
from dualpath.engine.model import Model, Rotary


def _init_random(model: Model, seed: int) -> None:
    """Deterministic on every device: draw on the CPU with a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)




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


def load_pretrained(path_or_preset: str, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, seed: int = 0) -> Model:
    """A preset name (seeded random weights) or a Hugging Face checkpoint directory."""
    cfg, fp = model_identity(path_or_preset, str(dtype).removeprefix("torch."), seed)
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
