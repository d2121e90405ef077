"""The prefill engine (PE): load the hit KV on path A and/or B, layer by layer, compute the miss
tokens, sample the first token, and hand the KV to the decode engine (DESIGN.md §2 steps 4-6).

A job's DRAM buffer run holds every block of its prompt, layer-major. Slots [0, hit_blocks) receive
the hit KV: slots [0, de_blocks) from the DE over the compute network (path B, one bulk write per
layer), slots [de_blocks, hit_blocks) from storage through this engine's SNIC (path A). The policy
sets de_blocks: 0 (path A), hit_blocks (path B) or in between (a split read). Layer l is copied to
HBM just before layer l is computed, so loading overlaps compute. After the last layer the computed
blocks [hit_blocks, end) are copied back into the run (the hit blocks are there already), and every
block the DE did not read itself, [de_blocks, end), is written to the DE's run (latency class).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from dualpath.config import ClusterConfig, EngineSpec
from dualpath.engine.buffers import run_layer_offset
from dualpath.engine.batching import pick_batch
from dualpath.engine.model import Batch, last_token_index
from dualpath.device import until_done
from dualpath.engine.runtime import HANDOFF_FENCE_S, Engine, EngineRequest, sample_batch
from dualpath.protocol import (Abort, EngineReport, Failed, Failure, LastPrefill, LayerLanded, Load, Prefill,
                               Prefilled, RunHandle, ask, tell)
from dualpath.storage.keys import block_chain
from dualpath.transport.control import Connection

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class PrefillJob(EngineRequest):
    """A request on the PE: its hits loaded on paths A and B, its miss computed, its first token
    drawn, its KV handed off to the DE."""

    de: str
    de_run: RunHandle  # where the handoff goes
    # Layer l of our storage reads / of the DE's writes is in our buffer (set on the event loop; the
    # compute thread only reads them, in run_layers)
    path_a_layer: list[asyncio.Event] = field(default_factory=list)
    path_b_layer: list[asyncio.Event] = field(default_factory=list)
    computed: int = 0  # tokens whose KV needs no computing: the hits, then each step's tokens
    loaded_to_hbm: bool = False
    t_admit: float = field(default_factory=time.monotonic)
    t_landed: dict[int, float] = field(default_factory=dict)  # layer -> when our storage read of it was in
    t_started: list[float] = field(default_factory=list)  # when the compute thread started layer l
    failed: Failure | None = None  # set once the attempt cannot go on (an abort, a miss, a failed step)
    handoff: asyncio.Task | None = None  # writing the prompt's KV into the DE's run, then telling it


def _kv_landed(job: PrefillJob) -> bool:
    """All of the job's hit KV is in our buffer, from both paths (or it needs none now). Every layer
    is checked: reads of several spans of layers land in any order."""
    return (not job.hit_blocks or job.loaded_to_hbm or job.failed is not None
            or all(ev.is_set() for ev in job.path_a_layer + job.path_b_layer))


class PrefillEngine(Engine):
    role = "prefill"

    def __init__(self, cfg: ClusterConfig, spec: EngineSpec):
        super().__init__(cfg, spec)
        self.jobs: dict[str, PrefillJob] = {}
        self.ready: list[PrefillJob] = []  # admitted, loading or computing
        self.wake = asyncio.Event()  # a job became ready
        # The latest job's timeline, from admission (bench overlap reads it): its first token, when
        # the compute thread started each layer, and when each layer of our storage reads was in.
        self.last_prefill = {"total_s": 0.0, "started_s": [], "landed_s": []}

    async def start(self) -> None:
        await super().start()
        self.start_loop(self._step_loop())

    def report(self) -> EngineReport:
        queued = sum(len(j.tokens) - j.computed for j in self.jobs.values())
        return dataclasses.replace(super().report(), queued_prefill_tokens=queued)

    async def on_last_prefill(self, conn: Connection, msg: LastPrefill) -> dict:
        return self.last_prefill

    async def on_prefill(self, conn: Connection, msg: Prefill) -> dict:
        job = PrefillJob(rid=msg.rid, tokens=msg.tokens, prompt_len=len(msg.tokens) - msg.generated,
                         hit_blocks=msg.hit_blocks, de_blocks=msg.de_blocks, sampling=msg.sampling, de=msg.de,
                         de_run=msg.de_run, computed=msg.hit_blocks * self.bt)  # its queued work is the miss alone
        self.jobs[job.rid] = job
        self.spawn(self._admit(job), f"admitting {job.rid}")
        return {"accepted": True}

    async def on_abort(self, conn: Connection, msg: Abort) -> dict:
        """Drop a request. The answer comes once no write of its handoff is under way: the DE waits
        for it before giving the run those writes land in to another request."""
        job = self.jobs.get(msg.rid)
        if job:
            job.failed = Failure("aborted")
            for ev in job.path_a_layer + job.path_b_layer:  # a step waiting on its KV stops waiting (it checks failed)
                ev.set()
            if job.handoff is not None:
                await asyncio.wait([job.handoff], timeout=HANDOFF_FENCE_S)
        return {"ok": True}

    def on_write_complete(self, notify: Any) -> None:
        """A data-plane write into our buffer is complete: path B's layer landings."""
        try:
            self.on_layer_landed(LayerLanded.from_notify(notify))
        except ValueError as e:
            log.warning("%s: dropped a write's notify: %s", self.name, e)

    def on_layer_landed(self, msg: LayerLanded) -> None:
        """Path B: the DE wrote layer `layer` of a job's hit KV into our buffer."""
        job = self.jobs.get(msg.rid)
        if job is not None and 0 <= msg.layer < len(job.path_b_layer):
            job.path_b_layer[msg.layer].set()

    # -- admission and loading --

    async def _admit(self, job: PrefillJob) -> None:
        job.path_a_layer = [asyncio.Event() for _ in range(self.model.cfg.n_layers)]
        job.path_b_layer = [asyncio.Event() for _ in range(self.model.cfg.n_layers)]
        try:
            n = self.pool.blocks_for(len(job.tokens))
            with self.timed("admit_wait"):
                await self.take_memory(job, n, n)
            job.io = [asyncio.create_task(self._read_path_a(job, job.de_blocks, job.hit_blocks, job.path_a_layer)),
                      asyncio.create_task(self._read_path_b(job))]
            self.ready.append(job)
            self.wake.set()
        except Exception as e:
            await self._fail(job, Failure(f"admission failed: {e}"))

    async def _read_path_a(self, job: PrefillJob, lo: int, hi: int, layers: list[asyncio.Event]) -> None:
        """Storage → our buffer, hit blocks [lo, hi), setting layers[l] as each layer lands."""
        if hi > lo:
            keys = block_chain(job.tokens[: hi * self.bt], self.model.fingerprint, self.bt)[lo:]

            def layer_read(l: int) -> None:
                job.t_landed.setdefault(l, time.monotonic())
                layers[l].set()

            if not await self.read_blocks(keys, job.run, first=lo, on_layer=layer_read):
                job.failed = Failure("a hit block was missing or corrupt", retryable=True)
            else:
                self.metrics["path_a_requests"] += 1
                self.metrics["path_a_blocks"] += hi - lo
        for ev in layers:  # nothing to read, or a miss: the step loop must not wait (it checks job.failed)
            ev.set()

    async def _read_path_b(self, job: PrefillJob) -> None:
        """Hit blocks [0, de_blocks): the DE reads them and writes them into our buffer layer by layer."""
        if job.de_blocks == 0:
            for ev in job.path_b_layer:
                ev.set()
            return
        try:
            de = await self.peer(job.de)
            await ask(de, Load(job.rid, self.run_handle(job, job.de)), timeout=120)
            self.metrics["path_b_requests"] += 1
            self.metrics["path_b_blocks"] += job.de_blocks
        except Exception as e:  # DESIGN §5: a path-B failure falls back to path A
            if job.failed:  # aborted: nothing to read for
                for ev in job.path_b_layer:
                    ev.set()
                return
            log.warning("%s: path B for %s failed (%s); falling back to path A", self.name, job.rid, e)
            self.metrics["path_b_fallbacks"] += 1
            await self._read_path_a(job, 0, job.de_blocks, job.path_b_layer)

    # -- the prefill step loop --

    def _pick(self) -> list[tuple[PrefillJob, int]]:
        """Jobs for this step within the compute quota; a long miss is chunked across steps.

        A step waits for layer l of every job in it before running layer l, so it takes only the
        jobs whose hit KV is all in our buffer (or in HBM already). With none, the first job (the
        first to be read) runs alone, its load overlapping its compute layer by layer. (A step of
        every ready job held the jobs read early behind the last one's read, and their handoffs and
        freed memory with them: `bench ingest`, 16 x 32K on one H200, path A 4.6 -> 6.6-7.3 GB/s,
        together with the bench's room for every request. Waiting for the first job's layer 0
        instead cost a lone 32K prefill 1.25-1.29x against 1.12-1.14x: `bench overlap`.)"""
        jobs = [j for j in self.ready if _kv_landed(j)] or self.ready[:1]
        quota = self.cfg.engine.prefill_token_quota
        return list(zip(jobs, pick_batch((len(j.tokens) - j.computed for j in jobs), quota)))

    async def _step_loop(self) -> None:
        while not self.stopping.is_set():
            await self.wake.wait()
            self.wake.clear()
            while self.ready:
                for job in [j for j in self.ready if j.failed]:
                    self.ready.remove(job)
                    await self._fail(job, job.failed)
                picked = self._pick()
                if not picked:
                    break
                try:
                    await self._step(picked)
                except Exception as e:
                    log.exception("%s: prefill step failed", self.name)
                    for job, _ in picked:
                        job.failed = Failure(f"prefill step failed: {e}")

    async def _step(self, picked: list[tuple[PrefillJob, int]]) -> None:
        batch = Batch.build([(j.blocks, j.computed, n) for j, n in picked], self.bt, self.device)
        ids = torch.tensor([t for j, n in picked for t in j.tokens[j.computed : j.computed + n]], device=self.device)
        loading = [j for j, _ in picked if not j.loaded_to_hbm and j.hit_blocks]
        hit_index = {j.rid: self.hbm_index(j.blocks[: j.hit_blocks]) for j in loading}  # HBM ids of the hits
        n_layers = self.model.cfg.n_layers
        h, cos_sin = await self.in_compute(lambda: (self.model.embed(ids), self.model.rope_cos_sin(batch)))

        def kv_in_buffer(l: int) -> bool:  # layer l of every loading job's hits, on both paths
            return all(j.path_a_layer[l].is_set() and j.path_b_layer[l].is_set() for j in loading)

        def run_layers(l: int, h: torch.Tensor) -> tuple[int, torch.Tensor]:
            """On the compute thread: layers l, l+1, ... back to back for as long as their hit KV is in
            our buffer (each layer's copy to HBM enqueued right before it); returns the first layer
            it could not run yet. The thread never waits for KV: other work (a finished job's
            handoff) can use it meanwhile, and the event loop waits instead."""
            while l < n_layers and kv_in_buffer(l) and not any(j.failed for j, _ in picked):
                for j in loading:
                    j.t_started.append(time.monotonic())
                    self.buffer_to_hbm(j.run, hit_index[j.rid], l)
                h = self.model.layer(l, h, batch, self.pool.layer(l), cos_sin)
                l += 1
            return l, h

        l = 0
        while l < n_layers:
            with self.timed("kv_wait"):
                for j in loading:  # layer l of the hit KV must be in our buffer before layer l runs
                    await j.path_a_layer[l].wait()
                    await j.path_b_layer[l].wait()
            if any(j.failed for j, _ in picked):
                return
            l, h = await self.in_compute(run_layers, l, h)
        for j, _ in picked:
            j.loaded_to_hbm = True
        finished = [(j, i) for (j, n), i in zip(picked, last_token_index(batch)) if j.computed + n == len(j.tokens)]

        def first_tokens() -> list[int]:  # on the compute thread: sampling waits for the GPU
            logits = self.model.logits(h[[i for _, i in finished]])
            return sample_batch(logits, [(j.sampling, j.tokens, j.prompt_len) for j, _ in finished])

        firsts = await self.in_compute(first_tokens) if finished else []
        for j, n in picked:
            j.computed += n
        for (job, _), first in zip(finished, firsts):
            self.ready.remove(job)
            self.last_prefill = {"total_s": time.monotonic() - job.t_admit,
                                 "started_s": [round(t - job.t_admit, 5) for t in job.t_started],
                                 "landed_s": [round(t - job.t_admit, 5) for _, t in sorted(job.t_landed.items())]}
            job.handoff = asyncio.create_task(self._handoff(job, first))

    # -- handoff to the decode engine --

    async def _handoff(self, job: PrefillJob, first_token: int) -> None:
        """The prompt's KV to the DE: every block it did not read itself, [de_blocks, end). The hit
        blocks read on path A are in our buffer already; only the computed ones come back from HBM."""
        try:
            if job.failed:  # aborted while it computed: no write into the DE's run may start now
                raise RuntimeError(job.failed.reason)
            nb, start = job.run.n_blocks, job.de_blocks
            with self.timed("handoff_d2h"):
                await until_done(await self.in_compute(self.hbm_to_buffer, job.run, job.blocks[job.hit_blocks:],
                                                       job.hit_blocks, stage="handoff_d2h_enqueue"))
            bpl = self.buffer.bytes_per_layer
            with self.timed("handoff_send"):
                if start == 0 and job.de_run.n_blocks == nb:  # the whole run, one write: both runs have one layout
                    off, nbytes = self.buffer.byte_range(job.run)
                    await self.dataplane.write(self.buffer.host[off : off + nbytes], job.de_run.region,
                                               run_layer_offset(job.de_run, 0, bpl), nbytes, "latency")
                elif start < nb:  # each layer's blocks [start, nb)
                    writes = []
                    for l in range(self.model.cfg.n_layers):
                        off, nbytes = self.buffer.layer_range(job.run, l, start)
                        writes.append(self.dataplane.write(self.buffer.host[off : off + nbytes], job.de_run.region,
                                                           run_layer_offset(job.de_run, l, bpl, start), nbytes, "latency"))
                    await asyncio.gather(*writes)
                self.metrics["handoff_blocks"] += nb - start
                if job.failed:
                    raise RuntimeError(job.failed.reason)
                de = await self.peer(job.de)
                await ask(de, Prefilled(job.rid, first_token))
            self.metrics["prefilled_requests"] += 1
        except Exception as e:  # the DE died or dropped the link: another DE may take the request
            await self._fail(job, Failure(f"handoff to {job.de} failed: {e}", retryable=True))
            return
        self._release(job)

    def _release(self, job: PrefillJob) -> None:
        self.free_request_memory(job)
        self.jobs.pop(job.rid, None)

    async def _fail(self, job: PrefillJob, failure: Failure) -> None:
        log.warning("%s: request %s failed: %s", self.name, job.rid, failure)
        self._release(job)
        tell(self.coord, Failed(job.rid, failure.reason, retry=failure.retryable))
