"""The coordinator's HTTP surface: OpenAI's ``/v1/completions``, ``/v1/chat/completions`` and
``/v1/responses`` (responses.py), and ``/v1/models``, ``/v1/cluster``, ``/healthz``, ``/metrics``
and the dashboard's routes.

A handler reads its body (parse.py), hands the request to the coordinator, which schedules it and
yields its tokens (``Coordinator.generate``), and turns those into text (text.py: incremental
decoding, stop strings), tool calls (tools.py) and OpenAI's bodies or server-sent events
(replies.py). Every failure is an OpenAI-shaped error body, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import secrets
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from dualpath.sched.errors import BadRequest, RequestFailed
from dualpath.sched.parse import Limits, loads, parse_chat, parse_completion
from dualpath.sched.replies import (Served, StreamChunks, chat_body, completion_body, dualpath_info, error_body,
                                    finish_reason, usage)
from dualpath.sched.responses import (Conversations, ResponseEvents, answer_messages, new_id, output_items,
                                      response_body, response_usage, to_chat)
from dualpath.sched.text import AnswerText
from dualpath.sched.tools import ToolCall, ToolCallParser

if TYPE_CHECKING:
    from dualpath.sched.coordinator import Coordinator, RequestState

log = logging.getLogger(__name__)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> web.Response:
    return web.json_response(error_body(status, message, param, code), status=status)


async def json_body(request: web.Request) -> dict:
    try:
        body = await request.json(loads=loads)
    except BadRequest:  # an integer beyond 64 bits
        raise
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
        raise BadRequest("request body is not valid JSON") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def new_text(req: RequestState, answer: AnswerText) -> str:
    """The text to give out for the token just generated. At max_tokens it is the last one, so the
    text held back (a partial character, a possible stop string's start) goes out with it."""
    return answer.add(req.output, final=len(req.output) >= req.params["max_tokens"])


class EventStream(web.StreamResponse):
    """Server-sent events whose status line and headers go out with the first event, so that a
    request that fails before it (no engine in time, a refused start) is answered with its status."""

    def __init__(self, request: web.Request):
        super().__init__(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        self._request = request

    async def write(self, data: bytes) -> None:
        if not self.prepared:
            await self.prepare(self._request)
        await super().write(data)


class Api:
    """The OpenAI-compatible API of one coordinator. It reads `coord.tokenizer` and calls
    `coord.generate` per request (tests answer without engines by replacing them)."""

    def __init__(self, coord: Coordinator):
        self.coord = coord
        cfg = coord.cfg
        self.limits = Limits(coord.model_name, coord.model_cfg.vocab_size, coord.max_context, coord.bt,
                             cfg.engine.hbm_blocks, cfg.engine.buffer_blocks, cfg.scheduler.policy)
        self.served = Served(coord.model_name, coord.bt, coord.block_bytes)
        # A body over this is refused with 413: room for a whole context as token ids or escaped text
        self.max_body_bytes = max(1 << 20, 32 * coord.max_context)
        self.conversations = Conversations()  # for /v1/responses' previous_response_id
        self.started = int(time.time())  # /v1/models' "created": when this coordinator began serving

    def app(self) -> web.Application:
        dashboard = self.coord.dashboard
        app = web.Application(middlewares=[self._errors, self._api_key], client_max_size=self.max_body_bytes)
        app.add_routes([web.post("/v1/completions", self.completions),
                        web.post("/v1/chat/completions", self.chat_completions),
                        web.post("/v1/responses", self.responses), web.get("/v1/models", self.models),
                        web.get("/healthz", self.health), web.get("/v1/cluster", self.cluster),
                        web.get("/metrics", self.metrics), *dashboard.routes()])
        app.cleanup_ctx.append(dashboard.running)
        return app

    # ------------------------------------------------------------------ middlewares

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        """Every failure on the request path becomes an OpenAI-shaped error body, never a traceback."""
        stats, metrics = self.coord.stats, self.coord.metrics
        try:
            return await handler(request)
        except web.HTTPException as e:  # aiohttp's own: a body over the size limit (413), an unknown path
            if e.status < 400:
                raise
            if request.path.startswith("/v1/"):
                stats["rejected"] += 1
                metrics.failed(e.status)
            message = e.text if e.status == 413 else f"{e.reason}: {request.method} {request.path}"
            return error_response(e.status, message)
        except BadRequest as e:  # the client's mistake: a 4xx naming it
            stats["rejected"] += 1
            metrics.failed(e.status)
            return error_response(e.status, str(e), e.param, e.code)
        except RequestFailed as e:
            stats["failed"] += 1
            metrics.failed(e.status)
            return error_response(e.status, str(e))
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            stats["failed"] += 1
            metrics.failed(500)
            return error_response(500, "internal error in the coordinator (see its log)")

    @web.middleware
    async def _api_key(self, request: web.Request, handler) -> web.StreamResponse:
        """With an API key configured, /v1/* needs `Authorization: Bearer <key>` (as vLLM's --api-key)."""
        key = self.coord.cfg.scheduler.api_key
        if key and request.path.startswith("/v1/"):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                self.coord.metrics.failed(401)
                return error_response(401, "missing or wrong API key (send 'Authorization: Bearer <key>')")
        return await handler(request)

    # ------------------------------------------------------------------ OpenAI

    async def completions(self, request: web.Request) -> web.StreamResponse:
        prompts, params, policy = parse_completion(await json_body(request), self.limits, self.coord.tokenizer)
        cid = f"cmpl-{secrets.token_hex(12)}"  # unique across coordinators, as OpenAI's
        reqs = [self.coord.new_request(f"{cid}-{i}" if len(prompts) > 1 else cid, tokens, params, policy)
                for i, tokens in enumerate(prompts)]
        if params["stream"]:
            return await self._stream(request, reqs[0], chat=False)
        try:
            async with asyncio.TaskGroup() as group:  # one prompt failing stops the others: nobody gets them
                tasks = [group.create_task(self._complete(request, r)) for r in reqs]
        except ExceptionGroup as e:  # the first failure answers the request
            raise e.exceptions[0] from None
        return web.json_response(completion_body(cid, reqs, [t.result() for t in tasks], self.served))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """The messages rendered with the chat template (chat.py) are the prompt of a completion
        whose answer may hold tool calls (tools.py)."""
        chat = parse_chat(await json_body(request), self.limits, self.coord.tokenizer, self.coord.chat)
        prompts, params, policy = chat.completion
        req = self.coord.new_request(f"chatcmpl-{secrets.token_hex(12)}", prompts[0], params, policy)
        call_parser = chat.call_parser()
        if params["stream"]:
            return await self._stream(request, req, chat=True, call_parser=call_parser)
        text, finish = await self._complete(request, req)
        content, calls = call_parser.add(text, final=True) if call_parser else (text, [])
        return web.json_response(chat_body(req, content, finish, calls, self.served))

    async def _complete(self, request: web.Request, req: RequestState) -> tuple[str, str]:
        """Run one prompt to its end: (text, finish_reason)."""
        answer = AnswerText(self.coord.tokenizer, req.params["stop"])
        async with contextlib.aclosing(self.coord.generate(req)) as tokens:  # leaving it ends the attempt at once
            async for _ in tokens:
                new_text(req, answer)
                if answer.stopped:
                    self.coord.answered(req, "stop")
                    break
                if request.transport is None or request.transport.is_closing():
                    # aiohttp does not cancel a handler whose client left: stop generating for nobody
                    self.coord.client_gone(req)
                    break
            else:  # its engines finished it: the text held back is settled now
                answer.add(req.output, final=True)
        return answer.text, finish_reason(req, answer.stopped)

    async def _pieces(self, req: RequestState, call_parser: ToolCallParser | None
                      ) -> AsyncIterator[tuple[str, list[ToolCall], list[int], str | None]]:
        """(text, tool calls, token ids, finish_reason) as a stream gives them out: one per token,
        less what may still turn out to be a stop string or a tool call; then a last one with what
        was held back and the finish reason."""
        answer = AnswerText(self.coord.tokenizer, req.params["stop"])
        rest = ""  # text held back until the engines finished: it goes with the finish reason
        async with contextlib.aclosing(self.coord.generate(req)) as tokens:  # leaving it ends the attempt at once
            async for tok in tokens:
                text, calls = new_text(req, answer), []
                if call_parser:
                    text, calls = call_parser.add(text)
                yield text, calls, [tok], None
                if answer.stopped:
                    self.coord.answered(req, "stop")
                    break
            else:
                rest = answer.add(req.output, final=True)
        finish, calls = finish_reason(req, answer.stopped), []
        if call_parser:
            rest, calls = call_parser.add(rest, final=True)
            finish = "tool_calls" if call_parser.calls else finish
        yield rest, calls, [], finish

    async def _stream(self, request: web.Request, req: RequestState, chat: bool,
                      call_parser: ToolCallParser | None = None) -> web.StreamResponse:
        """Server-sent events of a completion or chat completion (replies.StreamChunks)."""
        chunks = StreamChunks(req.request_id, self.served.model, chat, req.params["include_usage"])

        async def send(resp: web.StreamResponse) -> None:
            async with contextlib.aclosing(self._pieces(req, call_parser)) as pieces:
                async for text, calls, tokens, finish in pieces:
                    if finish is None:
                        await resp.write(chunks.event([chunks.piece(text, tokens, None, calls)]))
                        continue
                    last = chunks.piece(text or (None if chat else ""), tokens, finish, calls)
                    await resp.write(chunks.event([last], dualpath=dualpath_info(req, self.served.block_bytes)))
            if req.params["include_usage"]:
                await resp.write(chunks.event([], usage=usage([req], self.served.block_tokens)))
            await resp.write(StreamChunks.DONE)

        return await self._events(request, req, send)

    async def _events(self, request: web.Request, req: RequestState,
                      send: Callable[[web.StreamResponse], Awaitable[None]],
                      error: Callable[[int, str], bytes] = StreamChunks.error) -> web.StreamResponse:
        """A server-sent-event response that `send` writes. A client that hangs up is no failure of
        ours. A failure before the first event is a real HTTP status (clients retry a 503); after
        it, it can only be told as an event (its status is sent)."""
        resp = EventStream(request)
        try:
            await send(resp)
        except (ConnectionResetError, asyncio.CancelledError) as e:  # a write failed, or aiohttp cancelled us
            self.coord.client_gone(req)
            if isinstance(e, asyncio.CancelledError):
                raise  # a cancelled task ends cancelled
        except RequestFailed as e:
            self.coord.stats["failed"] += 1
            self.coord.metrics.failed(e.status)
            if not resp.prepared:
                return error_response(e.status, str(e))
            with contextlib.suppress(ConnectionResetError):  # the client may have gone meanwhile
                await resp.write(error(e.status, str(e)))
        return resp

    # ------------------------------------------------------------------ the Responses API

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """/v1/responses (responses.py): a chat completion underneath, answered as output items."""
        body = await json_body(request)
        chat_request, messages = to_chat(body, self.conversations)
        chat = parse_chat(chat_request, self.limits, self.coord.tokenizer, self.coord.chat)
        prompts, params, policy = chat.completion
        req = self.coord.new_request(new_id("resp"), prompts[0], params, policy)
        call_parser = chat.call_parser()
        if params["stream"]:
            return await self._stream_response(request, req, body, messages, call_parser)
        text, finish = await self._complete(request, req)
        content, calls = call_parser.add(text, final=True) if call_parser else (text, [])
        finish = "tool_calls" if calls else finish
        self.conversations.keep(req.request_id, messages + answer_messages(content, calls))
        created = int(time.time())
        return web.json_response(response_body(req.request_id, body, self.served.model, output_items(content, calls),
                                               finish, response_usage(usage([req], self.served.block_tokens)),
                                               created))

    async def _stream_response(self, request: web.Request, req: RequestState, body: dict, messages: list[dict],
                               call_parser: ToolCallParser | None) -> web.StreamResponse:
        events = ResponseEvents(req.request_id, body, self.served.model)

        async def send(resp: web.StreamResponse) -> None:
            await resp.write(events.start())
            content = []
            async with contextlib.aclosing(self._pieces(req, call_parser)) as pieces:
                async for text, calls, _, finish in pieces:
                    content.append(text)
                    await resp.write(events.text(text) + events.calls(calls))
            calls = call_parser.calls if call_parser else []
            self.conversations.keep(req.request_id, messages + answer_messages("".join(content), calls))
            await resp.write(events.finish(finish, response_usage(usage([req], self.served.block_tokens))))

        return await self._events(request, req, send, events.error)

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.served.model, "object": "model",
                                                               "created": self.started, "owned_by": "dualpath",
                                                               "max_context": self.coord.max_context}]})

    # ------------------------------------------------------------------ the cluster

    async def metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=self.coord.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def health(self, _: web.Request) -> web.Response:
        live = self.coord.live_engines()
        roles = {e.role for e in live}
        ok = {"prefill", "decode"} <= roles
        return web.json_response({"ok": ok, "engines": sorted(e.name for e in live)}, status=200 if ok else 503)

    async def cluster(self, _: web.Request) -> web.Response:
        coord = self.coord
        return web.json_response({"stats": coord.stats, "waiting_for_room": len(coord.waiting),
                                  "engines": {e.name: {"role": e.role, "node": e.node,
                                                       **(asdict(e.report) if e.report else {})}
                                              for e in coord.live_engines()}})
