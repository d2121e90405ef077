"""The on-disk format of one KV block: a header, then every layer's slice, layer-major.

    offset 0     header: magic "DPKV", version, dtype, layers, bytes per layer, fingerprint, key,
                 then one 64-bit XXH3 checksum per layer; padded to HEADER_BYTES (page aligned, so O_DIRECT works)
    HEADER_BYTES layer 0 (bytes_per_layer) | layer 1 | ...

One layer's slice is read at HEADER_BYTES + l * bytes_per_layer without reading the rest. A file of
another model, format version or shape is refused, never misread.
"""

from __future__ import annotations

import struct

import xxhash
from dataclasses import dataclass

MAGIC = b"DPKV"
VERSION = 1
HEADER_BYTES = 4096
_FIXED = struct.Struct("<4sHHIQ16s16s")  # magic, version, dtype code, layers, bytes/layer, fingerprint, key
DTYPE_CODES = {"float32": 1, "bfloat16": 2, "float16": 3, "uint8": 4}


class BlockFormatError(ValueError):
    """The file is not a block of this model and format; the reader treats it as a miss."""


@dataclass(frozen=True)
class BlockShape:
    n_layers: int
    bytes_per_layer: int
    dtype: str
    fingerprint: bytes

    def __post_init__(self) -> None:
        assert _FIXED.size + 8 * self.n_layers <= HEADER_BYTES, "too many layers for the header"

    @property
    def file_bytes(self) -> int:
        return HEADER_BYTES + self.n_layers * self.bytes_per_layer


def checksum(data) -> int:
    # XXH3 rather than CRC32: about 5x faster here (15 vs 3 GB/s on one core), and every byte read
    # from storage passes through it.
    return xxhash.xxh3_64_intdigest(data)


def encode_header(shape: BlockShape, key: bytes, crcs: list[int]) -> bytes:
    head = _FIXED.pack(MAGIC, VERSION, DTYPE_CODES[shape.dtype], shape.n_layers, shape.bytes_per_layer,
                       shape.fingerprint, key) + struct.pack(f"<{len(crcs)}Q", *crcs)
    return head + b"\x00" * (HEADER_BYTES - len(head))


def decode_header(buf: bytes, shape: BlockShape, key: bytes) -> list[int]:
    """Check that the header describes this exact block; return the per-layer checksums."""
    if len(buf) < _FIXED.size:
        raise BlockFormatError("short header")
    magic, version, dtype, layers, bpl, fp, k = _FIXED.unpack_from(buf)
    if magic != MAGIC:
        raise BlockFormatError(f"bad magic {magic!r}")
    if version != VERSION:
        raise BlockFormatError(f"format version {version}, this reader knows {VERSION}")
    if fp != shape.fingerprint:
        raise BlockFormatError("block belongs to another model (fingerprint mismatch)")
    if (dtype, layers, bpl) != (DTYPE_CODES[shape.dtype], shape.n_layers, shape.bytes_per_layer):
        raise BlockFormatError(f"shape mismatch: dtype={dtype} layers={layers} bytes/layer={bpl}")
    if k != key:
        raise BlockFormatError("key mismatch")
    return list(struct.unpack_from(f"<{layers}Q", buf, _FIXED.size))
