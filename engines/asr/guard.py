"""Keeping non-speech out of the conversation: before Whisper runs, and after.

Before: digital silence is rejected by its peak level, then Silero VAD (the ONNX model shipped
inside faster-whisper) measures how much speech there is; under ``min_speech_s`` (0.3 s) the
utterance is dropped without running Whisper, and long silences around the speech are trimmed.
The VAD's probabilities of a turn's audio are kept from one of its recognitions to the next
(:mod:`engines.asr.speech_probs`), and the speech is found in them by Silero's own rule.
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
from engines.asr.speech_probs import CHUNK, SpeechProbabilities

SILENT_PEAK = 10 ** (-50 / 20)  # -50 dBFS: nothing a microphone picks up from a voice
MIN_SILENCE_MS = 100  # a shorter dip in the speech probability does not split the speech
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


def find_speech(audio: np.ndarray, pad_s: float = 0.3, threshold: float = 0.5,
                probs: SpeechProbabilities | None = None) -> Speech:
    """Seconds of speech in 16 kHz float ``audio`` and the span around it. ``probs``: the VAD's
    memory of this recording, when the same audio came before, shorter (its chunks are not
    computed again)."""
    if audio.size == 0 or float(np.max(np.abs(audio))) < SILENT_PEAK:
        return Speech(0.0, silent=True)
    spans = speech_spans((probs or SpeechProbabilities())(audio), audio.size, threshold)
    if not spans:
        return Speech(0.0)
    seconds = sum(end - start for start, end in spans) / SAMPLE_RATE
    pad = int(pad_s * SAMPLE_RATE)
    return Speech(seconds, start=max(0, spans[0][0] - pad), end=min(audio.size, spans[-1][1] + pad))


def speech_spans(probs: np.ndarray, length: int, threshold: float = 0.5,
                 min_silence_ms: int = MIN_SILENCE_MS) -> list[tuple[int, int]]:
    """Sample spans of speech from per-chunk probabilities, as Silero's own rule finds them
    (and faster-whisper's ``get_speech_timestamps`` with no padding and no minimum length):
    speech starts at a chunk of ``threshold`` or more and ends where the probability fell under
    ``threshold - 0.15``, once it has stayed under ``threshold`` for ``min_silence_ms``."""
    low = max(threshold - 0.15, 0.01)
    min_silence = SAMPLE_RATE * min_silence_ms / 1000
    spans: list[tuple[int, int]] = []
    start: int | None = None
    quiet_from = 0  # where the probability last fell under ``low`` (0: it has not)
    for i, p in enumerate(probs.tolist()):
        at = i * CHUNK
        if start is None:
            if p >= threshold:
                start, quiet_from = at, 0
            continue
        if p >= threshold:
            quiet_from = 0
        elif p < low:
            quiet_from = quiet_from or at
            if at - quiet_from >= min_silence:
                spans.append((start, quiet_from))  # quiet_from > start: set after the start
                start, quiet_from = None, 0
    if start is not None and length > start:
        spans.append((start, length))
    return spans


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
