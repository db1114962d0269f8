"""OpenAI TTS (``tts-1``, ``gpt-4o-mini-tts``) or any endpoint speaking its ``/audio/speech`` API.

The reply is requested as Ogg Opus and demuxed while it downloads; its Opus packets pass through
untouched (no decode, no re-encode), each timed by its own TOC byte. A stream cut short keeps the
packets that arrived whole and drops the rest, with a log line.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import time
from typing import Any

import structlog

from engines.tts.base import (
    BackendSpec,
    BackendUnavailable,
    Emit,
    Packet,
    SynthesisError,
    TtsBackend,
)
from engines.tts.normalize import pieces
from engines.tts.ogg import OggOpusDemuxer
from engines.tts.opus_toc import packet_samples

DEFAULT_VOICE = "alloy"
MAX_INPUT_CHARS = 4096  # the API's limit per request
OPENAI_URL = "https://api.openai.com/v1"


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Errors the HTTP layer raises mid-body (the SDK's own types cover the request itself)."""
    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError, AttributeError):
            errors += [importlib.import_module(module).HTTPError,
                       importlib.import_module(module).StreamError]
    return tuple(errors)


def requests_for(text: str, limit: int = MAX_INPUT_CHARS) -> list[str]:
    """``text`` in as few requests as the input limit allows, cut between sentences."""
    out: list[str] = []
    for piece in pieces(text, first_chars=limit, max_chars=limit):
        if out and len(out[-1]) + 1 + len(piece) <= limit:
            out[-1] += " " + piece
        else:
            out.append(piece)
    return out


class OpenAIBackend(TtsBackend):
    """Streams ``response_format="opus"`` and passes the packets through."""

    name = "openai"
    concurrency = 3  # overlapping requests hide the service's first-byte latency

    def __init__(self, spec: BackendSpec) -> None:
        self.spec = spec
        self.voice = spec.voice or DEFAULT_VOICE
        self.speed = max(0.25, min(spec.speed, 4.0))
        self.log = structlog.get_logger()
        self._client: Any = None
        self._stream_errors = _transport_errors()

    async def prepare(self) -> None:
        try:
            import openai
        except ImportError:
            raise BackendUnavailable("the openai package is not installed: pip install openai") \
                from None
        base_url = self.spec.base_url or OPENAI_URL
        api_key = self.spec.api_key
        if not api_key:
            if base_url == OPENAI_URL:
                raise BackendUnavailable(
                    "the OpenAI TTS backend needs an API key: set OPENAI_API_KEY "
                    "(or --tts-base-url for a local OpenAI-compatible server)")
            api_key = "not-needed"  # local servers ignore it, the SDK insists on one
        self._openai = openai
        for name in ("httpx", "httpx2"):  # one INFO line per request otherwise; we log our own
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.root.level))
        self._client = openai.AsyncOpenAI(api_key=api_key, base_url=base_url,
                                          timeout=self.spec.timeout, max_retries=1)
        self.log.info("tts_backend_ready", backend=self.name, base_url=base_url,
                      model=self.spec.model, voice=self.voice, speed=self.speed)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def synthesize(self, text: str, emit: Emit) -> None:
        for request in requests_for(text):
            await self._speak(request, emit)

    async def _speak(self, text: str, emit: Emit) -> None:
        demuxer = OggOpusDemuxer()
        started = time.perf_counter()
        received = 0
        packets = 0
        try:
            async with self._client.audio.speech.with_streaming_response.create(
                    model=self.spec.model, voice=self.voice, input=text,
                    response_format="opus", speed=self.speed) as response:
                async for chunk in response.iter_bytes():
                    received += len(chunk)
                    for data in demuxer.feed(chunk):
                        packet = self._packet(data)
                        if packet is not None:
                            packets += 1
                            await emit(packet)
        except self._openai.APIError as exc:
            if not packets:
                raise SynthesisError(f"speech request failed: {_reason(exc)}") from None
            self.log.warning("tts_stream_cut", error=_reason(exc), packets=packets)
        except self._stream_errors as exc:
            self.log.warning("tts_stream_cut", error=repr(exc), packets=packets, bytes=received)
        finally:
            dropped = demuxer.close()
            if dropped:
                self.log.warning("tts_stream_truncated", dropped_bytes=dropped, packets=packets,
                                 partial_packets=demuxer.stats.dropped_partial)
        if demuxer.stats.bad_pages:
            self.log.warning("tts_ogg_bad_pages", pages=demuxer.stats.bad_pages)
        self.log.debug("tts_request_done", packets=packets, bytes=received,
                       ms=round((time.perf_counter() - started) * 1000))

    def _packet(self, data: bytes) -> Packet | None:
        try:
            return Packet(data, packet_samples(data))
        except ValueError as exc:
            self.log.warning("tts_bad_opus_packet", error=str(exc), size=len(data))
            return None


def _reason(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    message = getattr(exc, "message", None) or str(exc)
    return f"{status} {message}" if status else message
