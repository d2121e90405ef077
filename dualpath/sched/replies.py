"""What the API answers, in OpenAI's shapes: completion and chat bodies, stream chunks, usage,
finish reasons and error bodies. Pure functions of a finished (or streaming) request: api.py runs
the request and sends what these build.

Beyond OpenAI's fields every choice carries its `token_ids`, usage its
`prompt_tokens_details.cached_tokens` (the blocks the store held), and a body its `dualpath`
object (PE, DE, policy, path, bytes read on each side, time to the first token).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dualpath.sched.tools import ToolCall

if TYPE_CHECKING:
    from dualpath.sched.coordinator import RequestState


def finish_reason(req: RequestState, hit_stop: bool = False) -> str:
    """'stop' for a stop string (`hit_stop`: the API finds those, not the engines), a stop token id
    or the end-of-sequence token (even as the max_tokens-th token), else 'length' when max_tokens
    ended the answer. The responses and /metrics (vLLM's finished_reason) both say it so."""
    ended = bool(req.output) and req.params["sampling"].stops_on(req.output[-1])
    return "stop" if hit_stop or ended or len(req.output) < req.params["max_tokens"] else "length"


def usage(reqs: list[RequestState], block_tokens: int) -> dict:
    prompt, completion = sum(len(r.tokens) for r in reqs), sum(len(r.output) for r in reqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(r.hit_blocks for r in reqs) * block_tokens}}


def dualpath_info(req: RequestState, block_bytes: int) -> dict | None:
    """Where the request ran and what each side read (None if it was never scheduled)."""
    d = req.decision
    if d is None:
        return None
    return {"pe": d.pe, "de": d.de, "policy": req.policy, "path": d.path,
            "read_bytes": {"pe": d.pe_blocks * block_bytes, "de": d.de_blocks * block_bytes},
            "ttft_s": (req.t_first or time.monotonic()) - req.t_arrival}


@dataclass(frozen=True)
class Served:
    """What every body names: the model, and the sizes its usage and `dualpath` object count in."""
    model: str
    block_tokens: int
    block_bytes: int


def completion_body(cid: str, reqs: list[RequestState], answers: list[tuple[str, str]], served: Served) -> dict:
    """A completion response of one choice per prompt, each answer a (text, finish_reason)."""
    choices = [{"index": i, "text": text, "token_ids": r.output, "logprobs": None, "finish_reason": finish}
               for i, (r, (text, finish)) in enumerate(zip(reqs, answers))]
    body = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": served.model,
            "choices": choices, "usage": usage(reqs, served.block_tokens),
            "dualpath": dualpath_info(reqs[0], served.block_bytes)}
    if len(reqs) > 1:
        body["dualpath_per_choice"] = [dualpath_info(r, served.block_bytes) for r in reqs]
    return body


def chat_body(req: RequestState, content: str, finish: str, calls: list[ToolCall], served: Served) -> dict:
    """A chat completion: the assistant's message, with its tool calls if it made any (then its
    finish_reason is 'tool_calls', and content that is empty is null, as OpenAI sends it)."""
    message: dict = {"role": "assistant", "content": content}
    if calls:
        message = {"role": "assistant", "content": content or None, "tool_calls": [c.openai() for c in calls]}
        finish = "tool_calls"
    return {"id": req.request_id, "object": "chat.completion", "created": int(time.time()), "model": served.model,
            "choices": [{"index": 0, "message": message, "token_ids": req.output, "logprobs": None,
                         "finish_reason": finish}],
            "usage": usage([req], served.block_tokens), "dualpath": dualpath_info(req, served.block_bytes)}


def error_body(status: int, message: str, param: str | None = None, code: str | int | None = None) -> dict:
    kind = "server_error" if status >= 500 else ("authentication_error" if status == 401 else
                                                  "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code or status}}


@dataclass
class StreamChunks:
    """The server-sent events of one streamed request, as OpenAI sends them: one chunk per token with
    the new text only, a last chunk with the finish reason (and the `dualpath` object), then the
    usage if asked, then [DONE]. A chat stream carries the text as `delta` (the first one also
    names the assistant role) and each tool call, whole, as a `tool_calls` delta."""
    request_id: str
    model: str
    chat: bool
    include_usage: bool
    _first: bool = field(default=True, init=False)  # the next chat delta is the first: it names the role
    _calls: int = field(default=0, init=False)  # tool calls sent so far: a delta's index is its place among them
    _created: int = field(default_factory=lambda: int(time.time()), init=False)

    def piece(self, text: str | None, tokens: list[int], finish: str | None,
              calls: list[ToolCall] = ()) -> dict:
        """One choice: the new text (None: no text, only a finish reason), the tokens that made it."""
        if not self.chat:
            return {"index": 0, "text": text or "", "token_ids": tokens, "logprobs": None, "finish_reason": finish}
        delta: dict = {} if text is None or (calls and not text) else {"content": text}
        if calls:
            delta["tool_calls"] = [{"index": self._calls + i, **c.openai()} for i, c in enumerate(calls)]
            self._calls += len(calls)
        if delta and self._first:
            delta["role"], self._first = "assistant", False
        return {"index": 0, "delta": delta, "token_ids": tokens, "logprobs": None, "finish_reason": finish}

    def event(self, choices: list[dict], **extra) -> bytes:
        chunk = {"id": self.request_id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self._created, "model": self.model, "choices": choices, **extra}
        if self.include_usage:
            chunk.setdefault("usage", None)
        return f"data: {json.dumps(chunk)}\n\n".encode()

    @staticmethod
    def error(status: int, message: str) -> bytes:
        """A failure after the stream began: its status can no longer be the response's."""
        error = {"message": message, "type": "server_error", "param": None, "code": status}
        return f"data: {json.dumps({'error': error})}\n\n".encode()

    DONE = b"data: [DONE]\n\n"
