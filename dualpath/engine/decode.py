"""The decode engine (DE): path-B reads, the merge of handed-off KV, continuous batching decode,
token streaming, and asynchronous persistence of every block that becomes full (DESIGN.md §2 step 7).

Per request the DE reserves, at admission, HBM blocks for prompt + max_tokens and a DRAM buffer run
for the prompt's blocks. On path B it reads its share of the hit blocks, slots [0, de_blocks) of that
run, itself and writes them to the PE layer by layer (bulk class); the PE later fills the remaining
slots. On path A (de_blocks = 0) the PE fills every slot. Either way the run ends up holding the whole
prompt's KV, which is copied to HBM once (the merge) and persisted from host memory without a
device round trip.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import torch

from dualpath.config import ClusterConfig, EngineSpec
from dualpath.engine.buffers import run_layer_offset
from dualpath.engine.graphs import DecodeGraphs
from dualpath.engine.kvcache import OutOfBlocks
from dualpath.engine.runtime import HANDOFF_FENCE_S, Engine, EngineRequest, sample_batch
from dualpath.protocol import (Abort, Admit, Done, EngineReport, Failed, LayerLanded, Load, Prefilled, RunHandle,
                               Token, ask, tell)
from dualpath.storage.keys import block_chain, next_key
from dualpath.storage.persist import Persister
from dualpath.storage.store import BusyClock
from dualpath.transport.control import Connection

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class DecodeSeq(EngineRequest):
    """A request on the DE: its slot reserved, its path-B share read and sent, its handoff merged,
    then decoded, every full block persisted."""

    context_len: int  # tokens at admission, whose KV the handoff brings: the prompt, or a migrated
    # request's prompt + the answer it had streamed (protocol.Admit.generated)
    pe: str = ""  # the PE that writes its handoff into our run
    keys: list[bytes] = field(default_factory=list)  # chain keys of the full blocks so far
    hit_layers: list[asyncio.Event] = field(default_factory=list)  # path B: set when layer l is read, or on a miss
    layers_read: int = 0  # layers of our path-B read that are in and verified
    persisted: list[asyncio.Future] = field(default_factory=list)
    expiry: asyncio.TimerHandle | None = None  # frees the slot if no handoff comes by the deadline
    cancelled: bool = False
    prefilled: bool = False  # the PE's handoff arrived: _merge, then the decode loop, end the request

    @property
    def max_tokens(self) -> int:
        return self.sampling.max_tokens


@dataclass
class DeliveryCost:
    """What path-B deliveries cost this DE's decoding, measured like for like: decode steps of the
    same batch size taken while a delivery was under way against those taken without one (moving
    averages of step time per size), the slowdown weighted by the sequences it delays. The policies
    charge path B this many seconds of decoding per second of delivery (policy.py). A size seen
    only one way says nothing: under storage load a delivery is under way at almost every step, and
    comparing with the idle moments' smaller batches measured load, not path B."""

    alpha: float = 0.2
    with_s: dict[int, float] = field(default_factory=dict)  # batch size -> step time while delivering
    without_s: dict[int, float] = field(default_factory=dict)  # ... and while not
    with_steps: Counter[int] = field(default_factory=Counter)  # steps taken while delivering, by size

    def step(self, seconds: float, n_seqs: int, delivering: bool) -> None:
        avg = self.with_s if delivering else self.without_s
        old = avg.get(n_seqs)
        avg[n_seqs] = seconds if old is None else (1 - self.alpha) * old + self.alpha * seconds
        self.with_steps[n_seqs] += delivering

    @property
    def seconds_per_second(self) -> float:
        both = [n for n in self.with_s if n in self.without_s]
        weight = sum(self.with_steps[n] for n in both)
        if not weight:
            return 0.0
        slowdown = sum(self.with_steps[n] * n * (self.with_s[n] / self.without_s[n] - 1) for n in both) / weight
        return max(0.0, slowdown)


class DecodeEngine(Engine):
    role = "decode"

    def __init__(self, cfg: ClusterConfig, spec: EngineSpec):
        super().__init__(cfg, spec)
        self.seqs: dict[str, DecodeSeq] = {}
        self.running: list[DecodeSeq] = []  # merged: in the decode batch
        # aborts that overtook their admit (the coordinator gave up waiting on it): the admit then
        # frees what it took instead of holding it until the deadline; the newest 1024 are kept
        self.aborted_early: deque[str] = deque(maxlen=1024)
        self.wake = asyncio.Event()
        # one HBM block no request owns: the padding rows of a bucketed decode step (a GPU's) write there
        self.graphs = DecodeGraphs(self.model, self.pool.kv, self.bt, self.pool.allocator.alloc(1)[0],
                                   capture=self.cfg.engine.cuda_graphs)
        self.persister: Persister | None = None  # needs the store, opened in start()
        # Path B drains into a PE's buffer, so its rate counts bytes delivered there, per second of
        # reading or sending them: the hop's cost is part of it (policy.py compares drain times)
        self.delivering, self.delivered_bytes = BusyClock(), 0
        self.delivery_cost = DeliveryCost()

    async def start(self) -> None:
        await super().start()
        self.persister = Persister(self.store, self.cfg.store.write_queue_blocks)
        self.start_loop(self._decode_loop())

    async def stop(self) -> None:
        await self.persister.close()  # flush: every queued block reaches storage on a clean shutdown
        await super().stop()

    def report(self) -> EngineReport:
        # every request it holds at its full length, as the coordinator charges an admission (policy.assigned)
        tokens = sum(s.prompt_len + s.max_tokens for s in self.seqs.values())
        p = self.persister
        return dataclasses.replace(super().report(), running_decode_tokens=tokens, persist_queue=p.queued,
                                   persist_written=p.written, persist_dropped=p.dropped, persist_failed=p.failed,
                                   delivery_cost=self.delivery_cost.seconds_per_second)

    async def on_load(self, conn: Connection, msg: Load) -> dict:
        seq = self.seqs[msg.rid]
        send = asyncio.create_task(self._send_hits(seq, msg.pe_run))
        seq.io.append(send)  # an abort does not give the run back while our writes still read from it
        return await send

    async def on_prefilled(self, conn: Connection, msg: Prefilled) -> dict:
        return await self._merge(self.seqs[msg.rid], msg.first_token)

    async def on_abort(self, conn: Connection, msg: Abort) -> dict:
        seq = self.seqs.get(msg.rid)
        if seq is None:
            self.aborted_early.append(msg.rid)
        else:
            await self._drop(seq)
        return {"ok": True}

    async def _drop(self, seq: DecodeSeq) -> None:
        """End a request early (an abort, or no handoff by its deadline)."""
        if seq.cancelled:
            return
        seq.cancelled = True
        if not seq.prefilled:  # else _merge or the decode loop ends it (they are using its memory)
            await self._handoff_stopped(seq)
        if not seq.prefilled:  # (a handoff that was under way may have come in meanwhile)
            self._release(seq)

    async def _handoff_stopped(self, seq: DecodeSeq) -> None:
        """Return once the PE writes no more of its handoff into our run: the run must not go to
        another request while bytes still land in it (a same-host backend writes straight into our
        memory, past any revoked grant). The PE answers its abort once its writes are done."""
        try:
            await ask(await self.peer(seq.pe), Abort(seq.rid), timeout=HANDOFF_FENCE_S + 5)
        except Exception as e:  # the PE is gone or its link is: none of its writes is under way
            log.info("%s: no answer from %s on aborting %s (%s)", self.name, seq.pe, seq.rid, e)

    # -- admission and path-B reads --

    async def on_admit(self, conn: Connection, msg: Admit) -> dict:
        """Reserve HBM for prompt + answer and a buffer run for the prompt, or refuse at once (the
        coordinator tries another DE, or waits for room: it must not wait out its admit's timeout
        here); start reading our share of the hits (path B). Answers the RunHandle where the PE
        writes its handoff."""
        seq = DecodeSeq(rid=msg.rid, tokens=list(msg.tokens), prompt_len=len(msg.tokens) - msg.generated,
                        context_len=len(msg.tokens), hit_blocks=msg.hit_blocks, de_blocks=msg.de_blocks,
                        sampling=msg.sampling, pe=msg.pe)
        try:
            seq.blocks = self.pool.allocator.alloc(self.pool.blocks_for(seq.prompt_len + seq.max_tokens))
        except OutOfBlocks as e:
            raise RuntimeError(f"{self.name} has no room for this request: {e}") from None
        seq.run = self.buffer.try_alloc(self.pool.blocks_for(seq.context_len))
        if seq.run is None:  # (free blocks may be enough, but not in one run)
            self.pool.allocator.release(seq.blocks)
            raise RuntimeError(f"{self.name} has no room for this request: no run of "
                               f"{self.pool.blocks_for(seq.context_len)} free DRAM-buffer blocks")
        if seq.rid in self.aborted_early:
            self.free_request_memory(seq)
            raise RuntimeError(f"{seq.rid} was aborted while {self.name} admitted it")
        seq.keys = block_chain(seq.tokens, self.model.fingerprint, self.bt)
        self.seqs[seq.rid] = seq
        # Bounded: a slot whose handoff never comes (the coordinator gave up on this admit, or the
        # PE failed without telling us) is freed when the request's deadline has passed.
        seq.expiry = asyncio.get_running_loop().call_later(msg.handoff_timeout_s, self._expire, seq)
        if seq.de_blocks:
            seq.hit_layers = [asyncio.Event() for _ in range(self.model.cfg.n_layers)]
            seq.io.append(asyncio.create_task(self._read_hits(seq)))
        return dataclasses.asdict(self.run_handle(seq, msg.pe, msg.pe_incarnation))

    def drained(self) -> tuple[int, float]:
        return self.delivered_bytes, self.delivering.seconds()

    async def _read_hits(self, seq: DecodeSeq) -> None:
        def on_layer(l: int) -> None:
            seq.layers_read = l + 1
            seq.hit_layers[l].set()

        self.delivering.enter()
        try:
            await self.read_blocks(seq.keys[: seq.de_blocks], seq.run, on_layer=on_layer)
        finally:
            self.delivering.leave()
        for ev in seq.hit_layers:  # on a miss, wake _send_hits to report it
            ev.set()

    async def _send_hits(self, seq: DecodeSeq, dst: RunHandle) -> dict:
        """Path B: storage → our buffer (already under way) → the PE's buffer, one bulk write per layer
        started as soon as that layer is read (not after the previous write's acknowledgement), so the
        PE can compute layer 0 while later layers are read and travel."""
        bpl, writes = self.buffer.bytes_per_layer, []
        self.delivering.enter()
        try:
            for l in range(self.model.cfg.n_layers):
                with self.timed("path_b_read_wait"):
                    await seq.hit_layers[l].wait()
                if seq.cancelled:
                    raise RuntimeError(f"{seq.rid} was aborted")
                if seq.layers_read <= l:
                    raise RuntimeError("a hit block was missing or corrupt")
                off, _ = self.buffer.layer_range(seq.run, l)
                src = self.buffer.host[off : off + seq.de_blocks * bpl]
                writes.append(asyncio.ensure_future(self.dataplane.write(
                    src, dst.region, run_layer_offset(dst, l, bpl), seq.de_blocks * bpl, "bulk",
                    notify=LayerLanded(seq.rid, l).as_notify())))
            with self.timed("path_b_send"):
                await asyncio.gather(*writes)
        finally:  # on a miss or a failed write, no write may still be under way when we answer
            try:
                await asyncio.gather(*writes, return_exceptions=True)
            finally:
                self.delivering.leave()
        self.metrics["path_b_sent_blocks"] += seq.de_blocks
        self.delivered_bytes += seq.de_blocks * self.shape.file_bytes  # as the store counts reads
        return {"ok": True}

    # -- merge: handed-off KV into HBM, persist the prompt's new full blocks --

    def _expire(self, seq: DecodeSeq) -> None:
        if not seq.prefilled and self.seqs.get(seq.rid) is seq:
            log.warning("%s: no handoff for %s before its deadline; its slot and buffer are freed", self.name, seq.rid)
            self.spawn(self._drop(seq), f"dropping {seq.rid}")

    async def _merge(self, seq: DecodeSeq, first_token: int) -> dict:
        seq.prefilled = True
        nb, n_full = seq.run.n_blocks, seq.context_len // self.bt

        def copy_in():
            blocks = self.hbm_index(seq.blocks[:nb])
            for l in range(self.model.cfg.n_layers):
                self.buffer_to_hbm(seq.run, blocks, l, compute_waits=False)

        # The running batch's decode steps do not wait for these copies (they do not read these
        # blocks): the request joins the batch, and its run is released, once the copies are done.
        try:
            with self.timed("merge_h2d"):
                await self.in_compute(copy_in, stage="merge_h2d_enqueue")
                await self.copies_done()
            view = self.buffer.view(seq.run)
            for b in range(seq.hit_blocks, n_full):  # hit blocks are stored already
                fut = self.persister.submit(seq.keys[b], [view[l, b].numpy().copy() for l in range(view.shape[0])])
                if fut is not None:
                    seq.persisted.append(fut)
        except BaseException:  # an abort no longer frees a handed-off request: it must not strand here
            self._release(seq)
            raise
        self.buffer.release(seq.run)
        seq.run = None
        self.freed.set()
        self._emit(seq, first_token)
        if not self._is_done(seq):
            self.running.append(seq)
            self.wake.set()
        else:
            self.spawn(self._finish(seq), f"finishing {seq.rid}")
        return {"ok": True}

    # -- continuous batching decode --

    def _emit(self, seq: DecodeSeq, token: int) -> None:
        seq.tokens.append(token)
        tell(self.coord, Token(seq.rid, token))

    def _is_done(self, seq: DecodeSeq) -> bool:
        """Cancelled, at max_tokens, or its last token ends it (a stop token id, or EOS unless
        ignore_eos; min_tokens kept them from being drawn earlier: runtime.process_logits)."""
        return (seq.cancelled or seq.generated >= seq.max_tokens
                or (seq.generated > 0 and seq.sampling.stops_on(seq.tokens[-1])))

    async def _decode_loop(self) -> None:
        while not self.stopping.is_set():
            if not self.running:
                self.wake.clear()
                await self.wake.wait()
                continue
            for seq in [s for s in self.running if self._is_done(s)]:
                self.running.remove(seq)
                self.spawn(self._finish(seq), f"finishing {seq.rid}")
            batch_seqs = self.running[: self.cfg.engine.max_decode_batch]
            if not batch_seqs:
                continue
            delivering, t0 = self.delivering.active > 0, time.monotonic()
            try:
                next_tokens, completed = await self.in_compute(self._decode_step, batch_seqs, stage="decode_step")
                delivering = delivering or self.delivering.active > 0  # under way as the step began or ended
                self.delivery_cost.step(time.monotonic() - t0, len(batch_seqs), delivering)
            except Exception as e:
                log.exception("%s: decode step failed", self.name)
                for seq in batch_seqs:
                    self.running.remove(seq)
                    tell(self.coord, Failed(seq.rid, f"decode failed: {e}"))
                    self._release(seq)
                continue
            for seq, tok in zip(batch_seqs, next_tokens):
                if seq.rid in completed:
                    self._persist(seq, completed[seq.rid])
                self._emit(seq, tok)
            await asyncio.sleep(0)  # let handoffs and control messages in between steps

    def _decode_step(self, seqs: list[DecodeSeq]) -> tuple[list[int], dict[str, torch.Tensor]]:
        """One step (compute thread): the next token of each sequence, and the bytes of each block
        the step completed, [layers, bytes per layer] on the host, copied here in one transfer
        rather than on the event loop (a device-to-host copy waits for the GPU)."""
        logits = self.graphs.run([(s.tokens[-1], len(s.tokens) - 1, s.blocks) for s in seqs])
        tokens = sample_batch(logits[: len(seqs)], [(s.sampling, s.tokens, s.prompt_len) for s in seqs])
        full = [(s, b) for s in seqs if (b := self._completed_block(s)) is not None]
        if not full:
            return tokens, {}
        blocks = self.pool.kv[:, [s.blocks[b] for s, b in full]]  # [layers, n, bt, W]
        data = blocks.transpose(0, 1).contiguous().view(torch.uint8).flatten(2).cpu()  # [n, layers, bytes]
        return tokens, {s.rid: data[i] for i, (s, _) in enumerate(full)}

    def _completed_block(self, seq: DecodeSeq) -> int | None:
        """The block whose last position's KV the step for this sequence writes (KV then exists for
        positions < len(tokens)), if it is full now and not yet persisted."""
        computed = len(seq.tokens)
        b = computed // self.bt - 1
        return b if computed % self.bt == 0 and b >= len(seq.keys) else None

    def _persist(self, seq: DecodeSeq, data: torch.Tensor) -> None:
        """Persist the block this step completed: data [layers, bytes per layer] on the host."""
        b = len(seq.tokens) // self.bt - 1
        seq.keys.append(next_key(seq.keys[-1] if seq.keys else None, self.model.fingerprint,
                                 seq.tokens[b * self.bt : len(seq.tokens)]))
        fut = self.persister.submit(seq.keys[b], [data[l].numpy() for l in range(data.shape[0])])
        if fut is not None:
            seq.persisted.append(fut)

    async def _finish(self, seq: DecodeSeq) -> None:
        # Wait until the request's blocks are durable before reporting it done, so that the next turn
        # of the same conversation is guaranteed to hit them.
        if seq.persisted:
            await asyncio.gather(*seq.persisted)
        self.metrics["finished_requests"] += 1
        tell(self.coord, Done(seq.rid, seq.cancelled))
        self._release(seq)

    def _release(self, seq: DecodeSeq) -> None:
        if seq.expiry is not None:
            seq.expiry.cancel()  # (a pending timer would keep the finished request in memory until then)
        self.free_request_memory(seq)
        self.seqs.pop(seq.rid, None)
