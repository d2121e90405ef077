"""Chained block keys: h_i = H(h_{i-1}, model_fingerprint, tokens of block i).

A key names a whole prefix, not just one block, so equal keys mean equal prefixes and the
longest stored prefix is the number of leading keys that exist (DESIGN.md §3).
"""

from __future__ import annotations

import hashlib
import struct

KEY_BYTES = 16
_ZERO = b"\x00" * KEY_BYTES


def _token_bytes(tokens: list[int]) -> bytes:
    """Token ids as little-endian int64s, what the keys hash (struct packs a list fastest)."""
    return struct.pack(f"<{len(tokens)}q", *tokens)


def block_chain(tokens: list[int], fingerprint: bytes, block_tokens: int) -> list[bytes]:
    """Keys of every *full* block of tokens (a partial tail block has no key). The token ids become
    bytes once for the whole prompt (per block, that conversion cost as much as the hash)."""
    data = _token_bytes(tokens[: len(tokens) // block_tokens * block_tokens])
    step, keys, key = 8 * block_tokens, [], None
    for i in range(0, len(data), step):
        key = _chain(key, fingerprint, data[i : i + step])
        keys.append(key)
    return keys


def next_key(prev: bytes | None, fingerprint: bytes, block: list[int]) -> bytes:
    """The key of the block after `prev` (None for the first block): extends a chain by one."""
    return _chain(prev, fingerprint, _token_bytes(block))


def _chain(prev: bytes | None, fingerprint: bytes, block: bytes) -> bytes:
    # one call on the joined bytes: the same digest as three updates, at half the cost per block
    return hashlib.blake2b((prev or _ZERO) + fingerprint + block, digest_size=KEY_BYTES).digest()
