"""Tokenizers: a byte-level default (text in / text out with random weights) or a Hugging Face one."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol


SPECIAL_BASE = 0xE000  # the byte tokenizer's ids >= 256 as Unicode private-use characters
RAW_BASE = 0xF780  # its bytes 0x80-0xFF that are not valid UTF-8, likewise
_ESCAPE_TO_RAW = {0xDC80 + b: RAW_BASE + b for b in range(128)}
_RAW_TO_ESCAPE = {v: k for k, v in _ESCAPE_TO_RAW.items()}


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="surrogateescape").translate(_ESCAPE_TO_RAW)


class Tokenizer(Protocol):
    eos_id: int | None
    sampling_defaults: dict[str, float]  # the checkpoint's, for parameters a request does not name

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """Token i < 256 is byte i; ids from 256 up (unused by text) are private-use characters
    U+E000 + (i - 256). eos is None: random weights have no meaningful end token, so generation runs
    to max_tokens.

    Text and ids round-trip exactly: a byte that is not part of valid UTF-8 decodes to the private-use
    character U+F780 + (byte - 0x80) (Python's 'surrogateescape' shifted to characters every JSON
    encoder accepts), and the private-use characters encode back to their bytes and ids. So an
    answer sent back as text (a chat's earlier turn) gives the same tokens and its KV is a cache hit.
    Text that itself holds these private-use characters is read as those bytes and ids."""

    eos_id: int | None = None
    chat_template: str | None = None
    # The presets' generation config: greedy (random weights, whose sampled text says nothing;
    # greedy tokens are checked against the no-cache reference). A request may still sample.
    sampling_defaults: dict[str, float] = {"temperature": 0.0}
    bos_token = eos_token = ""

    def __init__(self, vocab_size: int):
        if vocab_size < 256:
            raise ValueError(f"byte tokenizer needs vocab_size >= 256, model has {vocab_size}")
        self.vocab_size = vocab_size
        self._specials = re.compile(f"([{chr(SPECIAL_BASE)}-{chr(SPECIAL_BASE + max(0, vocab_size - 257))}])")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._specials.split(text):
            if len(part) == 1 and self._specials.fullmatch(part):
                ids.append(256 + ord(part) - SPECIAL_BASE)
            elif part:
                ids.extend(part.translate(_RAW_TO_ESCAPE).encode("utf-8", errors="surrogateescape"))
        return ids

    def decode(self, ids: list[int]) -> str:
        out, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            out += [_text(run), chr(SPECIAL_BASE + i - 256)]
            run = bytearray()
        return "".join(out) + _text(run)


SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_defaults(generation: dict) -> dict[str, float]:
    """A checkpoint's own sampling defaults (its generation_config.json), which a request that names
    none of them gets, as vLLM applies them (the rest are OpenAI's); transformers' top_k 0 is "off"."""
    out = {k: generation[k] for k in SAMPLING_DEFAULT_KEYS
           if isinstance(generation.get(k), (int, float)) and not isinstance(generation.get(k), bool)}
    if out.get("top_k") == 0:
        out["top_k"] = -1
    return out


class HFTokenizer:
    """A checkpoint's tokenizer.json, with its end-of-sequence token and chat template (from
    generation_config.json / tokenizer_config.json, as transformers reads them)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _T  # optional dependency, present with transformers

        self._tok = _T.from_file(str(path / "tokenizer.json"))
        config = _json(path / "tokenizer_config.json")
        self.bos_token, self.eos_token = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template
        generation = _json(path / "generation_config.json")
        self.sampling_defaults = sampling_defaults(generation)
        eos = generation.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        self.eos_id: int | None = eos if eos is not None else (self._tok.token_to_id(self.eos_token)
                                                                if self.eos_token else None)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def _json(path: Path) -> dict:
    import json

    return json.loads(path.read_text()) if path.exists() else {}


def _token_text(token) -> str:
    """tokenizer_config.json gives special tokens as text or as {"content": text, ...}."""
    return token.get("content", "") if isinstance(token, dict) else (token or "")


def load_tokenizer(weights: str | None, vocab_size: int) -> Tokenizer:
    """The checkpoint's tokenizer.json when present (and the `tokenizers` package is installed),
    else the byte-level default."""
    if weights and (Path(weights) / "tokenizer.json").exists():
        try:
            return HFTokenizer(Path(weights))
        except ImportError:
            pass
    return ByteTokenizer(vocab_size)
