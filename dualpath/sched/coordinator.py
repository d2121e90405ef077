"""The coordinator: the HTTP API, engine registry, request table, prefix lookup, and scheduling.

Life of a request here (DESIGN.md §2 steps 1-4):
1. ``POST /v1/completions`` is validated (every user mistake is a 4xx naming it).
2. The prompt's full blocks are hashed into a chain; the store says how many leading blocks it
   holds: the hit. At least one token is always computed, so the PE can sample the first token.
3. The policy (``policy.py``) picks PE, DE and the read side from the engines' live load.
4. The DE is asked to admit (reserve a slot; start reading the hits on path B); the PE gets the
   prefill job. Tokens stream back from the DE; the response reports the hit as ``cached_tokens``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from dualpath.config import POLICIES, ClusterConfig
from dualpath.engine.tokenizer import load_tokenizer
from dualpath.engine.weights import model_identity
from dualpath.sched.chat import ChatError, ChatTemplate
from dualpath.sched.dashboard import Dashboard
from dualpath.sched.metrics import ClusterMetrics
from dualpath.sched.text import AnswerText
from dualpath.sched.policy import (ClusterView, Decision, EngineLoad, NoEngine, NoRoom, RequestInfo, assigned,
                                   choose)
from dualpath.sched.waiting import WaitingRoom
from dualpath.storage.blockfile import BlockShape
from dualpath.storage.keys import block_chain
from dualpath.storage.store import FileStore
from dualpath.protocol import (Abort, Admit, Done, EngineReport, Engines, Failed, Heartbeat, Message, Prefill, Register, RunHandle,
                               SamplingParams, Token, ask, dispatch, tell)
from dualpath.transport.control import Connection, RemoteError, Server

log = logging.getLogger(__name__)


class BadRequest(ValueError):
    """A client mistake: answered with `status` (400 unless said) and this message, OpenAI-shaped."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    """body[name] as a float in [low, high] ((low, high] with low_open), else a 400 naming it."""
    value = body.get(name)
    if value is None:
        return default
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high
            or (low_open and value == low)):  # NaN fails this too
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise BadRequest(f"'{name}' must be a number in {interval}, got {value!r}", param=name)
    return float(value)


def _integer(body: dict, name: str, default: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"'{name}' must be an integer, got {value!r}", param=name)
    return value


class RequestFailed(RuntimeError):
    """The cluster could not serve a valid request: answered with `status` and this message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


MAX_ATTEMPTS = 3  # a request with no token yet is tried again when an engine of it dies, up to this often
MAX_SEED = 2**63  # seeds travel as 64-bit integers
MAX_INT = 2**63  # every integer in a request body fits 64 bits (Python's own limit is 4,300 digits: a 500)
# Stop strings: OpenAI takes at most 4; agent frameworks sometimes send a few more (vLLM sets no
# bound). Each token is searched for each stop string, and a stream holds back the last (longest
# - 1) characters until they cannot begin one: both bounds keep that cost small and fixed.
# A chat request without max_tokens may answer up to the rest of its context (vLLM), but a DE reserves
# HBM for prompt + max_tokens when it admits a request (vLLM allocates as tokens come), so an
# unbounded default would let one such request hold a whole engine: the default stops here.
CHAT_DEFAULT_MAX_TOKENS = 4096
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
MAX_REPETITION_PENALTY = 1e6  # vLLM takes any positive value; beyond this every seen logit is ~0 or ~-inf anyway
MAX_STOP_TOKEN_IDS = 256  # each generated token is looked up among them
MAX_LOGIT_BIAS = 1024  # OpenAI documents no bound; each draw adds every one of them
MIN_TEMPERATURE = 1e-3  # below it, logits / T overflows: such a request is answered greedily (T = 0)


@dataclass
class EngineEntry:
    name: str
    role: str
    node: int
    addr: tuple[str, int]
    conn: Connection
    last_seen: float
    report: EngineReport | None = None  # its last heartbeat's (None until the first)
    incarnation: str | None = None  # its process life, as its login proved (transport/framing.py)

    def heard(self, report: EngineReport, drain_rates: bool) -> EngineLoad:
        """A heartbeat; returns the engine's load as the policies see it, which now shows what was
        assigned to it before the heartbeat."""
        self.report, self.last_seen = report, time.monotonic()
        r = report
        return EngineLoad(self.name, self.role, self.node, r.queued_prefill_tokens, r.running_decode_tokens,
                          r.read_queue_bytes, r.free_buffer_blocks, r.free_hbm_blocks,
                          r.read_rate_bps if drain_rates else 0.0, r.delivery_cost if drain_rates else 0.0)


@dataclass
class RequestState:
    rid: str
    tokens: list[int]
    params: dict
    policy: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # Token, Done and Failed from its engines
    decision: Decision | None = None
    # The control connections of the engines this attempt was given to, by name: only they may
    # speak for it, and a restarted engine (a new connection) knows nothing of it
    conns: dict[str, Connection] = field(default_factory=dict)
    hit_blocks: int = 0
    output: list[int] = field(default_factory=list)
    attempts: int = 0
    t_arrival: float = field(default_factory=time.monotonic)
    t_first: float | None = None
    t_scheduled: float | None = None  # admitted on its engines
    deadline: float = math.inf  # monotonic time by which the request is answered or failed

    @property
    def attempt_rid(self) -> str:
        """The id the engines know this attempt by: a retry is a new request to them, so a late
        abort of the failed attempt can never hit the retry, even on the same engines."""
        return f"{self.rid}.{self.attempts}"


class _Huge:
    """An integer of a request body beyond 64 bits, as json reads it until _loads says where it is
    (Python's int() would refuse 4,301 digits with a ValueError of its own: a 500)."""


def _loads(text: str) -> Any:
    """json.loads, but an integer beyond 64 bits is a 400 naming where it is."""
    huge: list[str] = []

    def parse_int(digits: str) -> int | _Huge:
        if len(digits.lstrip("-")) <= 19 and -MAX_INT <= (value := int(digits)) < MAX_INT:
            return value
        huge.append(digits)
        return _Huge()

    body = json.loads(text, parse_int=parse_int)
    if huge:
        where, digits = _where_huge(body), huge[0]
        shown = digits if len(digits) <= 24 else f"{digits[:12]}... ({len(digits)} digits)"
        raise BadRequest(f"'{where}' is the integer {shown}, outside the 64-bit range [-2**63, 2**63)",
                         param=where.split("[")[0].split(".")[0] if where != "body" else None)
    return body


def _where_huge(body: Any) -> str:
    """Where the first _Huge of a parsed body is, as `prompt[3]` or `stream_options.x` (depth
    first, in document order, without recursion: a body may nest deeply)."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, _Huge):
            return where or "body"
        if isinstance(value, dict):
            pairs = [(f"{where}.{k}" if where else str(k), v) for k, v in value.items()]
        elif isinstance(value, list):
            pairs = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
        else:
            continue
        stack.extend(reversed(pairs))
    return "body"


class Coordinator:
    def __init__(self, cfg: ClusterConfig):
        self.cfg = cfg
        dtype = __import__("torch").__dict__[cfg.model.dtype]
        self.model_cfg, self.fingerprint = model_identity(cfg.model.weights or cfg.model.preset, dtype)
        self.tokenizer = load_tokenizer(cfg.model.weights, self.model_cfg.vocab_size)
        self.chat = ChatTemplate(self.tokenizer.chat_template, self.tokenizer.bos_token, self.tokenizer.eos_token)
        self.bt = cfg.store.block_tokens
        es = dtype.itemsize
        shape = BlockShape(self.model_cfg.n_layers, self.bt * self.model_cfg.kv_width * es, cfg.model.dtype,
                           self.fingerprint)
        self.store = FileStore(cfg.store.root, shape, int(cfg.store.capacity_gb * 1e9))
        self.block_bytes = shape.file_bytes
        self.max_context = cfg.engine.max_context or self.model_cfg.max_position
        # A body over this is refused with 413: room for a whole context as token ids or escaped text
        self.max_body_bytes = max(1 << 20, 32 * self.max_context)
        self.engines: dict[str, EngineEntry] = {}
        # What the policies see: each live engine's last heartbeat plus what was assigned since
        self.view = ClusterView()
        self._sweep_at = 0.0  # when cluster_view next drops the engines that stopped heartbeating
        self.waiting = WaitingRoom()  # requests that found no room (or no engine of a role), oldest first
        self.stopping = False  # set when the coordinator stops: waiting for an engine is then pointless
        self.requests: dict[str, RequestState] = {}
        self._ids = itertools.count(1)
        self.metrics = ClusterMetrics(self)
        self.dashboard = Dashboard(self)
        self.stats = {"requests": 0, "path_A": 0, "path_B": 0, "path_A+B": 0, "rejected": 0, "retried": 0,
                      "admit_retries": 0, "failed": 0, "client_gone": 0}

    # ------------------------------------------------------------------ engine registry (control plane)

    async def on_engine(self, conn: Connection, kind: str, params: dict) -> Any:
        """Every control message from an engine goes to the ``on_<kind>`` method below (protocol.py)."""
        return await dispatch(self, conn, kind, params)

    async def on_engines(self, conn: Connection, msg: Engines) -> dict:
        return {e.name: list(e.addr) for e in self.engines.values()}

    async def on_heartbeat(self, conn: Connection, msg: Heartbeat) -> None:
        e = self.engines.get(msg.engine)
        if e is not None and e.conn is conn:
            self.view.put(e.heard(msg.report, self.cfg.scheduler.drain_rates))
            self.waiting.room_changed()

    async def on_token(self, conn: Connection, msg: Token) -> None:
        self._to_request(conn, msg, pe_too=False)

    async def on_done(self, conn: Connection, msg: Done) -> None:
        self._to_request(conn, msg, pe_too=False)

    async def on_failed(self, conn: Connection, msg: Failed) -> None:
        self._to_request(conn, msg, pe_too=True)

    def _to_request(self, conn: Connection, msg: Token | Done | Failed, pe_too: bool) -> None:
        """Hand an engine's news to its request, if the request is still there and `conn` is the
        registered, open connection of an engine it was given to: its DE (tokens, the finish) or,
        with `pe_too`, its PE (a failure). Checking the name a connection logged in with was not
        enough: anyone with the secret could log in as a live DE and answer for it."""
        req = self.requests.get(msg.rid)
        d = req.decision if req is not None else None
        if d is None:
            return
        senders = (d.de, d.pe) if pe_too else (d.de,)
        if any(req.conns.get(name) is conn and self._registered(name, conn) for name in senders):
            req.queue.put_nowait(msg)
        else:
            log.debug("ignored %s for %s from %s: not an engine serving it", msg.kind, msg.rid, conn.peer_name)

    def _registered(self, name: str, conn: Connection) -> bool:
        """Whether `conn` is the connection engine `name` registered with, and still open."""
        e = self.engines.get(name)
        return e is not None and e.conn is conn and not conn.closed.is_set()

    async def on_register(self, conn: Connection, msg: Register) -> dict:
        """An engine joins under the name it logged in with; a name held by a live connection is
        not taken over (a second registration once silently replaced the real engine). A refused
        connection is closed once told why: it has nothing left to do here."""
        name = msg.engine
        if name != conn.peer_name:
            self._close_after_reply(conn)
            raise PermissionError(f"logged in as {conn.peer_name!r}, cannot register as {name!r}")
        held = self.engines.get(name)
        if held is not None and held.conn is not conn and not held.conn.closed.is_set():
            log.warning("refused a second registration of %s from %s: it is live", name,
                        conn.writer.get_extra_info("peername"))
            self._close_after_reply(conn)
            raise PermissionError(f"engine {name} is already registered and live")
        if msg.incarnation != conn.peer_incarnation:
            self._close_after_reply(conn)
            raise PermissionError(f"registered as incarnation {msg.incarnation!r}, logged in as {conn.peer_incarnation!r}")
        self.engines[name] = EngineEntry(name, msg.role, msg.node, (msg.host, msg.port), conn, time.monotonic(),
                                         incarnation=conn.peer_incarnation)
        self.view.put(EngineLoad(name, msg.role, msg.node))  # no room to offer until its first heartbeat
        log.info("engine %s registered (%s, node %d, incarnation %s)", name, msg.role, msg.node, conn.peer_incarnation)
        return {"ok": True}

    def _close_after_reply(self, conn: Connection) -> None:
        """Close `conn` once the answer being given now is written (call_soon runs after the
        handler's error reply, which follows without a pause; closing flushes what was written)."""
        asyncio.get_running_loop().call_soon(conn.writer.close)

    def _alive(self, e: EngineEntry) -> bool:
        return not e.conn.closed.is_set() and time.monotonic() - e.last_seen < self.cfg.scheduler.dead_after_s

    def live_engines(self) -> list[EngineEntry]:
        return [e for e in self.engines.values() if self._alive(e)]

    def on_close(self, conn: Connection) -> None:
        """An engine's control connection closed: the policies stop seeing it at once."""
        e = self.engines.get(conn.peer_name)
        if e is not None and e.conn is conn:
            self.view.drop(e.name)
            self.waiting.room_changed()  # the oldest waiter looks again (for room elsewhere)

    def cluster_view(self) -> ClusterView:
        """The live engines as the policies see them. Those that stopped heartbeating are dropped by
        a sweep once per heartbeat interval, counted dead one interval early so that no decision
        sees an engine silent for longer than dead_after_s (a heartbeat brings it back)."""
        now, s = time.monotonic(), self.cfg.scheduler
        if now >= self._sweep_at:
            self._sweep_at = now + s.heartbeat_s
            for e in self.engines.values():
                if e.conn.closed.is_set() or now + s.heartbeat_s - e.last_seen >= s.dead_after_s:
                    self.view.drop(e.name)
        return self.view

    # ------------------------------------------------------------------ validation

    @property
    def model_name(self) -> str:
        return self.cfg.model.weights or self.cfg.model.preset

    def _prompt_tokens(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            try:
                tokens = self.tokenizer.encode(prompt)
            except UnicodeError as e:  # a lone surrogate, say
                raise BadRequest(f"'prompt' is not valid Unicode text: {e.reason}", param="prompt") from None
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            tokens = prompt
            bad = [t for t in tokens if not 0 <= t < self.model_cfg.vocab_size]
            if bad:
                raise BadRequest(f"token id {bad[0]} is outside the vocabulary [0, {self.model_cfg.vocab_size})",
                                 param="prompt")
        else:
            raise BadRequest("'prompt' must be a string, a list of token ids, or a list of either", param="prompt")
        if not tokens:
            raise BadRequest("'prompt' is empty", param="prompt")
        return tokens

    def parse(self, body: Any, default_max_tokens: int | None = 16) -> tuple[list[list[int]], dict, str]:
        """A completion request's prompts (one, or a list of them), its parameters (params["sampling"]:
        the SamplingParams its engines draw with) and policy. Every documented parameter is applied
        or refused with a 400 naming it. Without max_tokens an answer has `default_max_tokens`
        (OpenAI's 16 for completions), or with None the rest of the context (chat, as vLLM does)."""
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        if body.get("model") not in (None, self.model_name):
            raise BadRequest(f"the model {body['model']!r} does not exist here (this cluster serves "
                             f"{self.model_name!r})", status=404, param="model", code="model_not_found")
        for name in ("n", "best_of"):  # one answer per request: n answers are n requests with their own seeds
            if body.get(name) not in (None, 1):
                raise BadRequest(f"'{name}' other than 1 is not supported: send the request that many times "
                                 f"(each gets its own seed)", param=name)
        for name in ("logprobs", "top_logprobs", "prompt_logprobs"):  # (chat's logprobs is a bool)
            if body.get(name) not in (None, False, 0):
                raise BadRequest(f"'{name}' is not supported", param=name)
        if body.get("echo"):
            raise BadRequest("'echo' is not supported", param="echo")
        if body.get("suffix") is not None:
            raise BadRequest("'suffix' (insertion) is not supported", param="suffix")
        if body.get("response_format") not in (None, {"type": "text"}):
            raise BadRequest("'response_format' other than {\"type\": \"text\"} (JSON mode, structured output) "
                             "is not supported", param="response_format")
        prompt = body.get("prompt")
        batch = isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt)
        prompts = [self._prompt_tokens(p) for p in prompt] if batch else [self._prompt_tokens(prompt)]
        given = body.get("max_completion_tokens", body.get("max_tokens"))
        if given is None and default_max_tokens is None:  # (chat) the rest of the context, up to a bound
            room = min(self.max_context, self.max_engine_tokens) - max(map(len, prompts))
            max_tokens = min(room, CHAT_DEFAULT_MAX_TOKENS) if room >= 1 else room
            if max_tokens < 1:
                raise BadRequest(f"the prompt ({max(map(len, prompts))} tokens) leaves no room for an answer in "
                                 f"the context of {self.max_context} tokens", param="messages")
        else:
            max_tokens = default_max_tokens if given is None else given
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise BadRequest(f"'max_tokens' must be a positive integer, got {max_tokens!r}", param="max_tokens")
        for tokens in prompts:
            if len(tokens) + max_tokens > self.max_context:
                raise BadRequest(f"prompt ({len(tokens)} tokens) + max_tokens ({max_tokens}) exceeds the context "
                                 f"limit of {self.max_context} tokens", param="max_tokens")
            self.check_fits(len(tokens), max_tokens)
        sampling = self._sampling(body, max_tokens)
        stop = self._stop_strings(body.get("stop"))
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest(f"'stream' must be true or false, got {stream!r}", param="stream")
        if stream and len(prompts) > 1:
            raise BadRequest("streaming takes one prompt per request", param="prompt")
        options = body.get("stream_options")
        if options is not None and not stream:  # OpenAI refuses it too: it would be ignored
            raise BadRequest("'stream_options' is only allowed with 'stream': true", param="stream_options")
        options = options or {}
        if not isinstance(options, dict):
            raise BadRequest("'stream_options' must be an object", param="stream_options")
        policy = body.get("dualpath_policy", self.cfg.scheduler.policy)
        if policy not in POLICIES:
            raise BadRequest(f"unknown 'dualpath_policy' {policy!r}; expected one of {list(POLICIES)}",
                             param="dualpath_policy")
        params = {"max_tokens": max_tokens, "sampling": sampling, "stop": stop, "stream": stream,
                  "include_usage": bool(options.get("include_usage"))}
        return prompts, params, policy

    @property
    def max_engine_tokens(self) -> int:
        """Prompt + answer tokens one engine can ever hold (check_fits): chat's default max_tokens
        stops there, or every long default would be refused."""
        return (self.cfg.engine.hbm_blocks - 1) * self.bt

    def _sampling(self, body: dict, max_tokens: int) -> SamplingParams:
        """The sampling parameters of a request, each in OpenAI's range (or vLLM's, for its own
        parameters), or a 400 naming it. A request without a seed gets a random one here, once: its
        answer is random, yet its PE and DE draw with the same seed (engine/runtime.py)."""
        temperature = _number(body, "temperature", 0.0, 0.0, MAX_TEMPERATURE)  # (greedy unless asked)
        if temperature < MIN_TEMPERATURE:
            temperature = 0.0
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
        min_p = _number(body, "min_p", 0.0, 0.0, 1.0)
        presence = _number(body, "presence_penalty", 0.0, -2.0, 2.0)
        frequency = _number(body, "frequency_penalty", 0.0, -2.0, 2.0)
        repetition = _number(body, "repetition_penalty", 1.0, 0.0, MAX_REPETITION_PENALTY, low_open=True)
        top_k = _integer(body, "top_k", -1)
        if top_k == 0 or top_k < -1:
            raise BadRequest(f"'top_k' must be -1 (all tokens) or at least 1, got {top_k}", param="top_k")
        min_tokens = _integer(body, "min_tokens", 0)
        if not 0 <= min_tokens <= max_tokens:
            raise BadRequest(f"'min_tokens' must be in [0, max_tokens = {max_tokens}], got {min_tokens}",
                             param="min_tokens")
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)
                                 or not -MAX_SEED <= seed < MAX_SEED):
            raise BadRequest(f"'seed' must be an integer in [-2**63, 2**63), got {seed!r}", param="seed")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise BadRequest(f"'ignore_eos' must be true or false, got {ignore_eos!r}", param="ignore_eos")
        return SamplingParams(
            temperature=float(temperature), top_p=top_p, top_k=top_k, min_p=min_p,
            seed=random.randrange(-MAX_SEED, MAX_SEED) if seed is None else seed,
            max_tokens=max_tokens, min_tokens=min_tokens,
            stop_token_ids=self._stop_token_ids(body.get("stop_token_ids")), ignore_eos=ignore_eos,
            eos_id=self.tokenizer.eos_id, presence_penalty=presence, frequency_penalty=frequency,
            repetition_penalty=repetition, logit_bias=self._logit_bias(body.get("logit_bias")))

    def _stop_token_ids(self, ids: Any) -> tuple[int, ...]:
        """vLLM's stop_token_ids: token ids whose drawing ends the answer (finish_reason "stop")."""
        if ids is None:
            return ()
        vocab = self.model_cfg.vocab_size
        if (not isinstance(ids, list) or len(ids) > MAX_STOP_TOKEN_IDS
                or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids)):
            raise BadRequest(f"'stop_token_ids' must be a list of at most {MAX_STOP_TOKEN_IDS} token ids in "
                             f"[0, {vocab})", param="stop_token_ids")
        return tuple(ids)

    def _logit_bias(self, bias: Any) -> tuple[tuple[int, float], ...]:
        """OpenAI's {"token id": bias} map: keys are token ids (JSON makes them strings) below the
        vocabulary size, values in [-100, 100]."""
        if bias is None:
            return ()
        if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
            raise BadRequest(f"'logit_bias' must be an object of at most {MAX_LOGIT_BIAS} token ids",
                             param="logit_bias")
        pairs = []
        for key, value in bias.items():
            token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 19 else None
            if token is None or token >= self.model_cfg.vocab_size:
                raise BadRequest(f"'logit_bias' key {key!r} is not a token id in [0, {self.model_cfg.vocab_size})",
                                 param="logit_bias")
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not -100 <= value <= 100):  # NaN fails this too
                raise BadRequest(f"'logit_bias' value for {key} must be a number in [-100, 100], got {value!r}",
                                 param="logit_bias")
            pairs.append((token, float(value)))
        return tuple(pairs)

    @staticmethod
    def _stop_strings(stop: Any) -> list[str]:
        stop = [stop] if isinstance(stop, str) else stop or []
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise BadRequest("'stop' must be a non-empty string or a list of them", param="stop")
        if len(stop) > MAX_STOP_STRINGS:
            raise BadRequest(f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}", param="stop")
        if max(map(len, stop), default=0) > MAX_STOP_CHARS:
            raise BadRequest(f"a stop string has at most {MAX_STOP_CHARS} characters, got one of "
                             f"{max(map(len, stop))}", param="stop")
        return stop

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.bt)

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """Refuse at once a request that no engine could ever hold (it would wait for room forever)."""
        e = self.cfg.engine
        need_hbm, need_buf = self.blocks_for(prompt_tokens + max_tokens), self.blocks_for(prompt_tokens)
        if need_hbm > e.hbm_blocks - 1 or need_buf > e.buffer_blocks:  # a DE keeps one HBM block as scratch
            raise BadRequest(f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) needs {need_hbm} KV blocks "
                             f"and {need_buf} buffer blocks of {self.bt} tokens; engines hold {e.hbm_blocks - 1} "
                             f"and {e.buffer_blocks}")

    # ------------------------------------------------------------------ scheduling

    async def schedule(self, req: RequestState) -> None:
        """Steps 2-4: prefix lookup, policy, then admit on the DE and submit to the PE. Only engines
        with room are chosen; with none, the request waits its turn for room (oldest first, until
        its deadline). So it does while no engine of a role is live: one may be restarting (`dualpath
        up` restarts a crashed engine in seconds, and a request has minutes). A DE that refuses (no
        room after all) or does not answer while its heartbeats stop is passed over."""
        req.attempts += 1
        self.requests[req.attempt_rid] = req
        chain = block_chain(req.tokens, self.fingerprint, self.bt)
        # At least one token is computed: the PE needs the last prompt token's logits.
        req.hit_blocks = min(self.store.lookup(chain), (len(req.tokens) - 1) // self.bt)
        n, m = len(req.tokens), req.params["max_tokens"]
        info = RequestInfo(n, req.hit_blocks, self.block_bytes, m, self.blocks_for(n), self.blocks_for(n + m))
        passed_over: set[str] = set()  # DEs that refused it: asked again once room may have come back
        given_up: set[str] = set()  # DEs that did not answer its admit: told to drop it, never asked again
        may_try, waited = not self.waiting, False  # a newcomer queues behind the requests waiting for room
        lacking: NoEngine | None = None  # what the last try lacked: room, or a live engine of a role
        while True:
            if not may_try:
                try:
                    await self.waiting.wait(req.deadline, keep_place=waited,
                                            check_every_s=self.cfg.scheduler.heartbeat_s, check=self._check_open)
                except TimeoutError:
                    raise self._deadline_passed(lacking) from None
                may_try, waited = True, True
                passed_over.clear()  # room may have come back anywhere
            try:
                d = req.decision = choose(req.policy, info, self.cluster_view(), skip=passed_over | given_up)
            except NoEngine as e:  # (NoRoom is one): an engine's heartbeat or registration may bring it
                lacking, may_try = e, False
                continue
            pe, de = self.engines[d.pe], self.engines[d.de]
            if gone := [e.name for e in (pe, de) if not self._alive(e)]:  # since the view heard of it
                for name in gone:
                    self.view.drop(name)
                continue
            req.conns = {d.pe: pe.conn, d.de: de.conn}
            self._assign(d, info)
            self.waiting.room_changed()  # what is left may fit the next waiter
            rid, sampling = req.attempt_rid, req.params["sampling"]
            admit = Admit(rid, req.tokens, req.hit_blocks, d.de_blocks, sampling, pe=d.pe,
                          handoff_timeout_s=max(0.0, req.deadline - time.monotonic()), pe_incarnation=pe.incarnation)
            try:
                de_run = RunHandle(**await self._ask(de, admit))
            except (RemoteError, ConnectionError, TimeoutError) as e:
                log.warning("%s: %s did not admit it (%s); trying another decode engine", req.rid, d.de, e)
                self.stats["admit_retries"] += 1
                self.metrics.retries.labels("admit").inc()
                if isinstance(e, RemoteError):  # it refused, holding nothing (no room after all)
                    passed_over.add(d.de)
                else:  # no answer: it may still admit it, so it drops it then; this attempt's id is spent there
                    tell(de.conn, Abort(rid))
                    given_up.add(d.de)
                continue
            self.stats[f"path_{d.path}"] += 1
            # (a PE that went away meanwhile fails this attempt: generate() tries again)
            await self._ask(pe, Prefill(rid, req.tokens, req.hit_blocks, d.de_blocks, sampling, d.de, de_run))
            req.t_scheduled = time.monotonic()
            return

    def _check_open(self) -> None:
        """Waiting ends when the coordinator stops (its engines are being stopped too): an open
        request would hold the HTTP server's shutdown until its deadline."""
        if self.stopping:
            raise NoEngine("the coordinator is stopping")

    def _deadline_passed(self, lacking: NoEngine | None) -> NoEngine:
        """Why a request that waited for room or for an engine until its deadline is given up."""
        timeout = self.cfg.scheduler.request_timeout_s
        if lacking is None or isinstance(lacking, NoRoom):
            return NoRoom(f"no engine had room for this request within the request timeout of {timeout:g} s")
        return NoEngine(f"{lacking} (none came back within the request timeout of {timeout:g} s)")

    def _assign(self, d: Decision, info: RequestInfo) -> None:
        """Count the work and memory just given to engines until their next heartbeat shows it."""
        to_pe, to_de = assigned(d, info, self.bt)
        self.view.put(self.view.loads[d.pe].plus(**to_pe))
        self.view.put(self.view.loads[d.de].plus(**to_de))

    async def _ask(self, e: EngineEntry, msg: Message, timeout: float = 30.0) -> Any:
        """Ask an engine; fails as soon as the engine stops heartbeating (a stopped process keeps
        its socket open: waiting out the whole timeout held admits for 30 s)."""
        call = asyncio.ensure_future(ask(e.conn, msg, timeout))
        while True:
            done, _ = await asyncio.wait([call], timeout=self.cfg.scheduler.heartbeat_s)
            if done:
                return call.result()
            if time.monotonic() - e.last_seen > self.cfg.scheduler.dead_after_s:
                call.cancel()
                raise TimeoutError(f"{e.name} stopped heartbeating")

    async def generate(self, req: RequestState):
        """Yields generated token ids; retries a request whose hit blocks vanished or whose engine
        died (or went away before it took the request), while it has no token yet."""
        req.deadline = req.t_arrival + self.cfg.scheduler.request_timeout_s
        try:
            while True:
                news = await self._start(req)  # None: started; a Failed: its PE went away first
                while news is None:
                    event = await self._next_event(req)
                    if isinstance(event, Token):
                        if req.t_first is None:
                            req.t_first = time.monotonic()
                        req.output.append(event.token)
                        yield event.token
                    elif isinstance(event, Done):
                        self._answered(req)
                        return
                    else:
                        news = event
                if req.output or not news.retry or req.attempts >= MAX_ATTEMPTS:
                    status = 503 if req.t_scheduled is None else 500  # never started: unavailable
                    raise RequestFailed(status, f"request failed: {news.error}")
                self.stats["retried"] += 1
                self.metrics.retries.labels("attempt").inc()
                self._end_attempt(req)  # its DE slot and buffers are freed before the retry takes new ones
        finally:
            self._end_attempt(req)

    async def _start(self, req: RequestState) -> Failed | None:
        """Schedule an attempt: None once its engines have it; a retryable Failed if its PE went
        away before it took the job (the retry waits for a PE, as a restarted one comes back)."""
        try:
            await self.schedule(req)
        except NoEngine as e:  # its deadline passed waiting for room or an engine
            raise RequestFailed(503, str(e)) from None
        except RemoteError as e:  # the PE refused the job
            raise RequestFailed(503, f"could not start the request: {e}") from None
        except (ConnectionError, TimeoutError) as e:
            return Failed(req.attempt_rid, f"could not start the request: {e}", retry=True)
        return None

    def _answered(self, req: RequestState) -> None:
        """Count an answered request: its engines finished it, or a stop string ended it here."""
        self.metrics.answered(req, time.monotonic(), self.bt)
        self.dashboard.answered(req)

    def _client_gone(self, req: RequestState) -> None:
        """Count a request whose client left (generate()'s closing frees its slot and buffers)."""
        log.info("client of %s went away; its slot and buffers are freed", req.rid)
        self.stats["client_gone"] += 1

    def _end_attempt(self, req: RequestState) -> None:
        """Forget the current attempt and tell its engines to drop whatever they still hold for it."""
        if self.requests.pop(req.attempt_rid, None) is None or req.decision is None:
            return
        for conn in req.conns.values():  # (dropped where the engine is gone: its memory went with it)
            tell(conn, Abort(req.attempt_rid))

    async def _next_event(self, req: RequestState) -> Token | Done | Failed:
        """The next news of the request: from its engines, or a (retryable) failure if one of them
        died (heartbeat loss); RequestFailed(504) once the request's deadline passes."""
        while True:
            wait = min(self.cfg.scheduler.heartbeat_s * 2, req.deadline - time.monotonic())
            if wait <= 0:
                raise RequestFailed(504, f"not answered within the request timeout of "
                                         f"{self.cfg.scheduler.request_timeout_s:g} s")
            try:
                return await asyncio.wait_for(req.queue.get(), wait)
            except asyncio.TimeoutError:
                d = req.decision
                # the first token comes with the handoff: from then on only the DE matters
                needed = () if d is None else (d.de,) if req.output else (d.pe, d.de)
                gone = [name for name in needed if not self._serving(req, name)]
                if gone:
                    return Failed(req.attempt_rid, f"engine {gone[0]} died", retry=True)

    def _serving(self, req: RequestState, name: str) -> bool:
        """Whether engine `name`, as this attempt found it, is still there: live, and not since
        restarted (a restarted engine registers a new connection and knows nothing of the request)."""
        e = self.engines.get(name)
        return e is not None and e.conn is req.conns.get(name) and self._alive(e)

    # ------------------------------------------------------------------ HTTP

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._api_key], client_max_size=self.max_body_bytes)
        app.add_routes([web.post("/v1/completions", self.http_completions),
                        web.post("/v1/chat/completions", self.http_chat), web.get("/v1/models", self.http_models),
                        web.get("/healthz", self.http_health), web.get("/v1/cluster", self.http_cluster),
                        web.get("/metrics", self.http_metrics), *self.dashboard.routes()])
        app.cleanup_ctx.append(self.dashboard.running)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        """Every failure on the request path becomes an OpenAI-shaped error body, never a traceback."""
        try:
            return await handler(request)
        except web.HTTPException as e:  # aiohttp's own: a body over the size limit (413), an unknown path
            if e.status < 400:
                raise
            if request.path.startswith("/v1/"):
                self.stats["rejected"] += 1
                self.metrics.failed(e.status)
            message = e.text if e.status == 413 else f"{e.reason}: {request.method} {request.path}"
            return self._error(e.status, message)
        except BadRequest as e:  # the client's mistake: a 4xx naming it
            self.stats["rejected"] += 1
            self.metrics.failed(e.status)
            return self._error(e.status, str(e), e.param, e.code)
        except RequestFailed as e:
            self.stats["failed"] += 1
            self.metrics.failed(e.status)
            return self._error(e.status, str(e))
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            self.stats["failed"] += 1
            self.metrics.failed(500)
            return self._error(500, "internal error in the coordinator (see its log)")

    @web.middleware
    async def _api_key(self, request: web.Request, handler) -> web.StreamResponse:
        """With an API key configured, /v1/* needs `Authorization: Bearer <key>` (as vLLM's --api-key)."""
        key = self.cfg.scheduler.api_key
        if key and request.path.startswith("/v1/"):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                self.metrics.failed(401)
                return self._error(401, "missing or wrong API key (send 'Authorization: Bearer <key>')")
        return await handler(request)

    @staticmethod
    async def _json_body(request: web.Request) -> dict:
        try:
            body = await request.json(loads=_loads)
        except BadRequest:  # an integer beyond 64 bits
            raise
        except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
            raise BadRequest("request body is not valid JSON") from None
        except RecursionError:
            raise BadRequest("request body is nested too deeply") from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        return body

    async def http_completions(self, request: web.Request) -> web.StreamResponse:
        prompts, params, policy = self.parse(await self._json_body(request))
        cid = f"cmpl-{next(self._ids)}"
        reqs = [RequestState(f"{cid}-{i}" if len(prompts) > 1 else cid, tokens, params, policy)
                for i, tokens in enumerate(prompts)]
        self.stats["requests"] += len(reqs)
        if params["stream"]:
            return await self._stream(request, reqs[0])
        try:
            async with asyncio.TaskGroup() as group:  # one prompt failing stops the others: nobody gets them
                tasks = [group.create_task(self._complete(request, r)) for r in reqs]
        except ExceptionGroup as e:  # the first failure answers the request
            raise e.exceptions[0] from None
        done = [t.result() for t in tasks]
        return web.json_response(self._body(cid, reqs, done))

    async def http_chat(self, request: web.Request) -> web.StreamResponse:
        """/v1/chat/completions: the messages rendered with the chat template (chat.py) become the
        prompt; everything else is a completion."""
        body = await self._json_body(request)
        try:
            text = self.chat.render(body.get("messages"), body.get("tools"), body.get("tool_choice"))
        except ChatError as e:
            raise BadRequest(str(e), param=e.param) from None
        if body.get("parallel_tool_calls") is not None and body.get("tools"):
            # tool calls are not parsed out of answers here (chat.py): how many there may be is not ours to enforce
            raise BadRequest("'parallel_tool_calls' is not supported", param="parallel_tool_calls")
        rest = {k: v for k, v in body.items()
                if k not in ("messages", "tools", "tool_choice", "parallel_tool_calls", "prompt")}
        # without max_tokens, the answer may fill the rest of the context (vLLM's default for chat)
        prompts, params, policy = self.parse({**rest, "prompt": text}, default_max_tokens=None)
        req = RequestState(f"chatcmpl-{next(self._ids)}", prompts[0], params, policy)
        self.stats["requests"] += 1
        if params["stream"]:
            return await self._stream(request, req, chat=True)
        text, finish = await self._complete(request, req)
        return web.json_response({
            "id": req.rid, "object": "chat.completion", "created": int(time.time()), "model": self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "token_ids": req.output,
                         "logprobs": None, "finish_reason": finish}],
            "usage": self._usage([req]), "dualpath": self._dualpath(req)})

    async def _complete(self, request: web.Request, req: RequestState) -> tuple[str, str]:
        """Run one prompt to its end: (text, finish_reason)."""
        answer = AnswerText(self.tokenizer, req.params["stop"])
        async with contextlib.aclosing(self.generate(req)) as tokens:  # leaving it ends the attempt at once
            async for _ in tokens:
                self._new_text(req, answer)
                if answer.stopped:
                    self._answered(req)
                    break
                if request.transport is None or request.transport.is_closing():
                    # aiohttp does not cancel a handler whose client left: stop generating for nobody
                    self._client_gone(req)
                    break
            else:  # its engines finished it: the text held back is settled now
                answer.add(req.output, final=True)
        return answer.text, self._finish_reason(req, answer.stopped)

    def _new_text(self, req: RequestState, answer: AnswerText) -> str:
        """The text to give out for the token just generated. At max_tokens it is the last one, so
        the text held back (a partial character, a possible stop string's start) goes out with it."""
        return answer.add(req.output, final=len(req.output) >= req.params["max_tokens"])

    def _finish_reason(self, req: RequestState, hit_stop: bool) -> str:
        """'stop' for a stop string, a stop token id or the end-of-sequence token (even as the
        max_tokens-th token), else 'length' when max_tokens ended the answer."""
        ended = bool(req.output) and req.params["sampling"].stops_on(req.output[-1])
        return "stop" if hit_stop or ended or len(req.output) < req.params["max_tokens"] else "length"

    async def _stream(self, request: web.Request, req: RequestState, chat: bool = False) -> web.StreamResponse:
        """Server-sent events as OpenAI sends them: one chunk per token with the new text only, a last
        chunk with the finish reason (and our `dualpath` object), then the usage if asked, then [DONE].
        A chat stream carries the text as `delta` (the first one also names the assistant role)."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        answer, first = AnswerText(self.tokenizer, req.params["stop"]), True
        usage = None if req.params["include_usage"] else ...  # Ellipsis: no usage field at all

        def piece(text: str | None, tokens: list[int], finish: str | None) -> dict:
            nonlocal first
            if not chat:
                return {"index": 0, "text": text or "", "token_ids": tokens, "logprobs": None, "finish_reason": finish}
            delta = {} if text is None else {"content": text, **({"role": "assistant"} if first else {})}
            first = False
            return {"index": 0, "delta": delta, "token_ids": tokens, "logprobs": None, "finish_reason": finish}

        async def send(choices: list[dict], **extra) -> None:
            chunk = {"id": req.rid, "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": int(time.time()), "model": self.model_name, "choices": choices, **extra}
            if usage is not ...:
                chunk.setdefault("usage", None)
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())

        try:
            rest = ""  # text held back until the engines finished: it goes with the finish reason
            async with contextlib.aclosing(self.generate(req)) as tokens:  # leaving it ends the attempt at once
                async for tok in tokens:
                    await send([piece(self._new_text(req, answer), [tok], None)])
                    if answer.stopped:
                        self._answered(req)
                        break
                else:
                    rest = answer.add(req.output, final=True)
            await send([piece(rest or (None if chat else ""), [], self._finish_reason(req, answer.stopped))],
                       dualpath=self._dualpath(req))
            if usage is not ...:
                await send([], usage=self._usage([req]))
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError) as e:  # the client hung up: a write failed, or
            self._client_gone(req)  # aiohttp cancelled us. Not a failure of ours.
            if isinstance(e, asyncio.CancelledError):
                raise  # a cancelled task ends cancelled
        except RequestFailed as e:
            self.stats["failed"] += 1
            self.metrics.failed(e.status)
            error = {"message": str(e), "type": "server_error", "param": None, "code": e.status}
            with contextlib.suppress(ConnectionResetError):  # the client may have gone meanwhile
                await resp.write(f"data: {json.dumps({'error': error})}\n\n".encode())
        return resp

    def _body(self, cid: str, reqs: list[RequestState], done: list[tuple[str, str]]) -> dict:
        """A completion response; token_ids, cached_tokens and `dualpath` extend OpenAI's fields."""
        choices = [{"index": i, "text": text, "token_ids": r.output, "logprobs": None, "finish_reason": finish}
                   for i, (r, (text, finish)) in enumerate(zip(reqs, done))]
        body = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": self.model_name,
                "choices": choices, "usage": self._usage(reqs), "dualpath": self._dualpath(reqs[0])}
        if len(reqs) > 1:
            body["dualpath_per_choice"] = [self._dualpath(r) for r in reqs]
        return body

    def _usage(self, reqs: list[RequestState]) -> dict:
        prompt, completion = sum(len(r.tokens) for r in reqs), sum(len(r.output) for r in reqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(r.hit_blocks for r in reqs) * self.bt}}

    def _dualpath(self, req: RequestState) -> dict | None:
        d = req.decision
        if d is None:
            return None
        return {"pe": d.pe, "de": d.de, "policy": req.policy, "path": d.path,
                "read_bytes": {"pe": d.pe_blocks * self.block_bytes, "de": d.de_blocks * self.block_bytes},
                "ttft_s": (req.t_first or time.monotonic()) - req.t_arrival}

    @staticmethod
    def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> web.Response:
        kind = "server_error" if status >= 500 else ("authentication_error" if status == 401 else
                                                      "invalid_request_error")
        error = {"message": message, "type": kind, "param": param, "code": code or status}
        return web.json_response({"error": error}, status=status)

    async def http_models(self, _: web.Request) -> web.Response:
        name = self.model_name
        return web.json_response({"object": "list", "data": [{"id": name, "object": "model", "owned_by": "dualpath",
                                                               "max_context": self.max_context}]})

    async def http_metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def http_health(self, _: web.Request) -> web.Response:
        live = self.live_engines()
        roles = {e.role for e in live}
        ok = {"prefill", "decode"} <= roles
        return web.json_response({"ok": ok, "engines": sorted(e.name for e in live)}, status=200 if ok else 503)

    async def http_cluster(self, _: web.Request) -> web.Response:
        return web.json_response({"stats": self.stats, "waiting_for_room": len(self.waiting),
                                  "engines": {e.name: {"role": e.role, "node": e.node,
                                                       **(asdict(e.report) if e.report else {})}
                                              for e in self.live_engines()}})


async def serve(cfg: ClusterConfig, stop: asyncio.Event) -> None:
    coord = Coordinator(cfg)
    server = Server(cfg.transport.token, coord.on_engine, on_close=coord.on_close)
    await server.start(cfg.scheduler.host, cfg.scheduler.control_port)
    runner = web.AppRunner(coord.app(), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, cfg.scheduler.host, cfg.scheduler.http_port).start()
    log.info("coordinator: API at http://%s:%d/v1/completions", cfg.scheduler.host, cfg.scheduler.http_port)
    await stop.wait()
    coord.stopping = True
    await runner.cleanup()
    await server.close()
