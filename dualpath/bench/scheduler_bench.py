"""`dualpath bench scheduler`: what one scheduling decision costs the coordinator, at cluster scale.

The paper's scheduler serves 48P96D (144 engines) with fewer than 10 CPU cores. This times the real
coordinator's per-request path on one core, step by step, for a cluster of that size: the prefix
key chain of a prompt (`block_chain`), the prefix lookup in the store (a file stat per block, on
a real directory holding the hit blocks), the cluster view (each engine's last heartbeat plus what
was assigned since), the policy (`policy.choose`), and the bookkeeping of the decision (`_assign`).
Decisions/s are reported for the policy plus bookkeeping alone and for the whole path.

The engines are registry entries only (`EngineEntry` with heartbeat-like loads, refreshed every
`heartbeat_every` decisions as heartbeats would): no engine process runs, as none is involved in
the timed steps. The HTTP and control-plane messages that follow a decision are not timed.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from collections import Counter

from dualpath.bench.common import write_json
from dualpath.config import local_cluster
from dualpath.sched.coordinator import Coordinator, EngineEntry
from dualpath.sched.policy import RequestInfo, choose
from dualpath.storage.keys import block_chain


class _Link:
    """An engine's control connection as the registry sees it: open (no traffic is timed here)."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()


def _heartbeat(rng: random.Random, role: str, cfg) -> dict:
    """A plausible load report: some queued prefill or running decode, read queue, free memory."""
    e = cfg.engine
    return {"queued_prefill_tokens": rng.randrange(0, 64_000) if role == "prefill" else 0,
            "running_decode_tokens": rng.randrange(0, 2_000_000) if role == "decode" else 0,
            "read_queue_bytes": rng.randrange(0, 2 << 30), "free_buffer_blocks": e.buffer_blocks,
            "free_hbm_blocks": e.hbm_blocks}


def run(prefill: int, decode: int, prompt_tokens: int, hit_ratio: float, requests: int, policy: str,
        heartbeat_every: int, out: str, seed: int = 0) -> dict:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="dualpath-schedbench-") as store:
        cfg = local_cluster(prefill, decode)
        cfg.store.root = store
        cfg.engine.buffer_blocks = cfg.engine.hbm_blocks = 1 << 20  # room is not what is measured
        coord = Coordinator(cfg)
        now = time.monotonic()
        for spec in cfg.engines:
            e = coord.engines[spec.name] = EngineEntry(spec.name, spec.role, spec.node, (spec.host, spec.port),
                                                       _Link(), now)
            e.heard(_heartbeat(rng, spec.role, cfg), drain_rates=False)
            e.last_seen = now + 3600
        # the prompts' hit blocks are stored, as earlier turns would have left them
        bt, prompts = coord.bt, []
        layers = [bytes(coord.store.shape.bytes_per_layer)] * coord.store.shape.n_layers
        for _ in range(min(requests, 16)):
            tokens = [rng.randrange(256) for _ in range(prompt_tokens)]
            for key in block_chain(tokens, coord.fingerprint, bt)[: int(prompt_tokens * hit_ratio) // bt]:
                coord.store.write(key, layers)
            prompts.append(tokens)
        spent: Counter[str] = Counter()
        hits = set()
        t_all = time.perf_counter()
        for i in range(requests):
            tokens = prompts[i % len(prompts)]
            t0 = time.perf_counter()
            chain = block_chain(tokens, coord.fingerprint, bt)
            t1 = time.perf_counter()
            hit = min(coord.store.lookup(chain), (len(tokens) - 1) // bt)
            hits.add(hit)
            t2 = time.perf_counter()
            view = coord.cluster_view()
            t3 = time.perf_counter()
            info = RequestInfo(len(tokens), hit, coord.block_bytes, 64, coord.blocks_for(len(tokens)),
                               coord.blocks_for(len(tokens) + 64))
            d = choose(policy, info, view)
            coord._assign(d, info)
            t4 = time.perf_counter()
            spent.update({"block_chain": t1 - t0, "prefix_lookup": t2 - t1, "cluster_view": t3 - t2,
                          "policy_and_bookkeeping": t4 - t3})
            if (i + 1) % heartbeat_every == 0:  # heartbeats arrive: fresh loads, assignments folded in
                for e in coord.engines.values():
                    e.heard(_heartbeat(rng, e.role, cfg), drain_rates=False)
                    e.last_seen = now + 3600
        wall = time.perf_counter() - t_all
    per_decision_us = {k: v / requests * 1e6 for k, v in spent.items()}
    result = {"bench": "scheduler", "engines": prefill + decode, "prefill": prefill, "decode": decode,
              "prompt_tokens": prompt_tokens, "hit_ratio": hit_ratio, "block_tokens": bt, "policy": policy,
              "requests": requests, "hit_blocks": min(hits), "per_decision_us": per_decision_us,
              "decisions_per_s": {"policy_and_bookkeeping": requests / spent["policy_and_bookkeeping"],
                                  "with_cluster_view": requests / (spent["policy_and_bookkeeping"]
                                                                   + spent["cluster_view"]),
                                  "whole_path": requests / sum(spent.values())},
              "wall_s": wall}
    write_json(out, result)
    return result
