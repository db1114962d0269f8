"""A local stand-in for OpenAI's ``POST /v1/audio/speech``, streaming a real Ogg Opus file.

The paid API is the one part tests may replace: this server speaks its wire protocol (JSON request,
bearer key, chunked ``audio/ogg`` body) and sends real Ogg Opus made by PyAV (ogg muxer, libopus),
in small irregular chunks with small delays, as a network would deliver it. It can cut the body
short (cleanly ended or connection aborted) to test truncated streams.
"""

from __future__ import annotations

import asyncio
import fractions
import io
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import av
import numpy as np
from aiohttp import web

RATE = 48_000


def make_ogg_opus(pcm: np.ndarray, rate: int, *, bitrate: int = 32_000,
                  frame_ms: float = 20, page_s: float = 1.0) -> bytes:
    """Encode int16 mono ``pcm`` at ``rate`` as an Ogg Opus file with PyAV (libopus).

    Long pages (``page_s``) at a high bitrate fill a page's 255 segments, so packets span pages.
    """
    out = io.BytesIO()
    with av.open(out, "w", format="ogg",
                 options={"page_duration": str(int(page_s * 1_000_000))}) as container:
        stream = container.add_stream("libopus", rate=RATE, layout="mono")
        stream.bit_rate = bitrate
        stream.codec_context.options = {"frame_duration": f"{frame_ms:g}"}
        resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1).astype(np.int16), format="s16",
                                           layout="mono")
        frame.sample_rate = rate
        frame.time_base = fractions.Fraction(1, rate)
        frame.pts = 0
        for resampled in [*resampler.resample(frame), *resampler.resample(None)]:
            for packet in stream.encode(resampled):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


def ogg_packets(ogg: bytes) -> list[bytes]:
    """The Opus packets of an Ogg file, as PyAV's (ffmpeg's) demuxer sees them."""
    with av.open(io.BytesIO(ogg), format="ogg") as container:
        return [bytes(p) for p in container.demux(audio=0) if p.size]


def decoded_samples(packet: bytes) -> int:
    """Samples libopus decodes from ``packet`` alone (the reference for its duration)."""
    decoder = av.CodecContext.create("libopus", "r")
    decoder.sample_rate = RATE
    decoder.layout = "mono"
    return sum(frame.samples for frame in decoder.decode(av.Packet(packet)))


@dataclass
class SpeechStub:
    """``async with SpeechStub(pick) as stub``: ``pick(request_json)`` chooses the file to send."""

    pick: Callable[[dict], bytes]
    seed: int = 7
    max_chunk: int = 600
    max_delay_s: float = 0.004
    truncate_at: int | None = None  # send only this many bytes of the file
    abort: bool = False  # after truncating, drop the connection instead of ending the body
    slow_first_s: float = 0.0  # extra delay before the body of requests whose input has "slow"
    fail_status: int | None = None  # answer every request with this HTTP error instead
    requests: list[dict] = field(default_factory=list)
    auth: list[str] = field(default_factory=list)

    async def __aenter__(self) -> SpeechStub:
        app = web.Application()
        app.router.add_post("/v1/audio/speech", self._speech)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _speech(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.auth.append(request.headers.get("Authorization", ""))
        missing = {"model", "voice", "input"} - body.keys()
        if missing or body.get("response_format") != "opus":
            return web.json_response(
                {"error": {"message": f"bad request: missing {sorted(missing)} or not opus",
                           "type": "invalid_request_error"}}, status=400)
        if self.fail_status is not None:
            return web.json_response(
                {"error": {"message": "rejected by the test", "type": "invalid_request_error"}},
                status=self.fail_status)
        data = self.pick(body)
        if self.truncate_at is not None:
            data = data[:self.truncate_at]
        rng = random.Random(f"{self.seed}/{body['input']}")
        response = web.StreamResponse(headers={"Content-Type": "audio/ogg"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        if "slow" in body["input"]:
            await asyncio.sleep(self.slow_first_s)
        pos = 0
        while pos < len(data):
            size = rng.randint(1, self.max_chunk)
            await response.write(data[pos:pos + size])
            pos += size
            await asyncio.sleep(rng.uniform(0, self.max_delay_s))
        if self.abort and request.transport is not None:
            request.transport.abort()  # a dropped connection: the chunked body never ends
            return response
        await response.write_eof()
        return response
