"""Keeping non-speech out of the conversation: before Whisper runs, and after.

Before: digital silence is rejected by its peak level, then Silero VAD (the ONNX model shipped
inside faster-whisper) measures how much speech there is; under ``min_speech_s`` (0.3 s) the
utterance is dropped without running Whisper, and long silences around the speech are trimmed.
After: Whisper's own evidence decides. A segment is dropped when Whisper thought there was no
speech and was unsure of its text (its standard rule: ``no_speech_prob > 0.6`` and
``avg_logprob < -1``), when it looped (``compression_ratio > 2.4``), or when the model was very
unsure of it. The phrases Whisper likes to invent on noise ("Thank you.", "you") need less doubt
to be dropped, but a confident "thank you" from a user still goes through.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from engines.asr.base import SAMPLE_RATE, AsrSegment

SILENT_PEAK = 10 ** (-50 / 20)  # -50 dBFS: nothing a microphone picks up from a voice
NO_SPEECH_PROB = 0.6
LOGPROB_FLOOR = -1.0
VERY_UNSURE_LOGPROB = -1.5
COMPRESSION_RATIO = 2.4
# Whisper's favourite inventions on silence and noise (training data full of video captions).
TYPICAL_HALLUCINATIONS = frozenset({
    "you", "thank you", "thanks", "thank you very much", "thanks for watching",
    "thank you for watching", "thanks for listening", "bye", "bye bye", "okay", "so", "oh",
    "please subscribe", "subscribe", "i'm sorry", "hmm", "uh", "um",
})
HALLUCINATION_NO_SPEECH = 0.2
HALLUCINATION_LOGPROB = -0.6
_ANNOTATION = re.compile(r"\[[^\]]*\]|\([^)]*\)|\*[^*]*\*|[♪♫♬]")
_WORDS = re.compile(r"[^\w']+")


@dataclass(frozen=True, slots=True)
class Speech:
    """What the VAD found: seconds of speech and the span worth transcribing."""

    seconds: float
    start: int = 0  # sample offsets of the span, silence padding included
    end: int = 0
    silent: bool = False  # below :data:`SILENT_PEAK`: the VAD did not even run


def find_speech(audio: np.ndarray, pad_s: float = 0.3, threshold: float = 0.5) -> Speech:
    """Seconds of speech in 16 kHz float ``audio`` and the span around it."""
    if audio.size == 0 or float(np.max(np.abs(audio))) < SILENT_PEAK:
        return Speech(0.0, silent=True)
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    spans = get_speech_timestamps(
        audio, VadOptions(threshold=threshold, min_speech_duration_ms=0,
                          min_silence_duration_ms=100, speech_pad_ms=0))
    if not spans:
        return Speech(0.0)
    seconds = sum(s["end"] - s["start"] for s in spans) / SAMPLE_RATE
    pad = int(pad_s * SAMPLE_RATE)
    return Speech(seconds, start=max(0, spans[0]["start"] - pad),
                  end=min(audio.size, spans[-1]["end"] + pad))


def clean_text(text: str) -> str:
    """The text without captions' sound annotations ("[Music]", "(laughs)", "♪") and extra spaces."""
    return " ".join(_ANNOTATION.sub(" ", text).split())


def words(text: str) -> str:
    """Lower-case words only, for comparing against known phrases."""
    return " ".join(_WORDS.sub(" ", text.lower()).split())


def drop_reason(segment: AsrSegment) -> str:
    """Why ``segment`` is not real speech, or ``""`` to keep it."""
    text = clean_text(segment.text)
    if not any(ch.isalnum() for ch in text):
        return "empty"
    if segment.no_speech_prob > NO_SPEECH_PROB and segment.avg_logprob < LOGPROB_FLOOR:
        return "no_speech"
    if segment.compression_ratio > COMPRESSION_RATIO:
        return "repetition"
    if segment.avg_logprob < VERY_UNSURE_LOGPROB:
        return "unsure"
    if words(text) in TYPICAL_HALLUCINATIONS and (
            segment.no_speech_prob > HALLUCINATION_NO_SPEECH
            or segment.avg_logprob < HALLUCINATION_LOGPROB):
        return "hallucination"
    return ""


def accept(segments: list[AsrSegment]) -> tuple[str, str]:
    """The transcript made of the kept segments, and the reason when nothing is kept."""
    kept: list[str] = []
    reasons: list[str] = []
    for segment in segments:
        reason = drop_reason(segment)
        if reason:
            reasons.append(reason)
        else:
            kept.append(clean_text(segment.text))
    if kept:
        return " ".join(kept), ""
    return "", reasons[0] if reasons else "empty"
