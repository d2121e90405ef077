"""The paged KV pool in device memory (HBM) and its block allocator.

Layout: one tensor ``[n_layers, n_blocks, block_tokens, kv_width]``. For a fixed layer and block
the ``block_tokens * kv_width`` values are contiguous, which is exactly one layer's slice of a
stored block (DESIGN.md §3), so loading a block is one copy per layer.
"""

from __future__ import annotations

import torch

from dualpath.engine.architecture import ModelConfig
from dualpath.engine.room import Room


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than asked for; the caller waits or refuses."""


class BlockAllocator:
    def __init__(self, n_blocks: int):
        self.n_blocks = n_blocks
        self._free = list(range(n_blocks - 1, -1, -1))
        self.room = Room()

    @property
    def free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} blocks, {len(self._free)} free of {self.n_blocks}")
        out = self._free[-n:][::-1] if n else []
        del self._free[len(self._free) - n:]
        return out

    async def alloc_wait(self, n: int) -> list[int]:
        """n blocks, waiting until releases make room (the caller bounds the wait)."""
        if n > self.n_blocks:
            raise OutOfBlocks(f"need {n} blocks, the pool has {self.n_blocks}")
        return await self.room.until(lambda: self.alloc(n) if n <= len(self._free) else None)

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
        self.room.released()


class KVPool:
    def __init__(self, cfg: ModelConfig, n_blocks: int, block_tokens: int,
                 device: torch.device | str, dtype: torch.dtype):
        self.cfg, self.block_tokens = cfg, block_tokens
        self.kv = torch.zeros(cfg.n_layers, n_blocks, block_tokens, cfg.kv_width, device=device, dtype=dtype)
        self.allocator = BlockAllocator(n_blocks)

    @property
    def block_bytes_per_layer(self) -> int:
        return self.block_tokens * self.cfg.kv_width * self.kv.element_size()

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_tokens)

    def layer(self, l: int) -> torch.Tensor:
        return self.kv[l]
