"""Decode steps replayed from CUDA graphs.

A decode step of a small model is a few thousand tiny kernels: launched one by one from Python it
costs ~28 ms of CPU for ~2 ms of GPU work (small-gqa on an H200, examples/compute_profile.py), and
every launch needs the GIL, so the DE's storage-read and transfer threads slow it further. A
captured graph launches the whole step with one call.

A graph has fixed shapes and fixed input buffers, so steps are bucketed: the batch is padded to a
power of two of sequences and the block tables to a power of two of blocks (at least 8). Padding
rows attend to, and write their KV into, one scratch HBM block that no request owns. Each bucket is
captured once, the first time a step needs it; all share one memory pool, as the steps never run
concurrently. Inputs of a step (token, position, slot, lengths, tables) go to the device in one
copy.

``DecodeGraphs(..., capture=False)`` runs the same bucketed, padded step eagerly (a GPU with
engine.cuda_graphs off; the tests check it against the plain step on CPU). On a CPU, where nothing
is captured, a step is not padded at all: the padding only added work (tiny-gqa, 24 sequences of
3.5K tokens: 163 ms a step padded to 32 sequences of 64 blocks, 18 ms unpadded).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dualpath.engine.model import Batch, Model

MIN_TABLE_BLOCKS = 8


def _bucket(n: int, least: int = 1) -> int:
    return max(least, 1 << (n - 1).bit_length())


@dataclass
class _Step:
    """One bucket's fixed buffers, and its graph once captured."""

    inputs: torch.Tensor  # int64 [B * (4 + blocks)]: ids | positions | slots | lens | tables
    batch: Batch
    ids: torch.Tensor
    logits: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None


class DecodeGraphs:
    def __init__(self, model: Model, kv: torch.Tensor, block_tokens: int, scratch_block: int, capture: bool = True,
                 pad: bool | None = None):
        self.model, self.kv, self.bt, self.scratch = model, kv, block_tokens, scratch_block
        self.capture = capture and kv.is_cuda
        self.pad = self.capture or (kv.is_cuda if pad is None else pad)  # bucket and pad steps
        self.steps: dict[tuple[int, int], _Step] = {}
        self.memory_pool = torch.cuda.graph_pool_handle() if self.capture else None

    def _new_step(self, b: int, nb: int) -> _Step:
        dev = self.kv.device
        inputs = torch.zeros(b * (4 + nb), dtype=torch.long, device=dev)
        ids, positions, slots, lens = inputs[: 4 * b].view(4, b)
        padded_tables = inputs[4 * b :].view(b, nb)
        batch = Batch(positions=positions, slots=slots, ctx_lens=[], new_lens=[1] * b, block_tables=[],
                      padded_tables=padded_tables, lens=lens)
        return _Step(inputs, batch, ids)

    def _capture(self, step: _Step) -> None:
        side = torch.cuda.Stream(self.kv.device)  # torch warms a graph's kernels up off the main stream
        side.wait_stream(torch.cuda.current_stream(self.kv.device))
        with torch.cuda.stream(side):
            self.model.forward_paged(step.ids, step.batch, self.kv)
        torch.cuda.current_stream(self.kv.device).wait_stream(side)
        step.graph = torch.cuda.CUDAGraph()
        # thread_local: the event loop's CUDA calls (path-B sends, event queries) go on while we
        # capture; in torch's default ("global") mode any of them invalidated the capture and
        # failed the step (cudaErrorStreamCaptureInvalidated, seen on one H200 under de-read)
        with torch.cuda.graph(step.graph, pool=self.memory_pool, capture_error_mode="thread_local"):
            step.logits = self.model.forward_paged(step.ids, step.batch, self.kv)

    def _inputs(self, seqs: list[tuple[int, int, list[int]]], b: int, nb: int) -> torch.Tensor:
        """A step's inputs as one host tensor laid out as ``_Step.inputs``; padding rows hold token 0
        at position 0, one token in the scratch block. Filled with numpy: 48 sequences of 320 blocks
        took 2.2 ms of Python lists a step, 0.3 ms so."""
        host = np.zeros(b * (4 + nb), dtype=np.int64)
        ids, positions, slots, lens = host[: 4 * b].reshape(4, b)
        tables = host[4 * b :].reshape(b, nb)
        slots[:], lens[:], tables[:] = self.scratch * self.bt, 1, self.scratch
        for i, (tok, pos, blocks) in enumerate(seqs):
            used = pos // self.bt + 1
            ids[i], positions[i], lens[i] = tok, pos, pos + 1
            slots[i] = blocks[pos // self.bt] * self.bt + pos % self.bt
            tables[i, :used] = blocks[:used]
        return torch.from_numpy(host)

    def run(self, seqs: list[tuple[int, int, list[int]]]) -> torch.Tensor:
        """seqs: (last token, its position, the sequence's HBM blocks) each; -> logits [len(seqs), vocab].
        The step writes each last token's KV at its position, as the plain step does."""
        if not self.pad:  # each table only as long as its context
            batch = Batch.build([(blocks[: pos // self.bt + 1], pos, 1) for _, pos, blocks in seqs], self.bt,
                                self.kv.device)
            ids = torch.tensor([tok for tok, _, _ in seqs], device=self.kv.device)
            return self.model.forward_paged(ids, batch, self.kv)
        b = _bucket(len(seqs))
        nb = _bucket(max(pos // self.bt + 1 for _, pos, _ in seqs), MIN_TABLE_BLOCKS)
        host = self._inputs(seqs, b, nb)
        step = self.steps.get((b, nb))
        if step is None:
            step = self.steps[(b, nb)] = self._new_step(b, nb)
        step.inputs.copy_(host.pin_memory() if self.capture else host, non_blocking=True)
        if not self.capture:
            return self.model.forward_paged(step.ids, step.batch, self.kv)[: len(seqs)]
        if step.graph is None:
            self._capture(step)
        step.graph.replay()
        return step.logits[: len(seqs)]
