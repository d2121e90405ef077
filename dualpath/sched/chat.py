"""Chat: OpenAI chat messages rendered to a prompt with the checkpoint's own chat template.

A Hugging Face checkpoint brings a Jinja template in tokenizer_config.json; it is rendered the way
transformers' ``apply_chat_template`` renders it (a sandboxed Jinja environment, ``messages``,
``tools``, ``add_generation_prompt``, ``bos_token`` and ``eos_token``). The presets have no
template of their own and use ``PRESET_TEMPLATE``:

    <|system|>
    You are a coding agent.<|end|>
    <|user|>
    List the files.<|end|>
    <|assistant|>
    ...

A tool result is a ``tool`` message, rendered like any other role. An agent's next turn sends the
same messages again plus the answer and the tool output, and the template renders the earlier part
identically, so the next prompt extends the last one token for token and its KV is a cache hit.
"""

from __future__ import annotations

from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

PRESET_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ROLES = ("system", "developer", "user", "assistant", "tool")


class ChatError(ValueError):
    """The messages cannot be rendered: the message says why (answered with 400)."""


def _raise(message: str):
    raise TemplateError(message)


class ChatTemplate:
    def __init__(self, template: str | None, bos_token: str = "", eos_token: str = ""):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self.template = env.from_string(template or PRESET_TEMPLATE)
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: Any, tools: Any = None) -> str:
        """The prompt for these messages, ending where the assistant's answer starts."""
        messages = [_message(m, i) for i, m in enumerate(_list(messages, "messages"))]
        if tools is not None:
            _list(tools, "tools")
        try:
            return self.template.render(messages=messages, tools=tools, add_generation_prompt=True,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as e:
            raise ChatError(f"the chat template refused these messages: {e}") from None


def _list(value: Any, name: str) -> list:
    if not isinstance(value, list) or (name == "messages" and not value):
        raise ChatError(f"'{name}' must be a non-empty list" if name == "messages" else f"'{name}' must be a list")
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
    if content is None and m.get("tool_calls"):
        content = ""
    if not isinstance(content, str):
        raise ChatError(f"messages[{i}].content must be a string or a list of text parts")
    return {**m, "content": content}
