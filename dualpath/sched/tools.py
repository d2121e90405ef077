"""Tool calls in an answer's text: found, parsed into OpenAI's ``tool_calls`` and taken out of the
content, the whole answer at once or piece by piece as it streams.

A chat template says how its model writes a call, and renders the calls of earlier turns the same
way (chat.py):

- the presets: ``<|tool_call|>{"name": "ls", "arguments": {"path": "."}}<|/tool_call|>``
- Qwen-style (Hermes) templates: ``<tool_call>\\n{"name": "ls", "arguments": {...}}\\n</tool_call>``

Both are a start marker, a JSON object with a ``name`` and an ``arguments`` object, and an end
marker. A call whose JSON does not parse, or that names no tool of the request, stays text, as
written (vLLM's Hermes parser does the same): the client sees what the model wrote rather than
nothing. A call that the answer's end cuts before its end marker (a stop string, the end-of-sequence
token) counts if its JSON is whole. Whitespace next to a call is not content.

A stream holds back what is not settled yet: text that may be the beginning of a start marker,
everything after a start marker until its end marker, and trailing whitespace (a call may follow
it). So the content and calls a stream gives out are the non-streamed ones, however the text was cut.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Collection
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ToolCallFormat:
    """How a model writes a call: start marker, a JSON object, end marker."""
    start: str
    end: str


PRESET = ToolCallFormat("<|tool_call|>", "<|/tool_call|>")
HERMES = ToolCallFormat("<tool_call>", "</tool_call>")


def format_of(template: str) -> ToolCallFormat | None:
    """The call format a Hugging Face chat template renders (None: one this module does not know;
    its answers are then given out as text)."""
    return HERMES if HERMES.start in template and HERMES.end in template else None


def _call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI sends arguments so)
    id: str = field(default_factory=_call_id)

    def openai(self) -> dict:
        """As an entry of a message's `tool_calls`."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse_call(body: str, names: Collection[str]) -> ToolCall | None:
    """The call written between two markers, or None where it is not one: JSON that does not parse,
    not an object, a name that is no tool of the request, arguments that are not an object."""
    try:
        call = json.loads(body)
    except (ValueError, RecursionError):  # (JSONDecodeError, and an integer of over 4,300 digits)
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or call["name"] not in names:
        return None
    arguments = call.get("arguments", {})
    if not isinstance(arguments, dict):
        return None
    return ToolCall(call["name"], json.dumps(arguments, ensure_ascii=False))


def _partial_marker(text: str, marker: str) -> int:
    """How many characters at the end of `text` may be the beginning of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ToolCallParser:
    """An answer's text, given piece by piece, split into content and tool calls."""

    def __init__(self, fmt: ToolCallFormat, names: Collection[str]):
        self.fmt, self.names = fmt, frozenset(names)
        self.calls: list[ToolCall] = []  # every call found so far
        self._rest = ""  # not settled: a possible start marker's beginning, or a call's body
        self._inside = False  # _rest follows a start marker
        self._space = ""  # trailing whitespace held back: content unless a call follows
        self._after_call = False  # the whitespace that follows a call is not content either

    def add(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        """The content and the calls that `text`, appended to the answer, settles. `final`: the
        answer ends here, so all that was held back is settled."""
        self._rest += text
        content: list[str] = []
        new: list[ToolCall] = []
        while (i := self._rest.find(self.fmt.end if self._inside else self.fmt.start)) >= 0:
            piece = self._rest[:i]
            self._rest = self._rest[i + len(self.fmt.end if self._inside else self.fmt.start):]
            if self._inside:
                content.append(self._end_call(piece, new, closed=True))
            else:
                content.append(self._content(piece))
                self._inside = True
        if final:
            content.append(self._end_call(self._rest, new, closed=False) if self._inside else
                           self._content(self._rest))
            self._rest = ""
            if not (self.calls or new):
                content.append(self._space)  # without calls, trailing whitespace is content
        elif not self._inside:
            keep = len(self._rest) - _partial_marker(self._rest, self.fmt.start)
            content.append(self._content(self._rest[:keep]))
            self._rest = self._rest[keep:]
        self.calls += new
        return "".join(content), new

    def _end_call(self, body: str, new: list[ToolCall], closed: bool) -> str:
        """A call's body has ended: a call, or (not one) the text as the model wrote it."""
        self._inside = False
        call = parse_call(body, self.names)
        if call is None:
            return self._content(self.fmt.start + body + (self.fmt.end if closed else ""))
        new.append(call)
        self._space, self._after_call = "", True
        return ""

    def _content(self, text: str) -> str:
        """`text` as content, less the whitespace after a call; trailing whitespace is held back
        until what follows shows whether it stands before a call."""
        if self._after_call:
            text = text.lstrip()
            self._after_call = not text
        text = self._space + text
        kept = text.rstrip()
        self._space = text[len(kept):]
        return kept


def split_tool_calls(text: str, fmt: ToolCallFormat, names: Collection[str]) -> tuple[str, list[ToolCall]]:
    """A whole answer's content and calls (what a stream of it gives out, joined)."""
    return ToolCallParser(fmt, names).add(text, final=True)
