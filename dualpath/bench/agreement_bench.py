"""`dualpath bench agreement`: do multi-turn conversations served by the cluster give the tokens of
a plain no-cache run of the same model (``forward_reference``), on every path?

Each policy runs a conversation of `turns` turns (greedy). Afterwards the reference model scores
the whole final sequence in one pass; a generated token agrees when it is the reference's argmax
given the same prefix (teacher-forced, so one early difference does not count twice). In fp32 the
expectation is identity; in bf16 the cached and recomputed KV round differently, so the figure is
an agreement rate.
"""

from __future__ import annotations

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
    result = {"bench": "agreement", "preset": preset, "dtype": dtype, "device": device, "policies": {}}
    for policy, (tokens, generated, paths) in conversations.items():
        with torch.no_grad():
            logits = model.forward_reference(torch.tensor(tokens, device=model.embed_tokens.weight.device))
        pred = logits.argmax(-1).cpu()
        agree = sum(int(pred[p - 1]) == tokens[p] for p in generated)
        result["policies"][policy] = {"generated": len(generated), "agree": agree,
                                      "agreement": agree / len(generated), "paths": paths,
                                      "final_tokens": len(tokens)}
    write_json(out, result)
    return result
