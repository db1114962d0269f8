"""The one interface every speech synthesis backend implements, and what it produces.

A backend turns text into raw Opus packets timed at 48 kHz, handing each one over as soon as it
exists so that the first audio of a long sentence leaves before the sentence is finished.
Ordering sentences, numbering packets and stopping on a barge-in are the actor's job.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import ClassVar

OPUS_RATE = 48_000
FRAME_SAMPLES = 960  # 20 ms at 48 kHz


class BackendUnavailable(RuntimeError):
    """The backend cannot start (missing voice, missing key); the message says what to fix."""


class SynthesisError(RuntimeError):
    """One text could not be spoken (a rejected request); the backend itself still works."""


@dataclass(frozen=True, slots=True)
class Packet:
    """One raw Opus packet and its duration in samples at 48 kHz (read from its TOC byte)."""

    data: bytes
    samples: int = FRAME_SAMPLES


Emit = Callable[[Packet], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """What to load, from the ``tts`` config group (and the endpoint settings of ``llm``)."""

    backend: str = "piper"  # piper | openai
    voice: str = ""  # Piper .onnx path or OpenAI voice name; empty: the default
    model: str = "gpt-4o-mini-tts"  # OpenAI model
    speed: float = 1.0
    base_url: str = ""  # OpenAI-compatible endpoint; empty: api.openai.com
    api_key: str = field(default="", repr=False)
    timeout: float = 30.0
    threads: int = 0  # CPU threads of a local voice; 0: the runtime's default
    chunk_decoder: bool = True  # Piper: decode a span's audio a few frames at a time


class TtsBackend(abc.ABC):
    """A loaded synthesiser. ``synthesize`` may be called for several sentences at once."""

    name: ClassVar[str]
    # Sentences worth synthesising at the same time: 1 for a local model that fills the CPU,
    # more for a remote service, whose latency overlapping requests hide.
    concurrency: ClassVar[int] = 1

    async def prepare(self) -> None:
        """Load and warm up, so the first real sentence is fast."""

    @abc.abstractmethod
    async def synthesize(self, text: str, emit: Emit) -> None:
        """Speak ``text`` (already normalised), awaiting ``emit`` for each packet in order.

        Returns when the text is spoken. Cancelling stops the work at once. Raises
        :class:`SynthesisError` when the text cannot be spoken at all.
        """

    async def aclose(self) -> None:
        """Release connections and threads."""
