"""Workloads: seeded agentic sessions, and replay of Mooncake-format traces.

A workload is a list of sessions; a session is a list of turns sent one after another. The prompt
of turn k is the prompt of turn k-1, its answer, and a new chunk (a tool output): so almost all of
each prompt after the first is a cache hit. A Mooncake trace request is a one-turn session whose
prompt is built from its ``hash_ids``: every id stands for one block of token ids derived from the
id alone, so equal ids give equal token blocks and prefix reuse in the trace is real reuse here.

JSONL, one turn per line:
  agentic:  {"session": 3, "turn": 0, "arrival_s": 0.0, "append_tokens": 7000, "output_tokens": 32}
  Mooncake: {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, ...]}
Token ids are drawn from [0, 256), valid for every model here (byte-level vocabularies included).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

TOKEN_RANGE = 256
MOONCAKE_BLOCK_TOKENS = 512


@dataclass
class Turn:
    append_tokens: int  # tokens added after the previous turn's answer (turn 0: the whole first prompt)
    output_tokens: int
    hash_ids: list[int] | None = None  # trace replay: the prompt is these blocks, not an append


@dataclass
class Session:
    sid: int
    arrival_s: float = 0.0  # open loop: when the session starts, relative to the run's start
    turns: list[Turn] = field(default_factory=list)


@dataclass
class AgenticSpec:
    """N agents x T turns. The defaults give contexts of tens of thousands of tokens; benchmarks on a
    CPU use smaller ones (see ``bench repro``)."""

    agents: int = 16
    turns: int = 12
    first_prompt: tuple[int, int] = (16_000, 24_000)  # system prompt + task + repository context
    tool_output: tuple[int, int] = (200, 1_000)  # each turn's appended tool output
    answer: tuple[int, int] = (32, 128)  # each turn's generated tokens
    min_hit_ratio: float = 0.95  # an append is clipped so that every later turn hits at least this
    block_tokens: int = 64  # the cluster's block size: what counts as a hit
    seed: int = 0


def cached_tokens(context_tokens: int, block_tokens: int) -> int:
    """Tokens of a finished turn that the next turn finds stored: the full blocks of the context
    whose KV was computed (the last generated token's KV never is)."""
    return (context_tokens - 1) // block_tokens * block_tokens


def agentic(spec: AgenticSpec) -> list[Session]:
    rng = random.Random(spec.seed)
    sessions = []
    for a in range(spec.agents):
        prompt = rng.randint(*spec.first_prompt)
        turns = [Turn(prompt, rng.randint(*spec.answer))]
        for _ in range(1, spec.turns):
            context = prompt + turns[-1].output_tokens
            hit = cached_tokens(context, spec.block_tokens)
            # hit / (context + tool) >= min_hit_ratio
            most = max(1, int(hit / spec.min_hit_ratio) - context)
            tool = min(rng.randint(*spec.tool_output), most)
            turns.append(Turn(tool, rng.randint(*spec.answer)))
            prompt = context + tool
        sessions.append(Session(a, 0.0, turns))
    return sessions


def poisson_arrivals(sessions: list[Session], rate: float, seed: int = 0) -> list[Session]:
    """Open loop: sessions start as a Poisson process of `rate` sessions per second."""
    rng, t = random.Random(seed), 0.0
    out = []
    for s in sessions:
        out.append(Session(s.sid, t, s.turns))
        t += rng.expovariate(rate)
    return out


def hit_ratios(sessions: list[Session], block_tokens: int) -> list[float]:
    """The expected hit ratio of every turn after the first (what the generator promises)."""
    out = []
    for s in sessions:
        context = 0
        for k, t in enumerate(s.turns):
            prompt = context + t.append_tokens
            if k:
                out.append(cached_tokens(context, block_tokens) / prompt)
            context = prompt + t.output_tokens
    return out


def load_mooncake(path: str | Path, limit: int | None = None, block_tokens: int = MOONCAKE_BLOCK_TOKENS,
                  time_scale: float = 1.0) -> list[Session]:
    """Each trace request becomes a one-turn session. `block_tokens` < 512 shrinks every hash block
    (and the lengths with it) while keeping the reuse structure; `time_scale` stretches arrivals."""
    sessions = []
    with open(path) as f:
        for i, line in enumerate(f):
            if limit is not None and i >= limit:
                break
            r = json.loads(line)
            missing = {"timestamp", "input_length", "output_length", "hash_ids"} - r.keys()
            if missing:
                raise ValueError(f"{path}:{i + 1}: not a Mooncake trace line (missing {sorted(missing)})")
            scale = block_tokens / MOONCAKE_BLOCK_TOKENS
            length = max(1, round(r["input_length"] * scale))
            sessions.append(Session(i, r["timestamp"] / 1000 * time_scale,
                                    [Turn(length, max(1, r["output_length"]), list(r["hash_ids"]))]))
    return sessions


def block_of(hash_id: int, block_tokens: int) -> list[int]:
    """The token ids that stand for one trace hash block: a function of the id alone."""
    rng = random.Random(hash_id * 2_654_435_761 + 1)
    return [rng.randrange(TOKEN_RANGE) for _ in range(block_tokens)]


def trace_prompt(turn: Turn, block_tokens: int) -> list[int]:
    tokens = [t for h in turn.hash_ids for t in block_of(h, block_tokens)]
    if len(tokens) < turn.append_tokens:  # a trace line whose length exceeds its blocks: pad deterministically
        tokens += block_of(-1 - len(tokens), turn.append_tokens - len(tokens))
    return tokens[: turn.append_tokens]


def append_tokens(session: Session, turn_index: int, n: int, salt: int = 0) -> list[int]:
    """The new tokens of an agentic turn: seeded by (salt, session, turn), so every run of a workload
    sends the same prompts (the answers come from the model)."""
    rng = random.Random((salt * 1_000_003 + session.sid) * 1_000_003 + turn_index)
    return [rng.randrange(TOKEN_RANGE) for _ in range(n)]


WORDS = ("read", "file", "line", "test", "passed", "failed", "error", "def", "return", "import", "class", "value",
         "patch", "diff", "grep", "found", "module", "config", "build", "step", "result", "output", "call", "args")


def append_text(session: Session, turn_index: int, n: int, salt: int = 0) -> str:
    """The chat form of an append: about n characters of seeded words (one token per byte for the
    presets' byte tokenizer; fewer for a real one), the same in every run of a workload."""
    rng = random.Random((salt * 1_000_003 + session.sid) * 1_000_003 + turn_index)
    words, size = [], 0
    while size < n:
        words.append(rng.choice(WORDS))
        size += len(words[-1]) + 1
    return " ".join(words)[:max(n, 1)]


def write_jsonl(sessions: list[Session], path: str | Path) -> None:
    with open(path, "w") as f:
        for s in sessions:
            for k, t in enumerate(s.turns):
                row = {"session": s.sid, "turn": k, "arrival_s": s.arrival_s, **asdict(t)}
                if row["hash_ids"] is None:
                    del row["hash_ids"]
                f.write(json.dumps(row) + "\n")


def read_jsonl(path: str | Path, **mooncake_kw) -> list[Session]:
    """Either format: our own (agentic or saved) or a Mooncake trace."""
    with open(path) as f:
        first = f.readline()
    if not first.strip():
        raise ValueError(f"{path}: empty workload file")
    if "input_length" in json.loads(first):
        return load_mooncake(path, **mooncake_kw)
    by_sid: dict[int, Session] = {}
    with open(path) as f:
        for i, line in enumerate(f):
            r = json.loads(line)
            try:
                s = by_sid.setdefault(r["session"], Session(r["session"], r.get("arrival_s", 0.0)))
                if r["turn"] != len(s.turns):
                    raise ValueError(f"turn {r['turn']} of session {r['session']} is out of order")
                s.turns.append(Turn(r["append_tokens"], r["output_tokens"], r.get("hash_ids")))
            except (KeyError, ValueError) as e:
                raise ValueError(f"{path}:{i + 1}: bad workload line ({e})") from None
    return list(by_sid.values())
