"""What every engine process has: the model, HBM pool, DRAM buffer, store, data plane, and its links
to the coordinator and to peer engines. ``PrefillEngine`` and ``DecodeEngine`` build on it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Coroutine

import torch

from dualpath.config import ClusterConfig, EngineSpec
from dualpath.device import device_threads, make_current, until_done
from dualpath.engine.buffers import BufferPool, BufferRun
from dualpath.engine.kvcache import KVPool, OutOfBlocks
from dualpath.engine.weights import load_pretrained
from dualpath.protocol import (EngineReport, Engines, Heartbeat, Register, RunHandle, SamplingParams, ask, dispatch,
                               tell)
from dualpath.storage.blockfile import BlockShape
from dualpath.storage.store import open_store
from dualpath.transport import make_dataplane
from dualpath.transport.verbs import RdmaOptions
from dualpath.transport.control import Connection, Server, connect
from dualpath.transport.framing import new_incarnation

log = logging.getLogger(__name__)
HANDOFF_FENCE_S = 60.0  # an abort waits this long at most for a handoff's writes (each write's own timeout)


def process_logits(logits: torch.Tensor, p: SamplingParams, tokens: Sequence[int], prompt_len: int) -> torch.Tensor:
    """The logits a token is drawn from, before temperature: logits [vocab] -> [vocab] float64 on
    the host. `tokens` is the prompt (its first `prompt_len`) and the tokens generated so far.
    In vLLM's order: logit_bias, then min_tokens (EOS and stop_token_ids cannot be drawn before
    min_tokens tokens), then the penalties: repetition as vLLM and HF apply it (a token of prompt
    or output has a positive logit divided by it, a negative one multiplied), presence and frequency
    as OpenAI does (over the output only: logit -= frequency * count + presence * (count > 0))."""
    x = logits.detach().to("cpu", torch.float64).clone()
    if p.logit_bias:
        ids = torch.tensor([t for t, _ in p.logit_bias], dtype=torch.long)
        x.index_add_(0, ids, torch.tensor([b for _, b in p.logit_bias], dtype=torch.float64))
    if len(tokens) - prompt_len < p.min_tokens:
        banned = [*p.stop_token_ids, *([p.eos_id] if p.eos_id is not None else [])]
        if banned:
            x[torch.tensor(banned, dtype=torch.long)] = -math.inf
    if p.repetition_penalty != 1.0 and len(tokens):
        seen = torch.tensor(sorted(set(tokens)), dtype=torch.long)
        v = x[seen]
        x[seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and len(tokens) > prompt_len:
        counts = torch.bincount(torch.tensor(tokens[prompt_len:], dtype=torch.long), minlength=len(x)).double()
        x -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).double()
    return x


def filter_probs(probs: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """probs [vocab] (after temperature) with the tokens top_k, top_p and min_p rule out set to 0
    (not renormalised: torch.multinomial takes weights). The most likely token always stays."""
    keep = torch.ones_like(probs, dtype=torch.bool)
    if 0 < p.top_k < len(probs):
        keep[:] = False
        keep[torch.topk(probs, p.top_k).indices] = True
    if p.top_p < 1.0:
        # the smallest set of most likely tokens whose mass reaches top_p: a token stays if the
        # mass before it (in descending order) is still short of top_p, so the first always stays
        kept = torch.where(keep, probs, 0.0)
        sorted_p, order = torch.sort(kept, descending=True, stable=True)
        before = torch.cumsum(sorted_p, 0) - sorted_p
        in_nucleus = torch.zeros_like(keep)
        in_nucleus[order] = before < p.top_p * kept.sum()
        keep &= in_nucleus
    if p.min_p > 0:
        keep &= probs >= p.min_p * probs[keep].max()
    return torch.where(keep, probs, 0.0)


def sample(logits: torch.Tensor, p: SamplingParams, tokens: Sequence[int], prompt_len: int) -> int:
    """The next token after `tokens` (prompt, then what was generated) from its logits [vocab].
    Greedy at temperature 0; otherwise a draw seeded by (seed, position), position = len(tokens),
    so the PE (first token) and the DE (the rest) draw the same sequence a single engine would.
    Never raises: where the distribution is not finite (an extreme temperature) the draw is
    greedy, and only this request is affected, not the batch it runs in."""
    x = process_logits(logits, p, tokens, prompt_len) if p.processes_logits else logits.double().cpu()
    if p.temperature <= 0:
        return int(x.argmax())
    probs = filter_probs(torch.softmax(x / p.temperature, -1), p)
    if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:
        return int(x.argmax())
    g = torch.Generator().manual_seed((p.seed * 1_000_003 + len(tokens)) & (2**63 - 1))
    return int(torch.multinomial(probs, 1, generator=g))


def sample_batch(logits: torch.Tensor, rows: list[tuple[SamplingParams, Sequence[int], int]]) -> list[int]:
    """``sample`` for each row of logits [B, vocab] and its (params, tokens, prompt_len), with the
    same draws, in two device-to-host transfers at most instead of one per row (each waits for the
    GPU): the argmax of every row, and the rows drawn from or whose logits are processed. A greedy
    row with no logits processing stays on the batched argmax."""
    next_tokens = logits.argmax(-1).tolist()
    hot = [i for i, (p, _, _) in enumerate(rows) if p.temperature > 0 or p.processes_logits]
    if hot:
        host = logits[hot].cpu()
        for row, i in zip(host, hot):
            next_tokens[i] = sample(row, *rows[i])
    return next_tokens


FREED_BEAT_GAP_S = 0.02  # frees closer together than this share one heartbeat


@dataclass(kw_only=True)
class EngineRequest:
    """What an engine holds for one request, whichever its role (PrefillJob, DecodeSeq): the
    request's tokens, hits and sampling, and the memory it holds with the I/O into it."""

    rid: str  # the attempt's id (the coordinator's request id and attempt number)
    tokens: list[int]  # the prompt, then the answer so far (a migrated request arrives with part of it)
    prompt_len: int
    hit_blocks: int  # leading blocks whose KV is stored (loaded, not computed)
    de_blocks: int  # of those, the leading blocks the DE reads (path B); the PE reads the rest (path A)
    sampling: SamplingParams  # how its tokens are drawn, and when its answer ends
    run: BufferRun | None = None  # its run of our DRAM buffer
    grant: dict | None = None  # the peer's leave to write into that run (the DE's path B, the PE's handoff)
    blocks: list[int] = field(default_factory=list)  # its HBM blocks
    io: list[asyncio.Task] = field(default_factory=list)  # reads into the run, and writes out of it

    @property
    def generated(self) -> int:
        """Answer tokens among `tokens`."""
        return len(self.tokens) - self.prompt_len


class Engine:
    role = ""

    def __init__(self, cfg: ClusterConfig, spec: EngineSpec):
        self.cfg, self.spec, self.name = cfg, spec, spec.name
        # This process's life: in every login, Register, buffer handle and grant of ours. Restarted
        # under the same name and address we are a new peer, and nothing of our predecessor's is
        # used on us (a peer's mapping of its buffer once outlived it: transport/shm.py).
        self.incarnation = new_incarnation()
        self.device = torch.device(spec.device)
        make_current(self.device)  # this thread runs the event loop: its CUDA work goes to our GPU too
        self.dtype = getattr(torch, cfg.model.dtype)
        self.bt = cfg.store.block_tokens
        self.model = load_pretrained(cfg.model.weights or cfg.model.preset, self.device, self.dtype)
        mc = self.model.cfg
        self.pool = KVPool(mc, cfg.engine.hbm_blocks, self.bt, self.device, self.dtype)
        bpl = self.pool.block_bytes_per_layer
        self.buffer = BufferPool(cfg.engine.buffer_blocks, mc.n_layers, bpl, shared=True)
        self.shape = BlockShape(mc.n_layers, bpl, cfg.model.dtype, self.model.fingerprint)
        self.metrics: Counter[str] = Counter()
        # Model compute runs on one thread so the event loop keeps receiving KV while a layer runs.
        self.compute = device_threads(1, f"{self.name}-compute", self.device)
        on_cuda = self.device.type == "cuda"
        self.h2d_stream = torch.cuda.Stream(self.device) if on_cuda else None
        self.d2h_stream = torch.cuda.Stream(self.device) if on_cuda else None  # handoffs: HBM -> buffer
        # Where this engine's time goes, in seconds per stage (bench ingest prints it; /metrics has it)
        self.stage_s: Counter[str] = Counter()
        self.peers: dict[str, Connection] = {}
        self._connecting: dict[str, asyncio.Lock] = {}  # one connect per peer at a time (no duplicates)
        self.peer_addrs: dict[str, tuple[str, int]] = {}
        self.coord: Connection | None = None
        self.stopping = asyncio.Event()
        self.stop_reason = "lost the coordinator"
        self._loops: set[asyncio.Task] = set()
        self._tasks: set[asyncio.Task] = set()  # one request's background work (spawn)
        self.freed = asyncio.Event()  # memory was given back: say so in a heartbeat now (sched/waiting.py)
        self.read_rate_bps = 0.0  # how fast we drain our reads, as drained() counts (policy.py compares drain times)
        self._rate_mark = (0, 0.0)  # drained() at the last rate update

    # -- start / stop --

    async def start(self) -> None:
        c = self.cfg
        self.store = open_store(c.store.root, self.shape, int(c.store.capacity_gb * 1e9), node=self.spec.node,
                                read_gbps=c.store.snic_read_gbps, write_gbps=c.store.snic_write_gbps,
                                readers=c.store.readers, read_spans=c.store.read_spans,
                                write_threads=c.store.write_threads, min_free_bytes=int(c.store.min_free_gb * 1e9))
        if self.buffer.share_path is None:
            raise RuntimeError("the DRAM buffer is not shared memory (no memfd): the store's reader processes "
                               "cannot map it")
        await self.store.attach(self.buffer.share_path, self.buffer.host.numel())
        self.dataplane = make_dataplane(c.transport.backend, self.name, c.transport.token,
                                        on_complete=self.on_write_complete,
                                        bulk_chunk_bytes=c.transport.bulk_chunk_bytes,
                                        latency_share=c.transport.latency_share, host=self.spec.host,
                                        device=self.device, incarnation=self.incarnation, rdma=RdmaOptions(
                                            c.transport.rdma_device, c.transport.rdma_port,
                                            c.transport.rdma_gid_index, c.transport.rdma_hop_limit),
                                        register_first=self.buffer.host)  # verbs only if the buffer registers
        try:
            await self.dataplane.start(self.spec.host, self.spec.port + 1000 if self.spec.port else 0)
        except OSError as e:  # an address of another host, or a port taken: say so, do not hang
            raise SystemExit(f"{self.name}: cannot listen on {self.spec.host} ({e.strerror}); its engines[].host "
                             f"must be an address of this host, and ports {self.spec.port} and "
                             f"{self.spec.port + 1000} free") from None
        # One registered region over the whole DRAM buffer: every request's run is an offset into it.
        self.buffer_handle = self.dataplane.register(self.buffer.host, share_path=self.buffer.share_path,
                                                     granted_only=True)
        self.control = Server(c.transport.token, self.handle, incarnation=self.incarnation)
        port = await self.control.start(self.spec.host, self.spec.port)
        self.spec.port = port
        self.coord = await self._connect_coordinator()
        await ask(self.coord, Register(self.name, self.role, self.spec.node, self.spec.host, port, self.incarnation))
        self.start_loop(self._heartbeat())
        log.info("%s ready (device %s, backend %s, incarnation %s)", self.name, self.device, self.dataplane.backend,
                 self.incarnation)

    def start_loop(self, loop: Coroutine[Any, Any, None]) -> None:
        """Run one of the engine's loops (heartbeats, steps). If one fails, the engine stops and its
        process exits: an engine that heartbeats but no longer steps would take requests and hold them."""
        task = asyncio.create_task(loop)
        self._loops.add(task)  # (the event loop keeps only a weak reference to a task)

        def ended(t: asyncio.Task) -> None:
            self._loops.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("%s: %s failed; stopping", self.name, t.get_coro().__qualname__, exc_info=t.exception())
                self.stop_reason = f"{t.get_coro().__qualname__} failed: {t.exception()!r}"
                self.stopping.set()

        task.add_done_callback(ended)

    def spawn(self, work: Coroutine[Any, Any, Any], what: str) -> asyncio.Task:
        """Run one request's background work (an admission, a finish, a drop) as a task that is
        kept until it ends and whose failure is logged: the event loop holds only a weak reference
        to a task, and an exception nobody retrieves is lost."""
        task = asyncio.create_task(work)
        self._tasks.add(task)

        def ended(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("%s: %s failed", self.name, what, exc_info=t.exception())

        task.add_done_callback(ended)
        return task

    async def _connect_coordinator(self) -> Connection:
        s = self.cfg.scheduler
        deadline = time.monotonic() + 60
        while True:
            try:
                return await connect(s.host, s.control_port, self.cfg.transport.token, self.name, self.handle,
                                     incarnation=self.incarnation)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def stop(self) -> None:
        self.stopping.set()
        await self.dataplane.close()
        await self.control.close()
        await self.store.close()
        self.compute.shutdown(wait=False)

    # -- load report --

    def report(self) -> EngineReport:
        """What this heartbeat tells the coordinator (each role adds its own fields)."""
        io = self.store.stats
        return EngineReport(
            incarnation=self.incarnation, free_hbm_blocks=self.pool.allocator.free,
            free_buffer_blocks=self.buffer.free_blocks, read_queue_bytes=self.store.read_queue_bytes(),
            read_rate_bps=self.read_rate_bps, storage_read_bytes=io.read_bytes, storage_write_bytes=io.write_bytes,
            transport=self.dataplane.backend, links=self.dataplane.links(),
            network_sent_bytes=dict(self.dataplane.sent_bytes), metrics=dict(self.metrics),
            stage_seconds={**self.stage_s, "storage_reader_busy": self.store.reader_busy_s,
                           "storage_reads_outstanding": self.store.read_busy_s()})

    async def _heartbeat(self) -> None:
        """A heartbeat every interval, and one as soon as memory is freed (requests may be waiting
        for room: sched/waiting.py), frees within FREED_BEAT_GAP_S of each other sharing one."""
        interval = self.cfg.scheduler.heartbeat_s
        rate_at = 0.0
        while not self.stopping.is_set():
            if self.coord.closed.is_set():
                log.error("%s lost the coordinator; stopping", self.name)
                self.stopping.set()
                return
            if time.monotonic() - rate_at >= interval:  # over intervals, however often we beat
                self._measure_read_rate()
                rate_at = time.monotonic()
            self.freed.clear()
            tell(self.coord, Heartbeat(self.name, self.report()))
            try:
                await asyncio.wait_for(self.freed.wait(), interval)
                await asyncio.sleep(min(FREED_BEAT_GAP_S, interval))
            except TimeoutError:
                pass

    def drained(self) -> tuple[int, float]:
        """(bytes, busy seconds) our reads have drained so far: what read_rate_bps is measured from.
        A PE's reads land in its own buffer; a DE counts its path-B deliveries instead."""
        return self.store.read_done_bytes, self.store.read_busy_s()

    def _measure_read_rate(self, alpha: float = 0.3) -> None:
        """Fold the draining done since the last update into read_rate_bps (a moving average), once
        there was at least 20 ms of it: idle time says nothing about how fast we drain."""
        done, busy = self.drained()
        d_done, d_busy = done - self._rate_mark[0], busy - self._rate_mark[1]
        if d_busy >= 0.02:
            rate = d_done / d_busy
            self.read_rate_bps = rate if not self.read_rate_bps else (1 - alpha) * self.read_rate_bps + alpha * rate
            self._rate_mark = (done, busy)

    # -- peers --

    async def peer(self, name: str) -> Connection:
        async with self._connecting.setdefault(name, asyncio.Lock()):
            conn = self.peers.get(name)
            if conn is None or conn.closed.is_set():
                if name not in self.peer_addrs:
                    self.peer_addrs.update({k: tuple(v) for k, v in (await ask(self.coord, Engines())).items()})
                if name not in self.peer_addrs:
                    raise KeyError(f"unknown peer engine {name!r}")
                host, port = self.peer_addrs[name]
                conn = self.peers[name] = await connect(host, port, self.cfg.transport.token, self.name, self.handle,
                                                        incarnation=self.incarnation)
            return conn

    def peer_incarnation(self, name: str) -> str | None:
        """The incarnation of engine `name` as our live control connection to it (to the address the
        coordinator registered for that name) says; None if we have none open."""
        conn = self.peers.get(name)
        return conn.peer_incarnation if conn is not None and not conn.closed.is_set() else None

    # -- helpers shared by both roles --

    def run_handle(self, req, peer: str, peer_incarnation: str | None = None) -> RunHandle:
        """Where `peer` writes into a request's buffer run: our region, granted to that peer for the
        run's bytes only (revoked with the request's memory), plus the run's byte offset. The grant
        is bound to the peer's incarnation: as given (a DE's admit names its PE's, as the coordinator
        registered it), or the one our control connection to it knows (a PE has just asked its DE
        to load), or else the one that writes through it first."""
        off, nbytes = self.buffer.byte_range(req.run)
        inc = peer_incarnation or self.peer_incarnation(peer)
        req.grant = self.dataplane.grant(self.buffer_handle, off, nbytes, peer, inc)
        return RunHandle(req.grant, off, req.run.n_blocks)

    async def read_blocks(self, keys: list[bytes], run: BufferRun, first: int = 0, on_layer=None) -> bool:
        """Storage → our DRAM buffer: blocks keys[i] into slot first+i of the run, layer by layer
        (``on_layer(l)`` once layer l of all of them is in). False on any miss, and on a read that
        failed outright (no reader process could start, say): the request is retried, never stuck."""
        try:
            ok = await self.store.read_many(keys, self.buffer.slot_dests(run, first), on_layer)
        except Exception as e:
            log.error("%s: storage read of %d blocks failed: %s", self.name, len(keys), e)
            return False
        self.metrics["storage_read_blocks"] += len(keys)  # the bytes actually read: load()'s storage_read_bytes
        return all(ok)

    def hbm_index(self, blocks: list[int]) -> torch.Tensor:
        """HBM block ids as a device tensor, made once per request (not once per layer). On CUDA the
        copy stream is ordered after all compute enqueued so far here: whatever earlier work still
        touches these blocks (a failed step's, say) is done before buffer_to_hbm overwrites them."""
        index = torch.tensor(blocks, dtype=torch.long, device=self.device)
        if self.h2d_stream is not None:
            self.h2d_stream.wait_stream(torch.cuda.current_stream(self.device))
            # Made on the compute stream, read on the copy stream: without this the allocator could
            # hand its memory to the next decode step while a copy still reads it as its index.
            index.record_stream(self.h2d_stream)
        return index

    def buffer_to_hbm(self, run: BufferRun, blocks: torch.Tensor, layer: int, compute_waits: bool = True) -> None:
        """Copy layer `layer` of the run's first len(blocks) slots into the given HBM blocks (index from
        hbm_index) (H2D). On CUDA the copy runs on its own stream and the compute stream waits for
        it there (not the host), so the copy of layer l+1 overlaps the compute of layer l. With
        compute_waits=False the caller waits instead (``copies_done``) before computing on them."""
        if not len(blocks):
            return
        src = self.buffer.view(run)[layer, : len(blocks)]
        src = src.view(self.dtype).view(len(blocks), self.bt, self.model.cfg.kv_width)
        if self.h2d_stream is None:
            self.pool.layer(layer).index_copy_(0, blocks, src)
            return
        with torch.cuda.stream(self.h2d_stream):
            self.pool.layer(layer).index_copy_(0, blocks, src.to(self.device, non_blocking=True))
        if compute_waits:
            torch.cuda.current_stream(self.device).wait_stream(self.h2d_stream)

    async def copies_done(self) -> None:
        """Wait, without holding up the compute thread or stream, until every host-to-device copy
        enqueued so far has finished (and its source buffer may be reused)."""
        if self.h2d_stream is not None:
            done = torch.cuda.Event()
            done.record(self.h2d_stream)
            await until_done(done)

    def hbm_to_buffer(self, run: BufferRun, blocks: list[int], lo: int = 0) -> torch.cuda.Event | None:
        """Enqueue all layers of the given HBM blocks into run slots [lo, ...) (D2H). On CUDA the copy
        runs on its own stream, straight into the pinned buffer, after the compute enqueued so far
        (which wrote these blocks); the returned event says when it is done (``until_done``), so
        neither the compute thread nor the event loop waits for it meanwhile."""
        if not blocks:
            return None
        dst = self.buffer.view(run)[:, lo : lo + len(blocks)]  # [layers, k, bytes/layer]; layer l contiguous
        if self.d2h_stream is None:
            dst.copy_(self.pool.kv[:, torch.tensor(blocks)].view(torch.uint8).view(dst.shape))
            return None
        self.d2h_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.d2h_stream):  # made, used and freed on this stream only
            data = self.pool.kv[:, torch.tensor(blocks, device=self.device)].view(torch.uint8).view(dst.shape)
            for l in range(len(dst)):
                dst[l].copy_(data[l], non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        return done

    def free_request_memory(self, req: EngineRequest) -> None:
        """Give back a request's DRAM buffer run and HBM blocks (idempotent). While a read or a
        peer's write into its run is still under way (an abort mid-load), wait for it: the run must
        not be handed to another request while bytes still land in it."""
        pending = [t for t in req.io if not t.done()]
        if pending:
            asyncio.gather(*pending, return_exceptions=True).add_done_callback(
                lambda _: self.free_request_memory(req))
            return
        if req.grant is not None:
            self.dataplane.revoke(req.grant)
            req.grant = None
        if req.run is not None:
            self.buffer.release(req.run)
            req.run = None
            self.freed.set()
        if req.blocks:
            self.pool.allocator.release(req.blocks)
            req.blocks = []
            self.freed.set()

    async def take_memory(self, req, buffer_blocks: int, hbm_blocks: int) -> None:
        """A request's DRAM-buffer run and HBM blocks, waiting (each pool's Room) at most
        engine.memory_wait_s for both together; then MemoryError: the request fails rather than wait
        behind a leak."""
        wait_s = self.cfg.engine.memory_wait_s
        deadline = time.monotonic() + wait_s
        try:
            req.run = await asyncio.wait_for(self.buffer.alloc(buffer_blocks), wait_s)
        except asyncio.TimeoutError:
            raise MemoryError(f"{self.name}: no room for {buffer_blocks} DRAM-buffer blocks within {wait_s:g} s")
        try:
            req.blocks = await asyncio.wait_for(self.pool.allocator.alloc_wait(hbm_blocks),
                                                max(0.0, deadline - time.monotonic()))
        except (asyncio.TimeoutError, OutOfBlocks):
            self.buffer.release(req.run)
            req.run = None
            raise MemoryError(f"{self.name}: no room for {hbm_blocks} HBM blocks within {wait_s:g} s")

    async def in_compute(self, fn, *args, stage: str = "compute"):
        """Run fn on the compute thread; its time there counts toward `stage`."""
        def timed():
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.stage_s[stage] += time.perf_counter() - t0

        return await asyncio.get_running_loop().run_in_executor(self.compute, timed)

    @contextlib.contextmanager
    def timed(self, stage: str):
        """Time spent in the block (on the event loop, often awaiting) counts toward `stage`."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stage_s[stage] += time.perf_counter() - t0

    # -- to be provided by the roles --

    def on_write_complete(self, notify: Any) -> None:
        pass

    async def handle(self, conn: Connection, kind: str, params: dict) -> Any:
        """Every control message to this engine goes to its ``on_<kind>`` method (protocol.py)."""
        return await dispatch(self, conn, kind, params)
