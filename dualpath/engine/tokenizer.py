"""Tokenizers: a byte-level default (text in / text out with random weights) or a Hugging Face one."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """Token i < 256 is byte i; ids above 255 are special/unused and decode to nothing.
    eos is None: random weights have no meaningful end token, so generation runs to max_tokens."""

    eos_id: int | None = None

    def __init__(self, vocab_size: int):
        if vocab_size < 256:
            raise ValueError(f"byte tokenizer needs vocab_size >= 256, model has {vocab_size}")
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _T  # optional dependency, present with transformers

        self._tok = _T.from_file(str(path / "tokenizer.json"))
        self.eos_id = None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def load_tokenizer(weights: str | None, vocab_size: int) -> Tokenizer:
    """The checkpoint's tokenizer.json when present (and the `tokenizers` package is installed),
    else the byte-level default."""
    if weights and (Path(weights) / "tokenizer.json").exists():
        try:
            return HFTokenizer(Path(weights))
        except ImportError:
            pass
    return ByteTokenizer(vocab_size)
