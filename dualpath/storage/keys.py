"""Chained block keys: h_i = H(h_{i-1}, model_fingerprint, tokens of block i).

A key names a whole prefix, not just one block, so equal keys mean equal prefixes and the
longest stored prefix is the number of leading keys that exist (DESIGN.md §3).
"""

from __future__ import annotations

import hashlib

import numpy as np

KEY_BYTES = 16


def block_chain(tokens: list[int], fingerprint: bytes, block_tokens: int) -> list[bytes]:
    """Keys of every *full* block of tokens (a partial tail block has no key)."""
    arr = np.asarray(tokens, dtype=np.int64)
    keys, prev = [], b"\x00" * KEY_BYTES
    for i in range(len(tokens) // block_tokens):
        h = hashlib.blake2b(prev, digest_size=KEY_BYTES)
        h.update(fingerprint)
        h.update(arr[i * block_tokens : (i + 1) * block_tokens].tobytes())
        prev = h.digest()
        keys.append(prev)
    return keys
