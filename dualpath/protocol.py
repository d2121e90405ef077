"""The messages between the coordinator and the engines, one dataclass each.

A request's life by message (DESIGN.md §2):

    coordinator -> DE   Admit       reserve a slot and buffer; start reading path-B hits; answers a RunHandle
    coordinator -> PE   Prefill     load the hits (path A, and path B through the DE), compute the rest
    PE -> DE            Load        path B: write your hit blocks into my run, layer by layer
    PE -> DE            Prefilled   my KV is in your run, here is the first token: decode
    DE -> coordinator   Token, Done, Failed (a PE sends Failed too)
    coordinator -> both Abort       drop whatever you hold for this request
    engine -> coordinator Register (once), Heartbeat (its EngineReport, every heartbeat_s), Engines (peer addresses)

A message travels on the control plane (transport/control.py) as its kind (the class name in snake
case) and its fields; ``dispatch`` turns it back into the dataclass and calls the receiver's
``on_<kind>`` method, so a reader follows a request by name: ``Admit`` -> ``DecodeEngine.on_admit``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, get_type_hints


@dataclass(frozen=True)
class RunHandle:
    """Where a peer writes into one request's run of an engine's DRAM buffer: the engine's region
    handle (backend-specific: tcp address, shared-memory path, IPC handle or rkey, and the grant
    that lets exactly that peer write this run; and the engine's incarnation, so that a handle of
    an engine that has restarted since is refused), the run's byte offset, and its length in blocks.
    Its layout (layer-major) is the buffer's: engine/buffers.py ``run_layer_offset``."""

    region: dict
    offset: int
    n_blocks: int


@dataclass(frozen=True)
class Message:
    """Base of every control-plane message; `kind` (its class name in snake case) is how it travels."""

    kind: ClassVar[str]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.kind = re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()
        MESSAGES[cls.kind] = cls

    def params(self) -> dict[str, Any]:
        return {f.name: _to_wire(getattr(self, f.name)) for f in dataclasses.fields(self)}


MESSAGES: dict[str, type[Message]] = {}


@dataclass(frozen=True)
class Register(Message):
    engine: str  # its name, which must be the one it logged in with
    role: str
    node: int
    host: str
    port: int
    incarnation: str | None = None  # this life of the engine's process (transport/framing.py), as in its login


@dataclass(frozen=True)
class EngineReport:
    """An engine's state, sent in each heartbeat: what the policies decide with (free memory,
    queued work, its read queue and drain rates) and its counters for /metrics, the dashboard and
    /v1/cluster. A field of the other role stays at its default."""

    incarnation: str | None = None  # this life of the engine's process (a restart shows a new one)
    free_hbm_blocks: int = 0
    free_buffer_blocks: int = 0
    read_queue_bytes: int = 0  # storage reads queued at its node's NIC
    read_rate_bps: float = 0.0  # measured drain rate of its reads (scheduler.drain_rates)
    storage_read_bytes: int = 0
    storage_write_bytes: int = 0
    transport: str = ""  # its data-plane backend
    links: dict[str, str] = field(default_factory=dict)  # peer address -> the backend used to reach it
    network_sent_bytes: dict[str, int] = field(default_factory=dict)  # per traffic class
    metrics: dict[str, int] = field(default_factory=dict)  # event counters (paths, handoffs, fallbacks)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # where its time goes
    # a prefill engine
    queued_prefill_tokens: int = 0  # tokens still to compute of the requests it holds
    # a decode engine
    running_decode_tokens: int = 0  # prompt + max_tokens of every request it holds
    persist_queue: int | None = None  # blocks waiting to be written (None: not a decode engine)
    persist_written: int = 0
    persist_dropped: int = 0  # the write-behind queue was full
    persist_failed: int = 0  # the store refused the write (a full disk)
    delivery_cost: float = 0.0  # decode seconds its path-B deliveries cost per second


@dataclass(frozen=True)
class Heartbeat(Message):
    engine: str
    report: EngineReport


@dataclass(frozen=True)
class LastPrefill(Message):
    """Ask a PE for its last prefill's timeline: when each layer's hit KV landed and each layer
    started (`bench overlap` asks; it is not carried on every heartbeat)."""


@dataclass(frozen=True)
class Engines(Message):
    """Ask the coordinator for every engine's control address (answered name -> [host, port])."""


@dataclass(frozen=True)
class SamplingParams:
    """How a request's tokens are drawn and when its answer ends: OpenAI's and vLLM's sampling
    parameters, validated by the coordinator (sched/coordinator.py), applied where a token is drawn
    (engine/runtime.py ``sample``: the PE draws the first token, the DE the rest). It travels in
    Admit and Prefill, so both engines draw with the same parameters and the same seed.

    Defaults change nothing: greedy, no filtering, no penalties, no bias."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # keep the smallest set of most likely tokens whose mass reaches top_p
    top_k: int = -1  # keep the k most likely tokens (-1: all)
    min_p: float = 0.0  # keep tokens at least min_p times as likely as the most likely one
    seed: int = 0  # the draw of position i is seeded by (seed, i); the coordinator picks one if the client did not
    max_tokens: int = 16
    min_tokens: int = 0  # EOS and stop_token_ids cannot be drawn before this many tokens
    stop_token_ids: tuple[int, ...] = ()  # drawing one ends the answer (finish_reason "stop")
    ignore_eos: bool = False  # EOS does not end the answer
    eos_id: int | None = None  # the model's end-of-sequence token (the coordinator's tokenizer says)
    presence_penalty: float = 0.0  # subtracted from the logit of each token already generated
    frequency_penalty: float = 0.0  # ... times the number of times it was generated
    repetition_penalty: float = 1.0  # logits of prompt and generated tokens: positive / it, negative * it
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit) pairs

    def __post_init__(self):
        # msgpack gives arrays back as lists: normalise to tuples, so a message survives the wire
        # equal to itself and stays hashable (token-id keys cannot be msgpack map keys: pairs instead)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in self.logit_bias))

    @property
    def processes_logits(self) -> bool:
        """Whether any parameter but temperature changes the logits or the candidates (else a
        greedy row is the plain argmax: engine/runtime.py keeps those on the batched fast path)."""
        return bool(self.logit_bias or self.min_tokens or self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0 or self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0)

    def stops_on(self, token: int) -> bool:
        """Whether drawing `token` ends the answer: a stop token id, or EOS unless ignore_eos."""
        return token in self.stop_token_ids or (token == self.eos_id and not self.ignore_eos)


@dataclass(frozen=True)
class Admit(Message):
    rid: str
    tokens: list[int]
    hit_blocks: int  # leading prompt blocks whose KV is stored (loaded, not computed)
    de_blocks: int  # of those, the leading blocks the DE reads (path B)
    sampling: SamplingParams  # with max_tokens: the DE reserves HBM for prompt + max_tokens
    pe: str  # the only peer granted to write the handoff into the run
    handoff_timeout_s: float  # no Prefilled by then: the slot is freed
    pe_incarnation: str | None = None  # the PE's process life, as it logged in: the grant binds to it
    # Of `tokens`, the trailing ones that are already answer: a request whose engine died continues
    # elsewhere as prompt + the tokens it streamed (sched/coordinator.py), and they still count as
    # answer for max_tokens, min_tokens and the penalties
    generated: int = 0


@dataclass(frozen=True)
class Prefill(Message):
    rid: str
    tokens: list[int]
    hit_blocks: int
    de_blocks: int
    sampling: SamplingParams  # the PE draws the first token with it
    de: str
    de_run: RunHandle  # the DE's run: where the handoff goes
    generated: int = 0  # as Admit's: trailing tokens that are already answer


@dataclass(frozen=True)
class Load(Message):
    rid: str
    pe_run: RunHandle  # where the DE writes the path-B hits: the PE's run, granted to that DE


@dataclass(frozen=True)
class LayerLanded(Message):
    """Path B: the DE wrote layer `layer` of request `rid`'s hit KV into the PE's buffer. It travels
    as the notify of the data-plane write that carried the layer (it arrives once the bytes have:
    transport/dataplane.py), not on the control plane; ``as_notify`` and ``from_notify`` wrap it."""

    rid: str
    layer: int

    def as_notify(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.params()}

    @staticmethod
    def from_notify(notify: Any) -> "LayerLanded":
        """ValueError for anything else (the writer proved the cluster secret, but a bad payload must
        cost nothing but itself)."""
        if not isinstance(notify, dict) or notify.get("kind") != LayerLanded.kind:
            raise ValueError(f"not a layer landing: {notify!r:.80}")
        msg = from_wire(LayerLanded.kind, {k: v for k, v in notify.items() if k != "kind"})
        if not isinstance(msg.rid, str) or not isinstance(msg.layer, int) or isinstance(msg.layer, bool):
            raise ValueError(f"malformed layer landing: {notify!r:.80}")
        return msg


@dataclass(frozen=True)
class Prefilled(Message):
    rid: str
    first_token: int


@dataclass(frozen=True)
class Abort(Message):
    rid: str


@dataclass(frozen=True)
class Token(Message):
    rid: str
    token: int


@dataclass(frozen=True)
class Done(Message):
    rid: str
    cancelled: bool = False


@dataclass(frozen=True)
class Failed(Message):
    rid: str
    error: str
    retry: bool = False  # another attempt (new engines) may succeed
    # why the attempt ended, as metrics count it: "failed" (an engine said so), or, as the
    # coordinator finds it, "died" (its connection closed, or it restarted) or "silent" (no heartbeat)
    cause: str = "failed"


@dataclass(frozen=True)
class Failure:
    """Why an engine ended a request's attempt early, and whether another attempt (on new engines,
    or once a hit block that vanished is computed instead) may succeed. An engine reports it to the
    coordinator as a Failed message."""

    reason: str
    retryable: bool = False

    def __str__(self) -> str:
        return self.reason


STRUCTS = (RunHandle, EngineReport, SamplingParams)  # dataclass fields of messages: a dict on the wire


def _to_wire(v: Any) -> Any:
    if isinstance(v, STRUCTS):
        return dataclasses.asdict(v)
    return v


async def ask(conn: Any, msg: Message, timeout: float | None = 30.0) -> Any:
    """Send `msg` on a control connection and return the receiver's answer."""
    return await conn.request(msg.kind, timeout=timeout, **msg.params())


def tell(conn: Any, msg: Message) -> None:
    """Send `msg` one way (dropped if the connection is closed: the peer is gone)."""
    conn.event(msg.kind, **msg.params())


@functools.cache
def _fields(cls: type[Message]) -> list[tuple[str, type | None, bool]]:
    """(name, its dataclass if it is one of STRUCTS, required) per field: worked out once per message
    class, not per message (a Token arrives for every generated token)."""
    hints = get_type_hints(cls)
    return [(f.name, hints[f.name] if hints[f.name] in STRUCTS else None, f.default is dataclasses.MISSING)
            for f in dataclasses.fields(cls)]


def _struct(cls: type, value: dict) -> Any:
    """A struct from its wire dict; keys it does not have are ignored (a newer peer's)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in value.items() if k in names})


def from_wire(kind: str, params: dict) -> Message:
    """The message a (kind, params) pair from the wire stands for; ValueError if it is none."""
    cls = MESSAGES.get(kind)
    if cls is None:
        raise ValueError(f"unknown message {kind!r}")
    kwargs = {}
    for name, struct, required in _fields(cls):
        if name not in params:
            if required:
                raise ValueError(f"message {kind!r} lacks field {name!r}")
            continue
        kwargs[name] = _struct(struct, params[name]) if struct is not None else params[name]
    return cls(**kwargs)


async def dispatch(receiver: Any, conn: Any, kind: str, params: dict) -> Any:
    """Call ``receiver.on_<kind>(conn, message)``: the control plane's handler for typed messages."""
    msg = from_wire(kind, params)
    handler = getattr(receiver, f"on_{msg.kind}", None)
    if handler is None:
        raise ValueError(f"{type(receiver).__name__} does not take {msg.kind!r} messages")
    return await handler(conn, msg)
