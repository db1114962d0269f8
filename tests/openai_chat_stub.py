"""A local stand-in for an OpenAI chat-completions endpoint, speaking its real wire protocol.

``POST /v1/chat/completions`` with ``"stream": true`` answers Server-Sent Events, one
``data: {chat.completion.chunk}`` per delta and ``data: [DONE]`` at the end, as OpenAI, vLLM and
llama.cpp do. Every request is recorded. What each request gets is scripted with :class:`Plan`:
a reply (optionally slow), an HTTP error with OpenAI's error body, or silence to make the client
time out. Runs inside the test's event loop: ``async with OpenAIChatStub() as stub``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
               404: "invalid_request_error", 429: "rate_limit_exceeded", 500: "server_error",
               503: "server_error"}


@dataclass
class Plan:
    """How to answer one request."""

    chunks: list[str] = field(default_factory=lambda: ["Hello", " there", "."])
    delay: float = 0.0  # seconds before each chunk
    status: int = 200  # an error status answers with OpenAI's error body instead
    message: str = ""  # the error message
    code: str | None = None  # the error code (e.g. "invalid_api_key", "insufficient_quota")
    hang: bool = False  # accept the request and never answer (the client times out)
    hang_after: int | None = None  # send this many chunks, then stall


@dataclass
class Record:
    """One request as received, and how its answer went."""

    body: dict[str, Any]
    headers: dict[str, str]
    at: float
    sent: int = 0  # chunks written
    aborted: bool = False  # the client went away before the answer was complete

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages", []))


class OpenAIChatStub:
    """The fake endpoint; ``base_url`` is what ``--llm-base-url`` should be."""

    def __init__(self, default: Plan | None = None) -> None:
        self.default = default or Plan()
        self.plans: deque[Plan] = deque()
        self.requests: list[Record] = []
        self.base_url = ""
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()

    def script(self, *plans: Plan) -> None:
        """Answer the next requests with ``plans``, in order (then with ``default``)."""
        self.plans.extend(plans)

    async def __aenter__(self) -> OpenAIChatStub:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> None:
        """Wait until ``predicate(self)`` holds (e.g. a request was aborted)."""
        async with asyncio.timeout(timeout):
            while not predicate(self):
                await asyncio.sleep(0.02)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        record = Record(body=body, headers=dict(request.headers), at=time.time())
        self.requests.append(record)
        plan = self.plans.popleft() if self.plans else self.default
        if plan.hang:
            await self._closing.wait()
            return web.Response(status=503)
        if plan.status != 200:
            error = {"message": plan.message or f"stub error {plan.status}",
                     "type": ERROR_TYPES.get(plan.status, "api_error"), "param": None,
                     "code": plan.code}
            return web.json_response({"error": error}, status=plan.status)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        ident = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        model = body.get("model", "stub")
        try:
            await self._send(response, _chunk(ident, model, {"role": "assistant", "content": ""}))
            for i, text in enumerate(plan.chunks):
                if plan.hang_after is not None and i >= plan.hang_after:
                    await self._closing.wait()
                    return response
                if plan.delay:
                    await asyncio.sleep(plan.delay)
                await self._send(response, _chunk(ident, model, {"content": text}))
                record.sent += 1
            await self._send(response, _chunk(ident, model, {}, finish="stop"))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:  # the client closed the stream
            record.aborted = True
        except asyncio.CancelledError:
            record.aborted = True
            raise
        return response

    @staticmethod
    async def _send(response: web.StreamResponse, chunk: dict[str, Any]) -> None:
        await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")


def _chunk(ident: str, model: str, delta: dict[str, Any], finish: str | None = None,
           ) -> dict[str, Any]:
    return {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model, "system_fingerprint": "fp_stub",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
