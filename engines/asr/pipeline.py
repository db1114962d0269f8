"""From an utterance's raw PCM to a transcript or a reason to stay silent.

Everything here blocks (VAD, resampling, Whisper): the actor runs :meth:`Recognizer.recognise`
in a worker thread, one live recognition at a time (one given up on may still be finishing its
stage in the other). :func:`check_pcm` is the cheap validation done on the event loop before
any work is queued.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from engines.asr import guard
from engines.asr.base import SAMPLE_RATE, AsrEngine, Cancel, Cancelled, never, stop_if
from engines.asr.speech_probs import SpeechProbabilities

MIN_RATE = 8_000  # telephone audio; anything lower carries no intelligible speech
MAX_RATE = 192_000


def check_pcm(pcm: bytes, rate: int) -> str:
    """Why s16le mono ``pcm`` at ``rate`` cannot be used (``""`` when it can)."""
    if not MIN_RATE <= rate <= MAX_RATE:
        return "bad_sample_rate"
    if not pcm:
        return "empty"
    if len(pcm) % 2:
        return "odd_length"
    return ""


def to_float(pcm: bytes, rate: int) -> np.ndarray:
    """s16le mono PCM as float32 at :data:`SAMPLE_RATE`."""
    audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    if rate != SAMPLE_RATE:
        import soxr

        audio = soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32, copy=False)
    return audio


@dataclass(frozen=True, slots=True)
class Recognition:
    """The outcome for one utterance: ``text`` when accepted, else ``reason``."""

    text: str
    language: str
    audio_s: float
    speech_s: float
    reason: str = ""  # silence | too_short | no_speech | hallucination | ...
    vad_ms: float = 0.0
    asr_ms: float = 0.0  # Whisper alone (0 when it did not run)


class Recognizer:
    """An engine behind the noise guard."""

    def __init__(self, engine: AsrEngine, min_speech_s: float = 0.3) -> None:
        self.engine = engine
        self.min_speech_s = min_speech_s

    def recognise(self, pcm: bytes, rate: int = SAMPLE_RATE, cancelled: Cancel = never,
                  probs: SpeechProbabilities | None = None) -> Recognition:
        """The words of ``pcm``; ``cancelled()`` is asked between the stages (VAD, Whisper's
        encoder, its decoder): when true, the rest is skipped and the reason is ``cancelled``.
        ``probs``: the VAD's memory of the turn this audio belongs to (see
        :mod:`engines.asr.speech_probs`)."""
        audio = to_float(pcm, rate)
        audio_s = audio.size / SAMPLE_RATE
        started = time.perf_counter()
        speech = guard.find_speech(audio, probs=probs)
        vad_ms = (time.perf_counter() - started) * 1000
        if speech.seconds == 0.0:
            return Recognition("", "", audio_s, 0.0, vad_ms=vad_ms,
                               reason="silence" if speech.silent else "no_speech")
        if speech.seconds < self.min_speech_s:
            return Recognition("", "", audio_s, speech.seconds, reason="too_short", vad_ms=vad_ms)
        started = time.perf_counter()
        try:
            stop_if(cancelled)
            result = self.engine.transcribe(audio[speech.start:speech.end], cancelled)
        except Cancelled:
            return Recognition("", "", audio_s, speech.seconds, reason="cancelled", vad_ms=vad_ms,
                               asr_ms=(time.perf_counter() - started) * 1000)
        asr_ms = (time.perf_counter() - started) * 1000
        text, reason = guard.accept(result.segments)
        return Recognition(text, result.language, audio_s, speech.seconds, reason=reason,
                           vad_ms=vad_ms, asr_ms=asr_ms)

    def warm_up(self) -> None:
        """One short inference of each model, so that the first real turn pays no first-call cost."""
        rng = np.random.default_rng(0)
        noise = (rng.standard_normal(SAMPLE_RATE) * 0.01).astype(np.float32)
        guard.find_speech(noise)
        self.engine.transcribe(noise)
