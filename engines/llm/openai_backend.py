"""Any OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp server, Ollama), streamed.

The picture of the turn goes in the last user message as a base64 JPEG ``image_url`` part.
Retries are ours, not the SDK's (which would honour a long ``Retry-After`` on a live call): a rate
limit, a server error or a refused connection is retried ``retries`` times with a short back-off,
and only before the first token, since a reply half spoken cannot be restarted. Every failure
becomes an :class:`LLMError` whose text says what to fix.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import openai
import structlog

from engines.llm.base import BackendSpec, ChatMessage, LLMError, Pause

DEFAULT_MODEL = "gpt-4o-mini"
BACKOFF_S = (0.25, 1.0, 2.0)  # before the 1st, 2nd, 3rd retry
NO_KEY = "no-key"  # local servers need none, the SDK wants one
_IMAGE_WORDS = ("image", "vision", "multimodal", "multi-modal", "content type", "image_url")


class OpenAIBackend:
    """Streaming chat completions through the official ``openai`` SDK."""

    def __init__(self, spec: BackendSpec) -> None:
        self.spec = spec
        self.model = spec.model or DEFAULT_MODEL
        self.name = f"openai:{self.model}"
        self.can_see = True
        self.endpoint = spec.base_url or "https://api.openai.com/v1"
        self._token_param = "max_tokens"
        self._log = structlog.get_logger().bind(backend=self.name)
        self._client = openai.AsyncOpenAI(
            base_url=spec.base_url or None, api_key=spec.api_key or NO_KEY,
            timeout=openai.Timeout(spec.timeout, connect=min(spec.timeout, 5.0)), max_retries=0)

    async def load(self) -> None:
        """Nothing to load: the endpoint is only reached with the first turn."""

    async def warm(self, system: str = "") -> None:
        """Nothing to warm: a request now would cost money and prove little."""

    def prepare(self, session: str, messages: list[ChatMessage], words: str = "",
                complete: bool = False) -> None:
        """Nothing to prepare: the endpoint sees the chat with the request."""

    def forget(self, session: str) -> None:
        """Nothing is kept per session: every request carries its whole chat."""

    async def aclose(self) -> None:
        await self._client.close()

    async def stream(self, messages: list[ChatMessage], image: bytes | None = None,
                     session: str | None = None,
                     pause: Pause | None = None) -> AsyncIterator[str]:  # remote: not paused
        attempt = 0
        while True:
            produced = False
            try:
                chat = self._request_messages(messages, image if self.can_see else None)
                response = await self._client.chat.completions.create(
                    model=self.model, messages=chat, stream=True,
                    **{self._token_param: self.spec.max_tokens})
                async with response:
                    async for chunk in response:
                        if not chunk.choices:
                            continue
                        delta = chunk.choices[0].delta.content
                        if delta:
                            produced = True
                            yield delta
                return
            except openai.BadRequestError as exc:
                if not produced and self._adapt(exc, image):
                    continue
                raise self._error(exc) from exc
            except openai.APIError as exc:
                if produced or attempt >= self.spec.retries or not _retryable(exc):
                    raise self._error(exc) from exc
                self._log.warning("llm_retry", attempt=attempt + 1, error=_short(exc))
                await asyncio.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
                attempt += 1

    def _request_messages(self, messages: list[ChatMessage], image: bytes | None,
                          ) -> list[dict[str, Any]]:
        chat: list[dict[str, Any]] = [dict(m) for m in messages]
        if image and chat and chat[-1]["role"] == "user":
            url = "data:image/jpeg;base64," + base64.b64encode(image).decode("ascii")
            chat[-1] = {"role": "user", "content": [
                {"type": "text", "text": chat[-1]["content"]},
                {"type": "image_url", "image_url": {"url": url, "detail": self.spec.image_detail}},
            ]}
        return chat

    def _adapt(self, exc: openai.BadRequestError, image: bytes | None) -> bool:
        """Learn from a refusal that names what the endpoint lacks; True when worth a retry."""
        message = _short(exc).lower()
        if self._token_param == "max_tokens" and "max_tokens" in message:
            self._token_param = "max_completion_tokens"  # newer OpenAI models
            self._log.info("llm_token_param", param=self._token_param)
            return True
        if image and self.can_see and any(word in message for word in _IMAGE_WORDS):
            self.can_see = False
            self._log.warning("llm_images_refused", model=self.model, error=_short(exc),
                              note="pictures are no longer sent to this model")
            return True
        return False

    def _error(self, exc: openai.APIError) -> LLMError:
        where = self.endpoint
        detail = _short(exc)
        if isinstance(exc, openai.APITimeoutError):
            return LLMError("timeout",
                            f"The language model at {where} did not answer within "
                            f"{self.spec.timeout:g} s.",
                            "Sorry, my language model is taking too long to answer.")
        if isinstance(exc, openai.APIConnectionError):
            reason = _connection_reason(exc) or detail
            return LLMError("connection",
                            f"Cannot connect to the language model at {where}: {reason}. "
                            "Is the server running and --llm-base-url right?",
                            "Sorry, I cannot reach my language model right now.")
        if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
            return LLMError("auth",
                            f"The language model at {where} refused the API key "
                            f"({exc.status_code}): check OPENAI_API_KEY. {detail}",
                            "Sorry, my language model refused my API key.")
        if isinstance(exc, openai.RateLimitError):
            quota = _code(exc) == "insufficient_quota"
            return LLMError("rate_limit",
                            f"The language model at {where} is "
                            f"{'out of quota' if quota else 'rate limiting us'} (429): {detail}",
                            "Sorry, my language model is busy. Please try again in a moment.")
        if isinstance(exc, openai.NotFoundError):
            return LLMError("not_found",
                            f"The language model at {where} has no model {self.model!r} or "
                            f"no chat endpoint (404): {detail}",
                            "Sorry, my language model is not available.")
        if isinstance(exc, openai.APIStatusError) and exc.status_code >= 500:
            return LLMError("server",
                            f"The language model at {where} failed ({exc.status_code}): {detail}",
                            "Sorry, my language model had a problem. Please try again.")
        if isinstance(exc, openai.APIStatusError):
            return LLMError("bad_request",
                            f"The language model at {where} rejected the request "
                            f"({exc.status_code}): {detail}")
        return LLMError("stream", f"The language model at {where} failed mid-reply: {detail}")


def _retryable(exc: openai.APIError) -> bool:
    if isinstance(exc, openai.APITimeoutError):
        return False  # the user already waited a full timeout
    if isinstance(exc, openai.APIConnectionError):
        return True
    if isinstance(exc, openai.RateLimitError):
        return _code(exc) != "insufficient_quota"
    return isinstance(exc, openai.APIStatusError) and exc.status_code >= 500


def _connection_reason(exc: BaseException) -> str:
    """The root cause of a failed connection, in a few words ("connection refused")."""
    seen: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in seen:
        seen.append(cause)
        cause = cause.__cause__ or cause.__context__
    text = " ".join(f"{type(c).__name__} {c}" for c in seen).lower()
    if "refused" in text:
        return "connection refused"
    if "name or service not known" in text or "nodename nor servname" in text:
        return "unknown host"
    root = seen[-1]
    return f"{type(root).__name__}: {root}" if root is not exc else ""


def _code(exc: openai.APIError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body)
    return str(error.get("code") or "") if isinstance(error, dict) else ""


def _short(exc: openai.APIError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body)
    message = error.get("message") if isinstance(error, dict) else None
    text = str(message or exc.message or type(exc).__name__)
    return text if len(text) <= 300 else text[:297] + "..."
