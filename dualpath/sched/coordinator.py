"""The coordinator: engine registry, request table, prefix lookup, and scheduling.

Life of a request here (DESIGN.md §2 steps 1-4):
1. ``POST /v1/completions`` is read and validated by the API (api.py, parse.py: every user mistake
   is a 4xx naming it), which hands the request to ``Coordinator.generate``.
2. The prompt's full blocks are hashed into a chain; the store says how many leading blocks it
   holds: the hit. At least one token is always computed, so the PE can sample the first token.
3. The policy (``policy.py``) picks PE, DE and the read side from the engines' live load.
4. The DE is asked to admit (reserve a slot; start reading the hits on path B); the PE gets the
   prefill job. Tokens stream back from the DE to ``generate``, which retries an attempt whose
   engine died before its first token; the API turns them into OpenAI's responses (replies.py).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from dualpath.config import DTYPE_BYTES, ClusterConfig
from dualpath.engine.tokenizer import load_tokenizer
from dualpath.engine.architecture import model_identity
from dualpath.sched.api import Api
from dualpath.sched.chat import ChatTemplate
from dualpath.sched.dashboard import Dashboard
from dualpath.sched.errors import RequestFailed
from dualpath.sched.metrics import ClusterMetrics
from dualpath.sched.policy import (ClusterView, Decision, EngineLoad, NoEngine, NoRoom, RequestInfo, assigned,
                                   choose)
from dualpath.sched.waiting import WaitingRoom
from dualpath.storage.blockfile import BlockShape
from dualpath.storage.keys import block_chain
from dualpath.storage.store import FileStore
from dualpath.protocol import (Abort, Admit, Done, EngineReport, Engines, Failed, Heartbeat, Message, Prefill, Register, RunHandle,
                               Token, ask, dispatch, tell)
from dualpath.transport.control import Connection, RemoteError, Server

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # a request with no token yet is tried again when an engine of it dies, up to this often


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


class RequestStatus(enum.Enum):
    """Where a request is. A retry or a migration takes it back to WAITING."""

    WAITING = "waiting"  # for room or a live engine, or being admitted
    PREFILLING = "prefilling"  # its engines have it; no token of this attempt yet
    DECODING = "decoding"  # its tokens stream
    DONE = "done"  # answered in full
    FAILED = "failed"  # answered with an error
    ABORTED = "aborted"  # its client went away

    @property
    def running(self) -> bool:
        return self in (RequestStatus.PREFILLING, RequestStatus.DECODING)


@dataclass
class RequestState:
    request_id: str  # the client's: the id of its response
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
    migrations: int = 0  # times it continued on another engine after streaming tokens
    status: RequestStatus = RequestStatus.WAITING
    t_arrival: float = field(default_factory=time.monotonic)
    t_first: float | None = None
    t_scheduled: float | None = None  # admitted on its engines
    deadline: float = math.inf  # monotonic time by which the request is answered or failed

    @property
    def rid(self) -> str:
        """The id the engines know this attempt by: a retry is a new request to them, so a late
        abort of the failed attempt can never hit the retry, even on the same engines."""
        return f"{self.request_id}.{self.attempts}"

    @property
    def context(self) -> list[int]:
        """What an attempt starts from: the prompt, then the answer so far (a migrated request
        continues after the tokens it streamed)."""
        return self.tokens + self.output

    @property
    def complete(self) -> bool:
        """Whether the answer so far is the whole answer (its engine may die before saying so)."""
        s = self.params["sampling"]
        return len(self.output) >= self.params["max_tokens"] or (bool(self.output) and s.stops_on(self.output[-1]))


class Coordinator:
    def __init__(self, cfg: ClusterConfig):
        self.cfg = cfg
        self.model_cfg, self.fingerprint = model_identity(cfg.model.weights or cfg.model.preset, cfg.model.dtype)
        self.tokenizer = load_tokenizer(cfg.model.weights, self.model_cfg.vocab_size)
        self.chat = ChatTemplate(self.tokenizer.chat_template, self.tokenizer.bos_token, self.tokenizer.eos_token)
        self.bt = cfg.store.block_tokens
        shape = BlockShape(self.model_cfg.n_layers, self.bt * self.model_cfg.kv_width * DTYPE_BYTES[cfg.model.dtype],
                           cfg.model.dtype,
                           self.fingerprint)
        # Lookups only (the engines write and evict): no index of the store's files to build at start
        self.store = FileStore(cfg.store.root, shape, int(cfg.store.capacity_gb * 1e9), scan=False)
        self.block_bytes = shape.file_bytes
        self.max_context = cfg.engine.max_context or self.model_cfg.max_position
        self.engines: dict[str, EngineEntry] = {}
        # What the policies see: each live engine's last heartbeat plus what was assigned since
        self.view = ClusterView()
        self._sweep_at = 0.0  # when cluster_view next drops the engines that stopped heartbeating
        self.waiting = WaitingRoom()  # requests that found no room (or no engine of a role), oldest first
        self.stopping = False  # set when the coordinator stops: waiting for an engine is then pointless
        self.requests: dict[str, RequestState] = {}  # by rid: the attempts engines are running
        self.metrics = ClusterMetrics(self)
        self.dashboard = Dashboard(self)
        self.stats = {"requests": 0, "path_A": 0, "path_B": 0, "path_A+B": 0, "rejected": 0, "retried": 0, "migrated": 0,
                      "admit_retries": 0, "failed": 0, "client_gone": 0}

    # ------------------------------------------------------------------ engine registry (control plane)

    async def on_message(self, conn: Connection, kind: str, params: dict) -> Any:
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

    # ------------------------------------------------------------------ requests

    @property
    def model_name(self) -> str:
        """The model id clients send and /v1/models and /metrics name."""
        return self.cfg.model.served_model_name or self.cfg.model.weights or self.cfg.model.preset

    def new_request(self, request_id: str, tokens: list[int], params: dict, policy: str) -> RequestState:
        """A request the API has validated (parse.py); generate() runs it."""
        self.stats["requests"] += 1
        return RequestState(request_id, tokens, params, policy)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.bt)

    # ------------------------------------------------------------------ scheduling

    async def schedule(self, req: RequestState) -> None:
        """Steps 2-4: prefix lookup, policy, then admit on the DE and submit to the PE. Only engines
        with room are chosen; with none, the request waits its turn for room (oldest first, until
        its deadline). So it does while no engine of a role is live: one may be restarting (`dualpath
        up` restarts a crashed engine in seconds, and a request has minutes). A DE that refuses (no
        room after all) or does not answer while its heartbeats stop is passed over."""
        req.attempts += 1
        req.status = RequestStatus.WAITING
        self.requests[req.rid] = req
        context, generated = req.context, len(req.output)
        chain = block_chain(context, self.fingerprint, self.bt)
        # At least one token is computed: the PE needs the last context token's logits.
        # (a stat per block: on a thread, so that a long prompt does not hold up the event loop)
        hit = min(await asyncio.to_thread(self.store.lookup, chain), (len(context) - 1) // self.bt)
        if not generated:  # (usage reports the prompt's hits, as an uninterrupted run would)
            req.hit_blocks = hit
        n, m = len(context), req.params["max_tokens"] - generated
        info = RequestInfo(n, hit, self.block_bytes, m, self.blocks_for(n), self.blocks_for(n + m))
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
            rid, sampling = req.rid, req.params["sampling"]
            admit = Admit(rid, context, hit, d.de_blocks, sampling, pe=d.pe,
                          handoff_timeout_s=max(0.0, req.deadline - time.monotonic()), pe_incarnation=pe.incarnation,
                          generated=generated)
            try:
                de_run = RunHandle(**await self._ask(de, admit))
            except (RemoteError, ConnectionError, TimeoutError) as e:
                log.warning("%s: %s did not admit it (%s); trying another decode engine", req.request_id, d.de, e)
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
            await self._ask(pe, Prefill(rid, context, hit, d.de_blocks, sampling, d.de, de_run, generated))
            req.t_scheduled, req.status = time.monotonic(), RequestStatus.PREFILLING
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

    async def generate(self, req: RequestState) -> AsyncIterator[int]:
        """Yields generated token ids. A request whose hit blocks vanished or whose engine died (or
        went away before it took the request) is tried again: from the start while it has no token
        yet; after tokens, it migrates: it continues on live engines as prompt + the tokens it
        streamed, whose KV the dead DE persisted block by block, so the client's stream goes on
        with the next token (sampling depends only on the seed and the position: the same token)."""
        req.deadline = req.t_arrival + self.cfg.scheduler.request_timeout_s
        try:
            while True:
                news = await self._start(req)  # None: started; a Failed: its PE went away first
                while news is None:
                    event = await self._next_event(req)
                    if isinstance(event, Token):
                        if req.t_first is None:
                            req.t_first = time.monotonic()
                        req.status = RequestStatus.DECODING
                        req.output.append(event.token)
                        yield event.token
                    elif isinstance(event, Done):
                        self.answered(req)
                        return
                    else:
                        news = event
                if req.output and news.retry and req.complete:  # its engine died before saying it was done
                    self.answered(req)
                    return
                self._try_again(req, news)
                self._end_attempt(req)  # its DE slot and buffers are freed before the retry takes new ones
        except RequestFailed:
            req.status = RequestStatus.FAILED
            raise
        finally:
            self._end_attempt(req)

    def _try_again(self, req: RequestState, news: Failed) -> None:
        """Count another attempt of a failed one, or raise RequestFailed if it may not have one."""
        if not news.retry or (req.output and req.migrations >= self.cfg.scheduler.max_migrations) \
                or (not req.output and req.attempts >= MAX_ATTEMPTS):
            status = 503 if req.t_scheduled is None else 500  # never started: unavailable
            raise RequestFailed(status, f"request failed: {news.error}")
        if req.output:
            req.migrations += 1
            self.stats["migrated"] += 1
            self.metrics.migrations.labels(news.cause).inc()
            log.info("%s: %s after %d tokens; it continues on another engine", req.request_id, news.error,
                     len(req.output))
        else:
            self.stats["retried"] += 1
            self.metrics.retries.labels("attempt").inc()

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
            return Failed(req.rid, f"could not start the request: {e}", retry=True)
        return None

    def answered(self, req: RequestState, reason: str | None = None) -> None:
        """Count an answered request: its engines finished it, or (`reason` "stop") a stop string
        ended it in the API."""
        req.status = RequestStatus.DONE
        self.metrics.answered(req, time.monotonic(), self.bt, reason)
        self.dashboard.answered(req)

    def client_gone(self, req: RequestState) -> None:
        """Count a request whose client left (generate()'s closing frees its slot and buffers)."""
        log.info("client of %s went away; its slot and buffers are freed", req.request_id)
        req.status = RequestStatus.ABORTED
        self.stats["client_gone"] += 1
        self.metrics.aborted()

    def _end_attempt(self, req: RequestState) -> None:
        """Forget the current attempt and tell its engines to drop whatever they still hold for it."""
        if self.requests.pop(req.rid, None) is None or req.decision is None:
            return
        for conn in req.conns.values():  # (dropped where the engine is gone: its memory went with it)
            tell(conn, Abort(req.rid))

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
                for name in needed:
                    if (lost := self._lost(req, name)) is not None:
                        what = "died" if lost == "died" else "stopped heartbeating"
                        return Failed(req.rid, f"engine {name} {what}", retry=True, cause=lost)

    def _lost(self, req: RequestState, name: str) -> str | None:
        """None while engine `name`, as this attempt found it, is still there; else "died" (its
        connection closed, or it restarted: a new connection knows nothing of the request) or
        "silent" (it stopped heartbeating: a stopped process keeps its socket open)."""
        e = self.engines.get(name)
        if e is None or e.conn is not req.conns.get(name) or e.conn.closed.is_set():
            return "died"
        return None if self._alive(e) else "silent"

    # ------------------------------------------------------------------ HTTP

    def app(self) -> web.Application:
        """The HTTP API (api.py) serving this coordinator's requests."""
        return Api(self).app()


async def serve(cfg: ClusterConfig, stop: asyncio.Event) -> None:
    coord = Coordinator(cfg)
    server = Server(cfg.transport.token, coord.on_message, on_close=coord.on_close)
    await server.start(cfg.scheduler.host, cfg.scheduler.control_port)
    runner = web.AppRunner(coord.app(), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, cfg.scheduler.host, cfg.scheduler.http_port).start()
    log.info("coordinator: API at http://%s:%d/v1/completions", cfg.scheduler.host, cfg.scheduler.http_port)
    await stop.wait()
    coord.stopping = True
    await runner.cleanup()
    await server.close()
