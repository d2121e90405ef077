"""Drive a workload against a running cluster's HTTP API and record what every request saw.

Offline (closed loop): every session starts at once (at most `concurrency` at a time) and sends its
next turn when the previous one finishes; the figure of merit is the job completion time.
Online (open loop): sessions start at their `arrival_s`; what matters is TTFT and TPOT.

Each request is streamed (SSE), so TTFT and TPOT are measured at the client. While the workload
runs, a sampler polls ``/v1/cluster`` for every engine's storage byte counters: the storage-NIC
bandwidth of each node over time.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field

import aiohttp
from tqdm import tqdm

from dualpath.bench.workload import Session, append_text, append_tokens, trace_prompt


@dataclass
class RequestRecord:
    session: int
    turn: int
    t_send: float
    t_first: float | None = None
    t_done: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    path: str = ""
    pe: str = ""
    de: str = ""
    read_bytes_pe: int = 0
    read_bytes_de: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_send

    @property
    def tpot(self) -> float | None:
        if self.t_done is None or self.t_first is None or self.output_tokens < 2:
            return None
        return (self.t_done - self.t_first) / (self.output_tokens - 1)


@dataclass
class RunResult:
    policy: str
    mode: str
    duration: float  # seconds from the first timed request to the last answer
    records: list[RequestRecord]
    samples: list[dict] = field(default_factory=list)  # {"t": s, "engines": {name: {node, read_bytes, write_bytes}}}

    def to_json(self) -> dict:
        return {"policy": self.policy, "mode": self.mode, "duration_s": self.duration,
                "records": [asdict(r) for r in self.records], "samples": self.samples}

    @classmethod
    def from_json(cls, d: dict) -> "RunResult":
        return cls(d["policy"], d["mode"], d["duration_s"], [RequestRecord(**r) for r in d["records"]], d["samples"])


async def _stream_completion(http: aiohttp.ClientSession, url: str, body: dict, rec: RequestRecord,
                             chat: bool = False) -> tuple[list[int], str]:
    """POST with stream=true to /v1/completions (or /v1/chat/completions); fills the record's timing
    and usage; returns the generated token ids and text."""
    out: list[int] = []
    text: list[str] = []
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(url + ("/v1/chat/completions" if chat else "/v1/completions"), json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            if "error" in msg:
                raise RuntimeError(str(msg["error"]))
            if msg.get("usage"):  # the last chunk: usage only
                u = msg["usage"]
                rec.prompt_tokens, rec.cached_tokens = u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"]
                continue
            if msg.get("dualpath"):  # the finish chunk carries the path the request took
                dp = msg["dualpath"]
                rec.path, rec.pe, rec.de = dp["path"], dp["pe"], dp["de"]
                rec.read_bytes_pe, rec.read_bytes_de = dp["read_bytes"]["pe"], dp["read_bytes"]["de"]
            choice = msg["choices"][0]
            tokens = choice["token_ids"]
            if tokens and rec.t_first is None:
                rec.t_first = time.monotonic()
            out.extend(tokens)
            text.append(((choice.get("delta") or {}).get("content") or "") if chat else choice.get("text", ""))
    rec.t_done = time.monotonic()
    rec.output_tokens = len(out)
    return out, "".join(text)


async def _run_turns(http, url: str, s: Session, turns: range, context: list, policy: str,
                     trace_block_tokens: int, salt: int, records: list | None, bar: tqdm | None,
                     api: str = "completions") -> list | None:
    """Send the session's turns in order (closed loop); returns the conversation so far (token ids,
    or chat messages with api="chat"), or None if a turn failed (the session stops: its next prompt
    would need the failed answer)."""
    for k in turns:
        turn = s.turns[k]
        rec = RequestRecord(s.sid, k, time.monotonic())
        if records is not None:
            records.append(rec)
        if api == "chat":  # the history as messages; the server's chat template makes the prompt
            if turn.hash_ids is not None:
                raise ValueError("a Mooncake trace gives block hashes, not text: replay it with api='completions'")
            messages = context + [{"role": "user", "content": append_text(s, k, turn.append_tokens, salt)}]
            body = {"messages": messages, "max_tokens": turn.output_tokens, "temperature": 0, "dualpath_policy": policy}
        elif turn.hash_ids is not None:
            prompt = trace_prompt(turn, trace_block_tokens)
            body = {"prompt": prompt, "max_tokens": turn.output_tokens, "temperature": 0, "dualpath_policy": policy}
        else:
            prompt = context + append_tokens(s, k, turn.append_tokens, salt)
            body = {"prompt": prompt, "max_tokens": turn.output_tokens, "temperature": 0, "dualpath_policy": policy}
        try:
            answer, text = await _stream_completion(http, url, body, rec, chat=api == "chat")
        except Exception as e:
            rec.error = f"{type(e).__name__}: {e}"
            if bar is not None:
                bar.update(turns.stop - k)
            return None
        context = messages + [{"role": "assistant", "content": text}] if api == "chat" else prompt + answer
        if bar is not None:
            bar.update(1)
    return context


async def _sample_cluster(http, url: str, t0: float, samples: list, stop: asyncio.Event, every: float) -> None:
    while True:  # one last sample after `stop`, so the run's end is in the series
        try:
            async with http.get(url + "/v1/cluster") as r:
                view = await r.json()
            samples.append({"t": time.monotonic() - t0, "engines": {
                name: {"node": e["node"], "role": e["role"], "read_bytes": e.get("storage_read_bytes", 0),
                       "write_bytes": e.get("storage_write_bytes", 0)} for name, e in view["engines"].items()}})
        except (aiohttp.ClientError, KeyError, ValueError):
            pass
        if stop.is_set():
            return
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass


async def run(url: str, sessions: list[Session], policy: str, mode: str = "offline",
              trace_block_tokens: int = 512, concurrency: int = 0, warmup_turns: int = 0, salt: int = 0,
              progress: bool = True, sample_every: float = 0.25, timeout: float = 3600,
              api: str = "completions") -> RunResult:
    """Run a workload; `concurrency` caps the sessions in flight (0 = all of them). With api="chat"
    every turn goes to /v1/chat/completions as the session's messages so far (its appends as text,
    ``append_text``), as an agent framework sends them; else to /v1/completions as token ids.

    The first `warmup_turns` turns of every session run before the clock starts and are not
    recorded: an agent's trajectory is then joined mid-way, with its history already in storage, as
    it would be in a long-running deployment (a CPU benchmark cannot afford hundreds of turns).
    """
    if mode not in ("offline", "online"):
        raise ValueError(f"mode must be 'offline' or 'online', got {mode!r}")
    if api not in ("completions", "chat"):
        raise ValueError(f"api must be 'completions' or 'chat', got {api!r}")
    records: list[RequestRecord] = []
    samples: list[dict] = []
    limit = asyncio.Semaphore(concurrency or len(sessions) or 1)
    stop = asyncio.Event()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:

        warm_records: list[RequestRecord] = []  # not reported, but a failed one says why

        async def warm(s: Session) -> list[int] | None:
            async with limit:
                return await _run_turns(http, url, s, range(min(warmup_turns, len(s.turns))), [], policy,
                                        trace_block_tokens, salt, warm_records, None, api)

        contexts = await asyncio.gather(*(warm(s) for s in sessions))
        if any(c is None for c in contexts):
            errors = [f"session {r.session} turn {r.turn}: {r.error}" for r in warm_records if r.error]
            raise RuntimeError(f"{len(errors)} warm-up turns failed, the first: {errors[0]}; see the cluster's logs")
        bar = tqdm(total=sum(max(0, len(s.turns) - warmup_turns) for s in sessions), desc=f"{policy} {mode}",
                   unit="req", disable=not progress, leave=False)
        t0 = time.monotonic()
        sampler = asyncio.create_task(_sample_cluster(http, url, t0, samples, stop, sample_every))

        async def one(s: Session, context: list[int]) -> None:
            if mode == "online":
                await asyncio.sleep(max(0.0, t0 + s.arrival_s - time.monotonic()))
            async with limit:
                await _run_turns(http, url, s, range(min(warmup_turns, len(s.turns)), len(s.turns)), context,
                                 policy, trace_block_tokens, salt, records, bar, api)

        await asyncio.gather(*(one(s, c) for s, c in zip(sessions, contexts)))
        t1 = time.monotonic()
        await asyncio.sleep(0.5)  # engines report their counters by heartbeat: let the last one in
        stop.set()
        await sampler
        bar.close()
    for r in records:  # times relative to the run's start, for plots and JSON
        r.t_send -= t0
        r.t_first = None if r.t_first is None else r.t_first - t0
        r.t_done = None if r.t_done is None else r.t_done - t0
    return RunResult(policy, mode, t1 - t0, records, samples)
