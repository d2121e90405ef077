"""Chat: OpenAI chat messages rendered to a prompt with the checkpoint's own chat template.

A Hugging Face checkpoint brings a Jinja template in tokenizer_config.json; it is rendered the way
transformers' ``apply_chat_template`` renders it (a sandboxed Jinja environment, ``messages``,
``tools``, ``add_generation_prompt``, ``bos_token`` and ``eos_token``, a ``tojson`` that does not
escape HTML, and each tool call's ``arguments`` as an object, as templates expect them). The presets
have no template of their own and use ``PRESET_TEMPLATE``: the tools, one JSON object a line, then
each message, an assistant's tool calls in the format tools.py parses out of answers:

    <|tools|>
    {"type": "function", "function": {"name": "ls", "parameters": {"type": "object"}}}<|end|>
    <|system|>
    You are a coding agent.<|end|>
    <|user|>
    List the files.<|end|>
    <|assistant|>
    <|tool_call|>{"name": "ls", "arguments": {"path": "."}}<|/tool_call|><|end|>
    <|tool|>
    a.py b.py<|end|>
    <|assistant|>
    ...

A tool result is a ``tool`` message, rendered like any other role. ``tools``, ``tool_choice`` and an
assistant message's ``tool_calls`` must have their OpenAI shape (a 400 names what is wrong). An
agent's next turn sends the same messages again plus the answer and the tool output, and the template
renders the earlier part identically, so the next prompt extends the last one token for token and
its KV is a cache hit.
"""

from __future__ import annotations

import json
import re
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dualpath.sched.tools import PRESET, ToolCallFormat, format_of

PRESET_TEMPLATE = (
    "{% if tools %}<|tools|>\n{{ tools | map('tojson') | join('\n') }}<|end|>\n{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}"
    "{% for call in m.tool_calls or [] %}{% set f = call.function or call.custom %}"
    "<|tool_call|>{\"name\": {{ f.name | tojson }}, "
    "{% if call.function %}\"arguments\": {{ f.arguments if f.arguments is string else f.arguments | tojson }}"
    "{% else %}\"input\": {{ f.input | tojson }}{% endif %}}<|/tool_call|>{% endfor %}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_TOOLS = 128  # OpenAI's limit
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for a function's name
TOOL_CHOICES = ("none", "auto", "required")


class ChatError(ValueError):
    """The messages cannot be rendered: the message says why (answered with 400, naming `param`)."""

    def __init__(self, message: str, param: str = "messages"):
        super().__init__(message)
        self.param = param


def _raise(message: str):
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    """transformers' tojson: Jinja's own escapes <, >, & and ' for HTML, which a prompt must not."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    def __init__(self, template: str | None, bos_token: str = "", eos_token: str = ""):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])  # as transformers has it
        env.globals["raise_exception"] = _raise
        env.filters["tojson"] = _tojson
        self.template = env.from_string(template or PRESET_TEMPLATE)
        self.bos_token, self.eos_token = bos_token, eos_token
        # how its model writes a tool call (None: unknown, so answers are not searched for calls)
        self.tool_format: ToolCallFormat | None = PRESET if template is None else format_of(template)

    def render(self, messages: Any, tools: Any = None) -> str:
        """The prompt for these messages (and tools: check them first, with check_tools), ending
        where the assistant's answer starts."""
        messages = [_message(m, i) for i, m in enumerate(_list(messages, "messages"))]
        try:
            return self.template.render(messages=messages, tools=tools, add_generation_prompt=True,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as e:
            raise ChatError(f"the chat template refused these messages: {e}") from None


def _list(value: Any, name: str) -> list:
    if not isinstance(value, list) or not value:
        raise ChatError(f"'{name}' must be a non-empty list")
    return value


def _message(m: Any, i: int) -> dict:
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise ChatError(f"messages[{i}] must be an object with a 'role' among {list(ROLES)}")
    content = m.get("content")
    if isinstance(content, list):  # content parts: only text is understood here
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ChatError(f"messages[{i}].content: only text parts are supported")
        content = "".join(p["text"] for p in content)
    if "tool_calls" in m and m["tool_calls"] is not None:
        if m["role"] != "assistant":
            raise ChatError(f"messages[{i}].tool_calls: only an assistant message makes tool calls")
        calls = m["tool_calls"]
        if not isinstance(calls, list):
            raise ChatError(f"messages[{i}].tool_calls must be a list")
        for j, call in enumerate(calls):
            _tool_call(call, f"messages[{i}].tool_calls[{j}]")
        m = {**m, "tool_calls": [_for_template(call) for call in calls]}
        if content is None:
            content = ""
    if not isinstance(content, str):
        raise ChatError(f"messages[{i}].content must be a string or a list of text parts")
    return {**m, "content": content}


def _for_template(call: dict) -> dict:
    """A tool call as chat templates expect it: `arguments` an object, not JSON text (vLLM and
    transformers do the same); text that is not a JSON object stays as it is."""
    function = call.get("function")
    if function is None:
        return call
    try:
        arguments = json.loads(function["arguments"])
    except (ValueError, RecursionError):
        return call
    if not isinstance(arguments, dict):
        return call
    return {**call, "function": {**function, "arguments": arguments}}


JSON_KINDS = {str: "a string", dict: "an object", list: "a list", bool: "true or false"}


def _object(value: Any, where: str, param: str, fields: dict[str, type], required: tuple[str, ...]) -> dict:
    """`value` as an object whose `fields` have these types (absent or null where not required)."""
    if not isinstance(value, dict):
        raise ChatError(f"{where} must be an object", param)
    for name, kind in fields.items():
        v = value.get(name)
        if (v is not None or name in required) and not isinstance(v, kind):
            raise ChatError(f"{where}.{name} must be {JSON_KINDS[kind]}", param)
    return value


def _tool_call(call: Any, where: str) -> None:
    """An assistant's tool call: {"id", "type": "function", "function": {"name", "arguments"}} (or
    a custom tool's {"custom": {"name", "input"}}); arguments are JSON text, as OpenAI sends them."""
    kind = _object(call, where, "messages", {"id": str, "type": str}, ("id", "type"))["type"]
    if kind == "function":
        _object(call.get("function"), f"{where}.function", "messages", {"name": str, "arguments": str},
                ("name", "arguments"))
    elif kind == "custom":
        _object(call.get("custom"), f"{where}.custom", "messages", {"name": str, "input": str}, ("name", "input"))
    else:
        raise ChatError(f"{where}.type must be 'function' or 'custom', got {kind!r}")


def _tool(tool: Any, i: int) -> str:
    """A tool definition; returns its name."""
    where = f"tools[{i}]"
    kind = _object(tool, where, "tools", {"type": str}, ("type",))["type"]
    if kind not in ("function", "custom"):
        raise ChatError(f"{where}.type must be 'function' or 'custom', got {kind!r}", "tools")
    spec = _object(tool.get(kind), f"{where}.{kind}", "tools",
                   {"name": str, "description": str, "parameters": dict, "strict": bool, "format": dict}, ("name",))
    if not TOOL_NAME.fullmatch(spec["name"]):
        raise ChatError(f"{where}.{kind}.name must be 1-64 letters, digits, '_' or '-', got {spec['name']!r}",
                        "tools")
    return spec["name"]


def check_tools(tools: Any, tool_choice: Any) -> None:
    """`tools` and `tool_choice` as OpenAI defines them; a named choice must name a given tool."""
    if tools is None:
        names: set[str] = set()
    else:
        if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
            raise ChatError(f"'tools' must be a list of at most {MAX_TOOLS} tools", "tools")
        names = {_tool(t, i) for i, t in enumerate(tools)}
    if tool_choice is None or tool_choice in ("none", "auto"):
        return
    if not names:
        raise ChatError("'tool_choice' other than 'none' or 'auto' needs 'tools'", "tool_choice")
    if tool_choice == "required":
        return
    if isinstance(tool_choice, str):
        raise ChatError(f"'tool_choice' must be one of {list(TOOL_CHOICES)} or an object, got {tool_choice!r}",
                        "tool_choice")
    kind = _object(tool_choice, "tool_choice", "tool_choice", {"type": str}, ("type",))["type"]
    if kind == "allowed_tools":
        allowed = _object(tool_choice.get("allowed_tools"), "tool_choice.allowed_tools", "tool_choice",
                          {"mode": str, "tools": list}, ("mode", "tools"))
        if allowed["mode"] not in ("auto", "required") or not all(isinstance(t, dict) for t in allowed["tools"]):
            raise ChatError("tool_choice.allowed_tools needs 'mode' 'auto' or 'required' and a list of tool "
                            "objects", "tool_choice")
        return
    if kind not in ("function", "custom"):
        raise ChatError(f"tool_choice.type must be 'function', 'custom' or 'allowed_tools', got {kind!r}",
                        "tool_choice")
    name = _object(tool_choice.get(kind), f"tool_choice.{kind}", "tool_choice", {"name": str}, ("name",))["name"]
    if name not in names:
        raise ChatError(f"tool_choice names the tool {name!r}, which is not among 'tools'", "tool_choice")
