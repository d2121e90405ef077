"""`dualpath bench agreement`: do multi-turn conversations served by the cluster give the tokens of
a plain no-cache run of the same model (``forward_reference``), on every path?

Each policy runs a conversation of `turns` turns (greedy). Afterwards the reference model scores
the whole final sequence in one pass; a generated token agrees when it is the reference's argmax
given the same prefix (teacher-forced, so one early difference does not count twice). In fp32 the
expectation is identity.

In bf16 the cached and recomputed KV round differently, and a model with random weights has many
near-ties among its top logits, so bf16 also reports a tie-aware figure. The same weights run in
fp32 give the exact logits; the bf16 reference's own distance from them, per position, is the
rounding noise of a plain bf16 run. A served token is *within noise* when its exact logit is within
twice that noise of the exact maximum: no bf16 computation could tell the two apart. The bf16
reference's own strict agreement with the exact argmax is reported as the floor to compare with.
"""

from __future__ import annotations

import copy
import random
import tempfile

import torch

from dualpath.bench.common import bench_cluster, write_json
from dualpath.engine.weights import load_pretrained
from dualpath.launcher import LocalCluster, complete


def run(preset: str, dtype: str, device: str, policies: tuple[str, ...], turns: int, prompt_tokens: int,
        append_tokens: int, max_tokens: int, port: int, out: str) -> dict:
    rng = random.Random(0)
    conversations = {}
    with tempfile.TemporaryDirectory(prefix="dualpath-agree-") as work:
        cfg = bench_cluster(1, 1, preset, dtype, device, port, f"{work}/store")
        with LocalCluster(cfg, f"{work}/run") as c:
            for policy in policies:
                tokens, paths, generated = [rng.randrange(256) for _ in range(prompt_tokens)], [], []
                for _ in range(turns):
                    r = complete(c.url, {"prompt": tokens, "max_tokens": max_tokens, "temperature": 0,
                                         "dualpath_policy": policy})
                    out_ids = r["choices"][0]["token_ids"]
                    generated += list(range(len(tokens), len(tokens) + len(out_ids)))
                    paths.append(r["dualpath"]["path"])
                    tokens = tokens + out_ids + [rng.randrange(256) for _ in range(append_tokens)]
                conversations[policy] = (tokens, generated, paths)
    model = load_pretrained(preset, device.split(",")[0] if device != "cpu" else "cpu", getattr(torch, dtype))
    exact_model = copy.deepcopy(model).float() if model.dtype != torch.float32 else None  # same weights, fp32
    result = {"bench": "agreement", "preset": preset, "dtype": dtype, "device": device, "policies": {}}
    for policy, (tokens, generated, paths) in conversations.items():
        ids = torch.tensor(tokens, device=model.device)
        with torch.no_grad():
            ref = model.forward_reference(ids).cpu()
        entry = {"generated": len(generated), "paths": paths, "final_tokens": len(tokens),
                 "agree": sum(int(ref[p - 1].argmax()) == tokens[p] for p in generated)}
        entry["agreement"] = entry["agree"] / len(generated)
        if exact_model is not None:
            entry.update(_against_exact(exact_model, ids, ref, tokens, generated))
        result["policies"][policy] = entry
    write_json(out, result)
    return result


def _against_exact(exact_model, ids: torch.Tensor, ref: torch.Tensor, tokens: list[int], generated: list[int]) -> dict:
    """Served tokens against the same weights run in fp32 (see the module docstring)."""
    with torch.no_grad():
        exact = exact_model.forward_reference(ids).cpu()
    noise = (ref - exact).abs().amax(-1)  # per position: how far plain bf16 rounding moved the logits
    within = sum(float(exact[p - 1, tokens[p]]) >= float(exact[p - 1].max() - 2 * noise[p - 1]) for p in generated)
    n = len(generated)
    return {"exact_agreement": sum(int(exact[p - 1].argmax()) == tokens[p] for p in generated) / n,
            "reference_exact_agreement": sum(int(exact[p - 1].argmax()) == int(ref[p - 1].argmax())
                                             for p in generated) / n,
            "within_noise": within / n, "median_noise": float(noise[[p - 1 for p in generated]].median())}
