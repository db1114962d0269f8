"""The one interface every speech recognition backend implements, and what it returns.

A backend only turns 16 kHz float audio into Whisper segments with their confidence figures;
deciding what counts as speech (and what is a hallucination) is :mod:`engines.asr.guard`'s job,
so every backend is judged by the same rules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

SAMPLE_RATE = 16_000  # what every backend is fed


class ModelUnavailable(RuntimeError):
    """The chosen model cannot be found or loaded; the message says what to install or set."""


class Cancelled(Exception):
    """Recognition stopped between two of its stages: nobody waits for its words any more."""


Cancel = Callable[[], bool]  # asked between stages: True stops the recognition (Cancelled)


def never() -> bool:
    return False


def stop_if(cancelled: Cancel) -> None:
    """Between two stages of a recognition: raise :class:`Cancelled` when asked to stop."""
    if cancelled():
        raise Cancelled


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """Which model to load and how (from the ``asr`` config group)."""

    backend: str = "faster-whisper"  # faster-whisper | transformers
    model: str = "tiny.en"  # bundled name (tiny.en, base), local folder or Hugging Face id
    device: str = "auto"  # cpu | cuda | auto
    language: str = "en"  # empty: detect
    cache_dir: str = "cache"  # where the two-part bundled base model is joined
    threads: int = 0  # CPU threads (faster-whisper); 0: the cores available


@dataclass(frozen=True, slots=True)
class AsrSegment:
    """One decoded span with Whisper's own evidence of whether it is real speech."""

    text: str
    avg_logprob: float = 0.0  # mean token log-probability
    no_speech_prob: float = 0.0  # probability of the no-speech token at the start
    compression_ratio: float = 1.0  # zlib ratio of the text; high means a repetition loop


@dataclass(frozen=True, slots=True)
class AsrResult:
    """A backend's raw output for one utterance."""

    segments: list[AsrSegment] = field(default_factory=list)
    language: str = ""


class AsrEngine(Protocol):
    """A loaded model. ``transcribe`` blocks: call it from a worker thread. Callers make one
    call at a time, but a call they gave up on may still be finishing its stage when the next
    one starts: an engine lets the two overlap where its models can, and queues them where not.
    """

    name: str  # backend:model, for logs and the benchmark
    device: str  # the device actually used

    def transcribe(self, audio: np.ndarray, cancelled: Cancel = never) -> AsrResult:
        """Recognise mono float32 ``audio`` at :data:`SAMPLE_RATE`; raises :class:`Cancelled`
        when ``cancelled()`` turns true between two stages (the encoder and the decoder)."""
        ...


def max_new_tokens(audio_s: float, limit: int = 400) -> int:
    """A cap on decoded tokens for ``audio_s`` of speech, so a repetition loop ends early.

    People say about 3 words (4 tokens) a second; 10 tokens a second leaves ample room.
    """
    return max(16, min(limit, int(10 * min(audio_s, 30.0)) + 16))
