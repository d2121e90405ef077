"""A request's answer as text, decoded a few tokens at a time, and cut at its first stop string.

Decoding the whole output again at every token (as the coordinator once did) costs O(n) per token
and O(n * stops) to search: 80,000 stop strings and 3,000 tokens took 252 s and slowed every other
request (issue #30). Here each token costs O(few tokens) to decode and O(stops * max stop length)
to search, as in vLLM's incremental detokenizer:

- ``Detokenizer`` decodes a window of the last few tokens: the text of ``ids[prefix:]`` past that of
  ``ids[prefix:read]`` is the new text. The lagging ``prefix`` gives a tokenizer the context it
  needs (a SentencePiece token drops its leading space at the start of a text). A window whose text
  ends in the middle of a character waits for the next token: a Hugging Face tokenizer shows a
  partial byte sequence as U+FFFD, the byte tokenizer its bytes as raw-byte characters. The text
  given out is then the text of all the ids decoded at once.
- ``AnswerText`` searches each new piece, plus the last (longest stop - 1) characters before it,
  for the stop strings, and holds those characters back from the client until it knows they do
  not begin a stop string: a stream never shows part of a stop string, and the streamed text is
  the non-streamed text.
"""

from __future__ import annotations

from dualpath.engine.tokenizer import RAW_BASE, Tokenizer

MAX_CHAR_TOKENS = 4  # a UTF-8 character is at most 4 bytes (4 byte tokens)
MAX_HOLD_TOKENS = 16  # a window waits no longer for its text to end with a whole character


def _utf8_needs_more(raw: bytes) -> bool:
    """Whether `raw` ends inside a UTF-8 sequence that more bytes could still complete."""
    for back in range(1, min(4, len(raw)) + 1):
        b = raw[-back]
        if b < 0x80:
            return False
        if b >= 0xC0:  # a lead byte: 2, 3 or 4 bytes in all (0xF5 and up start nothing)
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return 0xC2 <= b <= 0xF4 and back < need
    return False


def _unfinished(text: str) -> bool:
    """Whether the end of a decoded window may still change when the next token comes."""
    if not text:
        return False
    if text[-1] == "\ufffd":
        return True
    raw = bytearray()  # the byte tokenizer's trailing raw bytes (engine/tokenizer.py)
    for ch in reversed(text[-4:]):
        if not RAW_BASE <= ord(ch) < RAW_BASE + 128:
            break
        raw.insert(0, ord(ch) - RAW_BASE + 0x80)
    return _utf8_needs_more(bytes(raw))


class Detokenizer:
    """The text of a growing list of token ids, a few tokens at a time."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._prefix = 0  # the window starts here: context for the tokenizer, already given out
        self._read = 0  # the text of the tokens before this one is given out

    def step(self, ids: list[int], final: bool = False) -> str:
        """The text that the tokens appended to `ids` since the last call settle: up to the last
        token after which the text ends with a whole character. `final` gives out all that is left
        (the answer has ended). A window that waited MAX_HOLD_TOKENS tokens (a genuine U+FFFD, raw
        bytes that keep looking like a character's start, tokens that show no text) gives out all
        but its last MAX_CHAR_TOKENS - 1 tokens, which bounds the cost of garbage: no character of
        the byte tokenizer spans that cut, though one of a BPE tokenizer (whose tokens may each
        hold part of a character) might, and then shows as U+FFFD."""
        if self._read >= len(ids):
            return ""
        before = self.tokenizer.decode(ids[self._prefix:self._read])
        cut = len(ids) if final else len(ids) - MAX_CHAR_TOKENS + 1
        forced = final or len(ids) - self._read >= MAX_HOLD_TOKENS
        for end in range(len(ids), self._read, -1):  # usually settled at the first try
            after = self.tokenizer.decode(ids[self._prefix:end])
            if (forced and end == cut) or (len(after) > len(before) and not _unfinished(after)):
                self._prefix, self._read = self._read, end
                return after[len(before):]
        return ""


class AnswerText:
    """A request's answer text, up to its first stop string."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str]):
        self.detok = Detokenizer(tokenizer)
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1  # may be the start of a stop string
        self.pending = ""  # decoded text not given out yet: at most `hold` characters
        self.parts: list[str] = []  # the text given out so far
        self.stopped = False  # a stop string ended the answer

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def add(self, ids: list[int], final: bool = False) -> str:
        """After tokens were appended to `ids`: the text to give out now, ending before a stop
        string if one appeared (then `stopped` is set). `final`: the answer ends here, so give out
        what was held back."""
        if self.stopped:
            return ""
        window = self.pending + self.detok.step(ids, final)
        cut = min((i for i in (window.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, out, self.pending = True, window[:cut], ""
        elif final or not self.hold:
            out, self.pending = window, ""
        else:
            keep = min(self.hold, len(window))
            out, self.pending = window[:len(window) - keep], window[len(window) - keep:]
        self.parts.append(out)
        return out
