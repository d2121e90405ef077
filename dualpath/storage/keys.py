"""Chained block keys: h_i = H(h_{i-1}, model_fingerprint, tokens of block i).

A key names a whole prefix, not just one block, so equal keys mean equal prefixes and the
longest stored prefix is the number of leading keys that exist (DESIGN.md §3).
"""

from __future__ import annotations

import hashlib

import numpy as np

KEY_BYTES = 16


def block_chain(tokens: list[int], fingerprint: bytes, block_tokens: int) -> list[bytes]:
    """Keys of every *full* block of tokens (a partial tail block has no key). The token ids become
    int64 bytes once for the whole prompt (per block, that conversion cost as much as the hash)."""
    data = np.asarray(tokens[: len(tokens) // block_tokens * block_tokens], dtype=np.int64).tobytes()
    step, keys = 8 * block_tokens, []
    for i in range(0, len(data), step):
        keys.append(_chain(keys[-1] if keys else None, fingerprint, data[i : i + step]))
    return keys


def next_key(prev: bytes | None, fingerprint: bytes, block: list[int]) -> bytes:
    """The key of the block after `prev` (None for the first block): extends a chain by one."""
    return _chain(prev, fingerprint, np.asarray(block, dtype=np.int64).tobytes())


def _chain(prev: bytes | None, fingerprint: bytes, block: bytes) -> bytes:
    h = hashlib.blake2b(prev or b"\x00" * KEY_BYTES, digest_size=KEY_BYTES)
    h.update(fingerprint)
    h.update(block)
    return h.digest()
