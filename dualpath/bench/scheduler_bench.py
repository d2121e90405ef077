"""`dualpath bench scheduler`: what one scheduling decision costs the coordinator, at cluster scale.

The paper's scheduler serves 48P96D (144 engines) with fewer than 10 CPU cores. This times the real
coordinator's per-request path on one core, step by step, for a cluster of that size: the prefix
key chain of a prompt (`block_chain`), the prefix lookup in the store (a file stat per block, on
a real directory holding the hit blocks), then the policy (`policy.choose` on the coordinator's
`ClusterView`) and the bookkeeping of the decision (`_assign`). Decisions/s are reported for the
whole path, for the policy plus bookkeeping within it, and for the same decisions back to back.

The last two differ by the CPU caches: within the whole path a decision follows hundreds of file
stats and runs on cold caches (on this project's 2-core VM, 3-4x slower); back to back is what one
core sustains when it only schedules, the per-request key chains and lookups done on other cores.

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

from dualpath.protocol import EngineReport
from dualpath.bench.common import write_json
from dualpath.config import local_cluster
from dualpath.sched.coordinator import Coordinator, EngineEntry
from dualpath.sched.policy import RequestInfo, choose
from dualpath.storage.keys import block_chain


class _Link:
    """An engine's control connection as the registry sees it: open (no traffic is timed here)."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()


def _heartbeat(rng: random.Random, role: str, cfg) -> EngineReport:
    """A plausible report: some queued prefill or running decode, read queue, free memory."""
    e = cfg.engine
    return EngineReport(queued_prefill_tokens=rng.randrange(0, 64_000) if role == "prefill" else 0,
                        running_decode_tokens=rng.randrange(0, 2_000_000) if role == "decode" else 0,
                        read_queue_bytes=rng.randrange(0, 2 << 30), free_buffer_blocks=e.buffer_blocks,
                        free_hbm_blocks=e.hbm_blocks)


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
            coord.engines[spec.name] = EngineEntry(spec.name, spec.role, spec.node, (spec.host, spec.port), _Link(),
                                                   now)

        def heartbeats() -> None:  # fresh loads, in which the assignments so far show
            for e in coord.engines.values():
                coord.view.put(e.heard(_heartbeat(rng, e.role, cfg), drain_rates=False))
                e.last_seen = now + 3600

        heartbeats()
        # the prompts' hit blocks are stored, as earlier turns would have left them
        bt, prompts = coord.bt, []
        layers = [bytes(coord.store.shape.bytes_per_layer)] * coord.store.shape.n_layers
        for _ in range(min(requests, 16)):
            tokens = [rng.randrange(256) for _ in range(prompt_tokens)]
            for key in block_chain(tokens, coord.fingerprint, bt)[: int(prompt_tokens * hit_ratio) // bt]:
                coord.store.write(key, layers)
            prompts.append(tokens)

        def decide(tokens: list[int], hit: int) -> None:  # the timed policy and bookkeeping
            info = RequestInfo(len(tokens), hit, coord.block_bytes, 64, coord.blocks_for(len(tokens)),
                               coord.blocks_for(len(tokens) + 64))
            coord._assign(choose(policy, info, coord.cluster_view()), info)

        # 1. the whole path, request after request: the decision runs on caches the lookup's
        # hundreds of file stats have just cooled
        spent: Counter[str] = Counter()
        hits = []
        t_all = time.perf_counter()
        for i in range(requests):
            tokens = prompts[i % len(prompts)]
            t0 = time.perf_counter()
            chain = block_chain(tokens, coord.fingerprint, bt)
            t1 = time.perf_counter()
            hits.append(min(coord.store.lookup(chain), (len(tokens) - 1) // bt))
            t2 = time.perf_counter()
            decide(tokens, hits[-1])
            t3 = time.perf_counter()
            spent.update({"block_chain": t1 - t0, "prefix_lookup": t2 - t1, "policy_and_bookkeeping": t3 - t2})
            if (i + 1) % heartbeat_every == 0:
                heartbeats()
        wall = time.perf_counter() - t_all
        # 2. the same decisions back to back: what one core does when it only schedules, the
        # per-request key chains and lookups done elsewhere
        back_to_back = 0.0
        for i in range(requests):
            t0 = time.perf_counter()
            decide(prompts[i % len(prompts)], hits[i])
            back_to_back += time.perf_counter() - t0
            if (i + 1) % heartbeat_every == 0:
                heartbeats()
    per_decision_us = {k: v / requests * 1e6 for k, v in spent.items()}
    result = {"bench": "scheduler", "engines": prefill + decode, "prefill": prefill, "decode": decode,
              "prompt_tokens": prompt_tokens, "hit_ratio": hit_ratio, "block_tokens": bt, "policy": policy,
              "requests": requests, "hit_blocks": min(hits), "per_decision_us": per_decision_us,
              "back_to_back_us": back_to_back / requests * 1e6,
              "decisions_per_s": {"policy_and_bookkeeping_back_to_back": requests / back_to_back,
                                  "policy_and_bookkeeping": requests / spent["policy_and_bookkeeping"],
                                  "whole_path": requests / sum(spent.values())},
              "wall_s": wall}
    write_json(out, result)
    return result
