"""OpenAI's Responses API (``/v1/responses``) as a chat completion underneath.

A request's ``instructions`` and ``input`` (a string, or items: messages, ``function_call`` and
``function_call_output``) become chat messages, its function tools chat tools, ``max_output_tokens``
max_tokens; the chat path (parse.py, the chat template, tools.py) does the rest. The answer comes back
as ``output`` items: a ``message`` with ``output_text``, then a ``function_call`` per tool call.
``previous_response_id`` continues a conversation this process answered: its messages and answer
come first (kept for the last MAX_STORED responses only; an unknown id is a 404).

A stream is OpenAI's typed events: ``response.created``, ``response.in_progress``, then per output
item ``output_item.added``, its text or arguments (``output_text.delta``/``.done``,
``function_call_arguments.delta``/``.done``), ``output_item.done``, and ``response.completed``.
Parameters this server cannot honour (background runs, stored conversations, reasoning effort, JSON
output formats, truncation) are refused by name.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import OrderedDict
from typing import Any

from dualpath.sched.errors import BadRequest
from dualpath.sched.tools import ToolCall

MAX_STORED = 1024  # responses kept for previous_response_id: a conversation's messages each
PASSED_ON = ("temperature", "top_p", "stream", "model", "dualpath_policy", "seed", "stop", "top_k", "min_p",
             "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "tool_choice",
             "parallel_tool_calls")  # a chat completion's parameters of the same meaning
REFUSED = {"background": (None, False), "conversation": (None,), "prompt": (None,), "include": (None, []),
           "reasoning": (None, {}), "truncation": (None, "disabled"), "top_logprobs": (None, 0),
           "text": (None, {}, {"format": {"type": "text"}})}  # each with the values that ask for nothing


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class Conversations:
    """The messages and answer of recent responses, by response id, for previous_response_id."""

    def __init__(self, limit: int = MAX_STORED):
        self.limit = limit
        self._by_id: OrderedDict[str, list[dict]] = OrderedDict()  # oldest first

    def keep(self, request_id: str, messages: list[dict]) -> None:
        self._by_id[request_id] = messages
        while len(self._by_id) > self.limit:
            self._by_id.popitem(last=False)

    def get(self, request_id: Any) -> list[dict]:
        if not isinstance(request_id, str) or request_id not in self._by_id:
            raise BadRequest(f"no response {request_id!r} is kept here ('previous_response_id': this process keeps its "
                             f"last {self.limit} responses)", status=404, param="previous_response_id")
        return self._by_id[request_id]


def to_chat(body: dict, earlier: Conversations) -> tuple[dict, list[dict]]:
    """A Responses request as a chat-completions body, and the conversation's messages so far."""
    for name, fine in REFUSED.items():
        if body.get(name) not in fine:
            raise BadRequest(f"'{name}' is not supported here", param=name)
    messages = earlier.get(body["previous_response_id"]) if body.get("previous_response_id") else []
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise BadRequest("'instructions' must be a string", param="instructions")
    messages = messages + _input_messages(body.get("input"))
    chat = {name: body[name] for name in PASSED_ON if name in body}
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    if body.get("tools") is not None:
        chat["tools"] = _chat_tools(body["tools"])
    system = [{"role": "system", "content": instructions}] if instructions else []
    return {**chat, "messages": system + messages}, messages


def _input_messages(items: Any) -> list[dict]:
    """`input` as chat messages: consecutive function calls are one assistant message's tool calls."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise BadRequest("'input' must be a string or a non-empty list of items", param="input")
    messages: list[dict] = []
    for i, item in enumerate(items):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            messages.append({"role": item.get("role"), "content": _text(item.get("content"), i)})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": item.get("output")})
        else:
            raise BadRequest(f"input[{i}] must be a message, function_call or function_call_output item",
                             param="input")
    return messages


def _text(content: Any, i: int) -> Any:
    """A message's content: a string, or its text parts joined (other parts are refused)."""
    if not isinstance(content, list):
        return content  # the chat path checks it is a string
    if not all(isinstance(p, dict) and p.get("type") in ("input_text", "output_text") and isinstance(p.get("text"), str)
               for p in content):
        raise BadRequest(f"input[{i}].content: only input_text and output_text parts are supported", param="input")
    return "".join(p["text"] for p in content)


def _chat_tools(tools: Any) -> list:
    """Responses' flat function tools as chat's nested ones (chat.py checks their shape)."""
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be a list", param="tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise BadRequest(f"tools[{i}]: only function tools are supported", param="tools")
        out.append({"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}})
    return out


# ---------------------------------------------------------------------- what is answered

def message_item(text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": new_id("msg"), "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []}


def call_item(call: ToolCall) -> dict:
    return {"type": "function_call", "id": new_id("fc"), "call_id": call.id, "name": call.name,
            "arguments": call.arguments, "status": "completed"}


def response_body(request_id: str, body: dict, model: str, output: list[dict], finish: str | None, usage: dict | None,
                  created: int) -> dict:
    """The response object; `finish` None while it is in progress, 'length' makes it incomplete."""
    status = "in_progress" if finish is None else "incomplete" if finish == "length" else "completed"
    return {"id": request_id, "object": "response", "created_at": created, "status": status, "model": model,
            "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "previous_response_id": body.get("previous_response_id"), "tools": body.get("tools") or [],
            "tool_choice": body.get("tool_choice", "auto"), "parallel_tool_calls": True,
            "temperature": body.get("temperature"), "top_p": body.get("top_p"), "metadata": body.get("metadata"),
            "text": {"format": {"type": "text"}}, "usage": usage}


def response_usage(chat_usage: dict) -> dict:
    return {"input_tokens": chat_usage["prompt_tokens"], "output_tokens": chat_usage["completion_tokens"],
            "total_tokens": chat_usage["total_tokens"],
            "input_tokens_details": {"cached_tokens": chat_usage["prompt_tokens_details"]["cached_tokens"]},
            "output_tokens_details": {"reasoning_tokens": 0}}


def output_items(content: str, calls: list[ToolCall]) -> list[dict]:
    return ([message_item(content)] if content else []) + [call_item(c) for c in calls]


def answer_messages(content: str, calls: list[ToolCall]) -> list[dict]:
    """The answer as the chat message a later turn sends back (previous_response_id)."""
    return [{"role": "assistant", "content": content, "tool_calls": [c.openai() for c in calls] or None}]


class ResponseEvents:
    """A streamed response's events, each as a server-sent event with its type and sequence number."""

    def __init__(self, request_id: str, body: dict, model: str):
        self.request_id, self.body, self.model, self.created = request_id, body, model, int(time.time())
        self.output: list[dict] = []  # the items done so far
        self._text: dict | None = None  # the message item whose text is streaming
        self._so_far = ""  # its text
        self._seq = 0

    def _event(self, kind: str, **fields) -> bytes:
        self._seq += 1
        data = {"type": kind, "sequence_number": self._seq, **fields}
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()

    def start(self) -> bytes:
        response = response_body(self.request_id, self.body, self.model, [], None, None, self.created)
        return self._event("response.created", response=response) + self._event("response.in_progress",
                                                                                   response=response)

    def text(self, delta: str) -> bytes:
        if not delta:
            return b""
        out = b""
        if self._text is None:
            self._text = message_item("", "in_progress")
            part = {"type": "output_text", "text": "", "annotations": []}
            out += self._event("response.output_item.added", output_index=len(self.output), item=self._text)
            out += self._event("response.content_part.added", item_id=self._text["id"],
                               output_index=len(self.output), content_index=0, part=part)
        self._so_far += delta
        return out + self._event("response.output_text.delta", item_id=self._text["id"],
                                 output_index=len(self.output), content_index=0, delta=delta, logprobs=[])

    def _end_text(self) -> bytes:
        if self._text is None:
            return b""
        text, index = self._so_far, len(self.output)
        item = {**self._text, "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}
        self._text, self._so_far = None, ""
        self.output.append(item)
        return (self._event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=text, logprobs=[])
                + self._event("response.content_part.done", item_id=item["id"], output_index=index,
                              content_index=0, part=item["content"][0])
                + self._event("response.output_item.done", output_index=index, item=item))

    def calls(self, calls: list[ToolCall]) -> bytes:
        out = self._end_text() if calls else b""
        for call in calls:
            item, index = call_item(call), len(self.output)
            out += self._event("response.output_item.added", output_index=index,
                               item={**item, "arguments": "", "status": "in_progress"})
            out += self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                               delta=item["arguments"])
            out += self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                               arguments=item["arguments"])
            out += self._event("response.output_item.done", output_index=index, item=item)
            self.output.append(item)
        return out

    def error(self, status: int, message: str) -> bytes:
        """A failure after the stream began (its status can no longer be the response's)."""
        return self._event("error", code=str(status), message=message, param=None)

    def finish(self, finish: str, usage: dict) -> bytes:
        out = self._end_text()
        response = response_body(self.request_id, self.body, self.model, self.output, finish, usage, self.created)
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        return out + self._event(kind, response=response)
