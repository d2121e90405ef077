"""A request body, read and checked: every parameter OpenAI or vLLM documents for
``/v1/completions`` and ``/v1/chat/completions`` is applied or refused with a 400 naming it.

``loads`` reads the JSON (an integer beyond 64 bits is a 400 saying where it is);
``parse_completion`` turns a completion body into its prompts' token ids, the request's parameters
(``params["sampling"]``: the SamplingParams its engines draw with) and its policy;
``parse_chat`` renders a chat body's messages with the chat template (chat.py) into the prompt of a
completion, and says whether answers are searched for tool calls (tools.py). Nothing here does I/O:
what a body is checked against (the model, its context, what one engine can hold) is a ``Limits``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, NamedTuple

from dualpath.config import POLICIES
from dualpath.engine.tokenizer import Tokenizer
from dualpath.protocol import SamplingParams
from dualpath.sched.chat import ChatError, ChatTemplate, check_tools
from dualpath.sched.errors import BadRequest
from dualpath.sched.tools import ToolCallFormat, ToolCallParser

MAX_SEED = 2**63  # seeds travel as 64-bit integers
MAX_INT = 2**63  # every integer in a request body fits 64 bits (Python's own limit is 4,300 digits: a 500)
# A chat request without max_tokens may answer up to the rest of its context (vLLM), but a DE reserves
# HBM for prompt + max_tokens when it admits a request (vLLM allocates as tokens come), so an
# unbounded default would let one such request hold a whole engine: the default stops here.
CHAT_DEFAULT_MAX_TOKENS = 4096
# Stop strings: OpenAI takes at most 4; agent frameworks sometimes send a few more (vLLM sets no
# bound). Each token is searched for each stop string, and a stream holds back the last (longest
# - 1) characters until they cannot begin one: both bounds keep that cost small and fixed.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
MAX_REPETITION_PENALTY = 1e6  # vLLM takes any positive value; beyond this every seen logit is ~0 or ~-inf anyway
MAX_STOP_TOKEN_IDS = 256  # each generated token is looked up among them
MAX_LOGIT_BIAS = 1024  # OpenAI documents no bound; each draw adds every one of them
MIN_TEMPERATURE = 1e-3  # below it, logits / T overflows: such a request is answered greedily (T = 0)
CHAT_ONLY = ("messages", "tools", "tool_choice", "parallel_tool_calls", "prompt")  # not a completion's


@dataclass(frozen=True)
class Limits:
    """What a request body is checked against: the model served and what one engine can hold."""
    model_name: str
    vocab_size: int
    max_context: int  # prompt + answer tokens of one request
    block_tokens: int
    hbm_blocks: int  # an engine's KV blocks in HBM (a DE keeps one as scratch)
    buffer_blocks: int  # an engine's DRAM-buffer blocks
    default_policy: str

    @property
    def max_engine_tokens(self) -> int:
        """Prompt + answer tokens one engine can ever hold (check_fits): chat's default max_tokens
        stops there, or every long default would be refused."""
        return (self.hbm_blocks - 1) * self.block_tokens

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_tokens)

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """Refuse at once a request that no engine could ever hold (it would wait for room forever)."""
        need_hbm, need_buf = self.blocks_for(prompt_tokens + max_tokens), self.blocks_for(prompt_tokens)
        if need_hbm > self.hbm_blocks - 1 or need_buf > self.buffer_blocks:
            raise BadRequest(f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) needs {need_hbm} KV blocks "
                             f"and {need_buf} buffer blocks of {self.block_tokens} tokens; engines hold "
                             f"{self.hbm_blocks - 1} and {self.buffer_blocks}")


class ParsedRequest(NamedTuple):
    """A completion request as the coordinator runs it: one token list per prompt (a batch has
    several), `params` (max_tokens, sampling, stop, stream, include_usage) and the policy."""
    prompts: list[list[int]]
    params: dict
    policy: str


class ChatRequest(NamedTuple):
    """A chat request: its rendered prompt as a completion, and how its answers are searched for
    tool calls (None: they are not, for no tools were given, tool_choice is "none", or the
    template's format of a call is unknown)."""
    completion: ParsedRequest
    tool_format: ToolCallFormat | None
    tool_names: frozenset[str]

    def call_parser(self) -> ToolCallParser | None:
        """A parser for one answer to this request (it keeps that answer's state), or None."""
        return ToolCallParser(self.tool_format, self.tool_names) if self.tool_format else None


# ---------------------------------------------------------------------- JSON

class _Huge:
    """An integer of a request body beyond 64 bits, as json reads it until loads says where it is
    (Python's int() would refuse 4,301 digits with a ValueError of its own: a 500)."""


def loads(text: str) -> Any:
    """json.loads, but an integer beyond 64 bits is a 400 naming where it is."""
    huge: list[str] = []

    def parse_int(digits: str) -> int | _Huge:
        if len(digits.lstrip("-")) <= 19 and -MAX_INT <= (value := int(digits)) < MAX_INT:
            return value
        huge.append(digits)
        return _Huge()

    body = json.loads(text, parse_int=parse_int)
    if huge:
        where, digits = _where_huge(body), huge[0]
        shown = digits if len(digits) <= 24 else f"{digits[:12]}... ({len(digits)} digits)"
        raise BadRequest(f"'{where}' is the integer {shown}, outside the 64-bit range [-2**63, 2**63)",
                         param=where.split("[")[0].split(".")[0] if where != "body" else None)
    return body


def _where_huge(body: Any) -> str:
    """Where the first _Huge of a parsed body is, as `prompt[3]` or `stream_options.x` (depth
    first, in document order, without recursion: a body may nest deeply)."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, _Huge):
            return where or "body"
        if isinstance(value, dict):
            pairs = [(f"{where}.{k}" if where else str(k), v) for k, v in value.items()]
        elif isinstance(value, list):
            pairs = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
        else:
            continue
        stack.extend(reversed(pairs))
    return "body"


# ---------------------------------------------------------------------- chat

def parse_chat(body: dict, limits: Limits, tokenizer: Tokenizer, template: ChatTemplate) -> ChatRequest:
    """/v1/chat/completions: the messages rendered with the chat template become the prompt;
    everything else is a completion. tool_choice "auto" (the default with tools) renders the tools
    and searches answers for calls; "none" does neither. A choice that forces a call ("required",
    a named tool, allowed_tools) is refused: nothing here constrains what the model generates."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    try:
        render_tools = _tools_honoured(tools, choice)
        text = template.render(body.get("messages"), tools if render_tools else None)
    except ChatError as e:
        raise BadRequest(str(e), param=e.param) from None
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise BadRequest("'parallel_tool_calls' must be a boolean", param="parallel_tool_calls")
    if parallel is False and tools:
        # true (OpenAI's default) is what the parser does: every call an answer makes comes back;
        # false would need the answer stopped after its first call: refused, not ignored
        raise BadRequest("'parallel_tool_calls': false is not supported", param="parallel_tool_calls")
    rest = {k: v for k, v in body.items() if k not in CHAT_ONLY}
    # without max_tokens, the answer may fill the rest of the context (vLLM's default for chat)
    completion = parse_completion({**rest, "prompt": text}, limits, tokenizer, default_max_tokens=None)
    names = frozenset(t["function"]["name"] for t in tools or () if t["type"] == "function")
    tool_format = template.tool_format if render_tools and names else None
    return ChatRequest(completion, tool_format, names)


def _tools_honoured(tools: Any, choice: Any) -> bool:
    """Whether the tools are rendered and answers searched for calls: checks `tools` and
    `tool_choice` (chat.py), then refuses a choice that would force a call."""
    check_tools(tools, choice)
    if choice not in (None, "auto", "none"):
        shown = choice if isinstance(choice, str) else choice.get("type")
        raise ChatError(f"'tool_choice' {shown!r} is not supported (it would need constrained generation): "
                        f"send 'auto' or 'none'", "tool_choice")
    return bool(tools) and choice != "none"


# ---------------------------------------------------------------------- completions

def parse_completion(body: Any, limits: Limits, tokenizer: Tokenizer,
                     default_max_tokens: int | None = 16) -> ParsedRequest:
    """A completion request's prompts (one, or a list of them), parameters and policy. Every
    documented parameter is applied or refused with a 400 naming it. Without max_tokens an answer
    has `default_max_tokens` (OpenAI's 16 for completions), or with None the rest of the context
    (chat, as vLLM does)."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    _refuse_unsupported(body, limits.model_name)
    prompt = body.get("prompt")
    batch = isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt)
    prompts = [_prompt_tokens(p, tokenizer, limits.vocab_size) for p in (prompt if batch else [prompt])]
    max_tokens = _max_tokens(body, prompts, limits, default_max_tokens)
    sampling = _sampling(body, max_tokens, limits.vocab_size, tokenizer.eos_id, tokenizer.sampling_defaults)
    stop = _stop_strings(body.get("stop"))
    stream, include_usage = _stream(body, len(prompts))
    policy = body.get("dualpath_policy", limits.default_policy)
    if policy not in POLICIES:
        raise BadRequest(f"unknown 'dualpath_policy' {policy!r}; expected one of {list(POLICIES)}",
                         param="dualpath_policy")
    params = {"max_tokens": max_tokens, "sampling": sampling, "stop": stop, "stream": stream,
              "include_usage": include_usage}
    return ParsedRequest(prompts, params, policy)


def _refuse_unsupported(body: dict, model_name: str) -> None:
    """Another model, or a feature not implemented: refused by name, never ignored."""
    if body.get("model") not in (None, model_name):
        raise BadRequest(f"the model {body['model']!r} does not exist here (this cluster serves "
                         f"{model_name!r})", status=404, param="model", code="model_not_found")
    for name in ("n", "best_of"):  # one answer per request: n answers are n requests with their own seeds
        if body.get(name) not in (None, 1):
            raise BadRequest(f"'{name}' other than 1 is not supported: send the request that many times "
                             f"(each gets its own seed)", param=name)
    for name in ("logprobs", "top_logprobs", "prompt_logprobs"):  # (chat's logprobs is a bool)
        if body.get(name) not in (None, False, 0):
            raise BadRequest(f"'{name}' is not supported", param=name)
    if body.get("echo"):
        raise BadRequest("'echo' is not supported", param="echo")
    if body.get("suffix") is not None:
        raise BadRequest("'suffix' (insertion) is not supported", param="suffix")
    if body.get("response_format") not in (None, {"type": "text"}):
        raise BadRequest("'response_format' other than {\"type\": \"text\"} (JSON mode, structured output) "
                         "is not supported", param="response_format")


def _prompt_tokens(prompt: Any, tokenizer: Tokenizer, vocab_size: int) -> list[int]:
    if isinstance(prompt, str):
        try:
            tokens = tokenizer.encode(prompt)
        except UnicodeError as e:  # a lone surrogate, say
            raise BadRequest(f"'prompt' is not valid Unicode text: {e.reason}", param="prompt") from None
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        tokens = prompt
        bad = [t for t in tokens if not 0 <= t < vocab_size]
        if bad:
            raise BadRequest(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})", param="prompt")
    else:
        raise BadRequest("'prompt' must be a string, a list of token ids, or a list of either", param="prompt")
    if not tokens:
        raise BadRequest("'prompt' is empty", param="prompt")
    return tokens


def _max_tokens(body: dict, prompts: list[list[int]], limits: Limits, default: int | None) -> int:
    """max_completion_tokens (or max_tokens), checked against the context and the engines."""
    given = body.get("max_completion_tokens", body.get("max_tokens"))
    longest = max(map(len, prompts))
    if given is None and default is None:  # (chat) the rest of the context, up to a bound
        room = min(limits.max_context, limits.max_engine_tokens) - longest
        max_tokens = min(room, CHAT_DEFAULT_MAX_TOKENS) if room >= 1 else room
        if max_tokens < 1:
            raise BadRequest(f"the prompt ({longest} tokens) leaves no room for an answer in the context of "
                             f"{limits.max_context} tokens", param="messages")
    else:
        max_tokens = default if given is None else given
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise BadRequest(f"'max_tokens' must be a positive integer, got {max_tokens!r}", param="max_tokens")
    for tokens in prompts:
        if len(tokens) + max_tokens > limits.max_context:
            raise BadRequest(f"prompt ({len(tokens)} tokens) + max_tokens ({max_tokens}) exceeds the context "
                             f"limit of {limits.max_context} tokens", param="max_tokens")
        limits.check_fits(len(tokens), max_tokens)
    return max_tokens


def _stream(body: dict, n_prompts: int) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"'stream' must be true or false, got {stream!r}", param="stream")
    if stream and n_prompts > 1:
        raise BadRequest("streaming takes one prompt per request", param="prompt")
    options = body.get("stream_options")
    if options is not None and not stream:  # OpenAI refuses it too: it would be ignored
        raise BadRequest("'stream_options' is only allowed with 'stream': true", param="stream_options")
    options = options or {}
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", param="stream_options")
    return stream, bool(options.get("include_usage"))


# ---------------------------------------------------------------------- sampling

def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    """body[name] as a float in [low, high] ((low, high] with low_open), else a 400 naming it."""
    value = body.get(name)
    if value is None:
        return default
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high
            or (low_open and value == low)):  # NaN fails this too
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise BadRequest(f"'{name}' must be a number in {interval}, got {value!r}", param=name)
    return float(value)


def _integer(body: dict, name: str, default: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"'{name}' must be an integer, got {value!r}", param=name)
    return value


def _sampling(body: dict, max_tokens: int, vocab_size: int, eos_id: int | None,
              defaults: dict[str, float] | None = None) -> SamplingParams:
    """The sampling parameters of a request, each in OpenAI's range (or vLLM's, for its own
    parameters), or a 400 naming it. Where a request names none, the checkpoint's own default
    (its generation_config.json, as vLLM reads it; the presets': greedy), else OpenAI's. A request without
    a seed gets a random one here, once: its answer is random, yet its PE and DE draw with the same
    seed (engine/runtime.py)."""
    d = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, **(defaults or {})}
    temperature = _number(body, "temperature", d["temperature"], 0.0, MAX_TEMPERATURE)
    if temperature < MIN_TEMPERATURE:
        temperature = 0.0
    top_p = _number(body, "top_p", d["top_p"], 0.0, 1.0, low_open=True)
    min_p = _number(body, "min_p", d["min_p"], 0.0, 1.0)
    presence = _number(body, "presence_penalty", 0.0, -2.0, 2.0)
    frequency = _number(body, "frequency_penalty", 0.0, -2.0, 2.0)
    repetition = _number(body, "repetition_penalty", d["repetition_penalty"], 0.0, MAX_REPETITION_PENALTY,
                         low_open=True)
    top_k = _integer(body, "top_k", int(d["top_k"]))
    if top_k == 0 or top_k < -1:
        raise BadRequest(f"'top_k' must be -1 (all tokens) or at least 1, got {top_k}", param="top_k")
    min_tokens = _integer(body, "min_tokens", 0)
    if not 0 <= min_tokens <= max_tokens:
        raise BadRequest(f"'min_tokens' must be in [0, max_tokens = {max_tokens}], got {min_tokens}",
                         param="min_tokens")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)
                             or not -MAX_SEED <= seed < MAX_SEED):
        raise BadRequest(f"'seed' must be an integer in [-2**63, 2**63), got {seed!r}", param="seed")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise BadRequest(f"'ignore_eos' must be true or false, got {ignore_eos!r}", param="ignore_eos")
    return SamplingParams(
        temperature=float(temperature), top_p=top_p, top_k=top_k, min_p=min_p,
        seed=random.randrange(-MAX_SEED, MAX_SEED) if seed is None else seed,
        max_tokens=max_tokens, min_tokens=min_tokens,
        stop_token_ids=_stop_token_ids(body.get("stop_token_ids"), vocab_size), ignore_eos=ignore_eos,
        eos_id=eos_id, presence_penalty=presence, frequency_penalty=frequency,
        repetition_penalty=repetition, logit_bias=_logit_bias(body.get("logit_bias"), vocab_size))


def _stop_token_ids(ids: Any, vocab_size: int) -> tuple[int, ...]:
    """vLLM's stop_token_ids: token ids whose drawing ends the answer (finish_reason "stop")."""
    if ids is None:
        return ()
    if (not isinstance(ids, list) or len(ids) > MAX_STOP_TOKEN_IDS
            or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in ids)):
        raise BadRequest(f"'stop_token_ids' must be a list of at most {MAX_STOP_TOKEN_IDS} token ids in "
                         f"[0, {vocab_size})", param="stop_token_ids")
    return tuple(ids)


def _logit_bias(bias: Any, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} map: keys are token ids (JSON makes them strings) below the
    vocabulary size, values in [-100, 100]."""
    if bias is None:
        return ()
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
        raise BadRequest(f"'logit_bias' must be an object of at most {MAX_LOGIT_BIAS} token ids",
                         param="logit_bias")
    pairs = []
    for key, value in bias.items():
        token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 19 else None
        if token is None or token >= vocab_size:
            raise BadRequest(f"'logit_bias' key {key!r} is not a token id in [0, {vocab_size})", param="logit_bias")
        if (not isinstance(value, (int, float)) or isinstance(value, bool)
                or not -100 <= value <= 100):  # NaN fails this too
            raise BadRequest(f"'logit_bias' value for {key} must be a number in [-100, 100], got {value!r}",
                             param="logit_bias")
        pairs.append((token, float(value)))
    return tuple(pairs)


def _stop_strings(stop: Any) -> list[str]:
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a non-empty string or a list of them", param="stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise BadRequest(f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}", param="stop")
    if max(map(len, stop), default=0) > MAX_STOP_CHARS:
        raise BadRequest(f"a stop string has at most {MAX_STOP_CHARS} characters, got one of "
                         f"{max(map(len, stop))}", param="stop")
    return stop
