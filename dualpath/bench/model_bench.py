"""`dualpath bench model`: prefill and decode tokens/s of one engine's model on one device."""

from __future__ import annotations

import torch

from dualpath.bench.common import timed, write_json
from dualpath.engine.kvcache import KVPool
from dualpath.engine.model import Batch
from dualpath.engine.weights import load_pretrained


def run(preset: str, device: str, dtype: str, prompt_tokens: int, batch: int, context: int,
        block_tokens: int, out: str) -> dict:
    torch_dtype = getattr(torch, dtype)
    model = load_pretrained(preset, device=device, dtype=torch_dtype)
    per_seq = max(prompt_tokens, context + 1)
    pool = KVPool(model.cfg, batch * (-(-per_seq // block_tokens) + 1) + 1, block_tokens, device, torch_dtype)
    tables = [pool.allocator.alloc(pool.blocks_for(per_seq + 1)) for _ in range(batch)]
    gen = torch.Generator().manual_seed(0)

    tokens = torch.randint(0, model.cfg.vocab_size, (prompt_tokens,), generator=gen).to(device)
    pre_batch = Batch.build([(tables[0], 0, prompt_tokens)], block_tokens, device)
    t_prefill = timed(lambda: model.forward_paged(tokens, pre_batch, pool.kv), device)

    dec_tokens = torch.randint(0, model.cfg.vocab_size, (batch,), generator=gen).to(device)
    dec_batch = Batch.build([(t, context, 1) for t in tables], block_tokens, device)
    t_decode = timed(lambda: model.forward_paged(dec_tokens, dec_batch, pool.kv), device, repeat=5)

    result = {"bench": "model", "preset": preset, "device": device, "dtype": dtype,
              "prefill": {"tokens": prompt_tokens, "seconds": t_prefill, "tokens_per_s": prompt_tokens / t_prefill},
              "decode": {"batch": batch, "context": context, "step_seconds": t_decode,
                         "tokens_per_s": batch / t_decode}}
    write_json(out, result)
    return result
