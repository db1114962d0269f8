"""Whisper on CTranslate2 (faster-whisper): the default backend, int8 on CPU, fp16 on CUDA.

Tuned for one short utterance at a time: greedy decoding (``beam_size=1``), a single temperature
(a fallback retry would double the latency of exactly the turns that are already slow), no
timestamps, no conditioning on previous text (each utterance stands alone).

Whisper pads every input to a 30 s window, and on a CPU the encoder's cost follows that window,
not the speech: a 2 s question paid for 30 s (~600 ms here instead of ~100 ms). CTranslate2's
encoder accepts a shorter window, so an utterance is encoded padded only to
``audio + PAD_S`` (at least ``MIN_WINDOW_S``), and decoded with faster-whisper's own tokenizer
and confidence arithmetic. Utterances longer than the window go through ``transcribe`` as usual.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import structlog

from engines.asr import models
from engines.asr.base import (
    SAMPLE_RATE,
    AsrResult,
    AsrSegment,
    Cancel,
    EngineSpec,
    ModelUnavailable,
    max_new_tokens,
    never,
    stop_if,
)

WINDOW_S = 30.0  # Whisper's full input window
PAD_S = 1.0  # silence appended after the speech before encoding
MIN_WINDOW_S = 5.0  # shorter windows than this lose accuracy on one-word answers
FRAMES_PER_S = 100  # mel frames per second (hop of 160 samples at 16 kHz)
HOP = SAMPLE_RATE // FRAMES_PER_S
DECODER_REPLICAS = 2  # decodes that may run at once: the live one and an abandoned one
ZERO_TAIL = 800  # > a frame's half window (200) + the extractor's own padding (160) + a hop


def cpu_threads() -> int:
    """Threads for CTranslate2 on CPU: the cores this process may use (its default is 4)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


class FasterWhisperEngine:
    """A loaded faster-whisper model."""

    def __init__(self, spec: EngineSpec) -> None:
        try:
            import ctranslate2
            from faster_whisper import WhisperModel
        except ImportError as exc:
            raise ModelUnavailable(f"faster-whisper is not installed ({exc}): "
                                   f"pip install faster-whisper") from None
        # faster-whisper logs every call at INFO through stdlib logging: noise in an actor's log.
        logging.getLogger("faster_whisper").setLevel(logging.WARNING)
        path = models.ct2_model(spec.model, Path(spec.cache_dir))
        device = spec.device
        if device == "auto":
            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        compute_type = "float16" if device == "cuda" else "int8"
        try:
            self._model = WhisperModel(path, device=device, compute_type=compute_type,
                                       cpu_threads=spec.threads or cpu_threads())
        except Exception as exc:  # hub errors, bad files, CUDA errors: all say the same to a user
            where = path if Path(path).is_dir() else f"the Hugging Face hub id {path!r}"
            raise ModelUnavailable(
                f"cannot load faster-whisper model from {where} on {device}: {exc}. Use a bundled "
                f"model ({', '.join(models.BUNDLED)}) or a local CTranslate2 folder") from None
        # Decoding steps are tiny (one token through a few layers): on a CPU a second thread
        # costs more in hand-offs than it computes (tiny.en: 3.3 against 4.4 ms a token here),
        # while the encoder's one big pass gains from it. So decoding runs on its own
        # one-thread copy of the model; the encoder's output is handed across. That copy has
        # two replicas: a decode that was given up on (a partial the turn's end replaced) runs
        # out on one while the next recognition, its encoder done, decodes on the other.
        # The encoder has one: a second call queues behind the first, then that one stops.
        self._decoder = self._model.model
        if device == "cpu" and (spec.threads or cpu_threads()) > 1 and Path(path).is_dir():
            self._decoder = ctranslate2.models.Whisper(
                path, device="cpu", compute_type=compute_type, intra_threads=1,
                inter_threads=DECODER_REPLICAS)
        self.device = device
        self.name = f"faster-whisper:{spec.model}"
        self._language = spec.language or None
        self.multilingual = bool(self._model.model.is_multilingual)
        if not self.multilingual and self._language not in (None, "en"):
            structlog.get_logger().warning("asr_english_only_model", model=spec.model,
                                           language=self._language)

    def transcribe(self, audio: np.ndarray, cancelled: Cancel = never) -> AsrResult:
        audio_s = len(audio) / SAMPLE_RATE
        if audio_s + PAD_S < WINDOW_S and (self._language or not self.multilingual):
            return self._transcribe_short(audio, cancelled)
        stop_if(cancelled)
        segments, info = self._model.transcribe(
            audio,
            language=self._language if self.multilingual else "en",
            beam_size=1,
            best_of=1,
            temperature=0.0,
            condition_on_previous_text=False,
            without_timestamps=True,
            max_new_tokens=max_new_tokens(audio_s),
            vad_filter=False,  # the guard has run the VAD already
        )
        out = [AsrSegment(text=s.text, avg_logprob=s.avg_logprob, no_speech_prob=s.no_speech_prob,
                          compression_ratio=s.compression_ratio)
               for s in segments]  # a lazy generator: decoding happens here
        return AsrResult(segments=out, language=info.language or "")

    def _transcribe_short(self, audio: np.ndarray, cancelled: Cancel = never) -> AsrResult:
        """One greedy decode over a window just longer than ``audio`` (see the module doc).

        Decoding keeps Whisper's timestamp tokens: in a window with room to spare Whisper tends
        to start the utterance over again, and the timestamps show it (a segment that starts
        after the audio ends), so such segments are cut.
        """
        import ctranslate2
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_compression_ratio, get_suppressed_tokens

        model = self._model
        audio_s = len(audio) / SAMPLE_RATE
        window_s = min(WINDOW_S, max(MIN_WINDOW_S, math.ceil(audio_s + PAD_S)))
        features = log_mel(model.feature_extractor, audio, window_s)
        stop_if(cancelled)
        encoded = model.model.encode(
            ctranslate2.StorageView.from_array(features[np.newaxis].astype(np.float32)))
        stop_if(cancelled)  # the decoder, most of the time, is spared
        language = (self._language if self.multilingual else None) or "en"
        tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual,
                              task="transcribe", language=language)
        prompt = list(tokenizer.sot_sequence)
        result = self._decoder.generate(
            encoded, [prompt], beam_size=1, max_length=len(prompt) + max_new_tokens(audio_s) + 8,
            return_scores=True, return_no_speech_prob=True, suppress_blank=True,
            suppress_tokens=get_suppressed_tokens(tokenizer, [-1]))[0]
        tokens = result.sequences_ids[0]
        text = " ".join(_segments_within(tokens, tokenizer, audio_s)).strip()
        avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
        segment = AsrSegment(text=text, avg_logprob=avg_logprob,
                             no_speech_prob=result.no_speech_prob,
                             compression_ratio=get_compression_ratio(text) if text else 1.0)
        return AsrResult(segments=[segment] if text else [], language=language)


def log_mel(extractor: object, audio: np.ndarray, window_s: float) -> np.ndarray:
    """Whisper's features of ``audio`` padded with silence to ``window_s``, computed over the
    audio only: every frame past it sees zeros alone, so its value is the floor that the frames
    just after the audio already have, and is copied rather than computed (a 1.5 s question in
    its 5 s window: 1 ms instead of 6). Equal to the features of the whole padded window but
    for float rounding (1e-7)."""
    frames = int(window_s * FRAMES_PER_S)
    samples = int(window_s * SAMPLE_RATE)
    # the frames that touch the audio, then enough zeros that the last ones computed touch none
    span = min(samples, -(-(len(audio) + ZERO_TAIL) // HOP) * HOP)
    padded = np.zeros(span, dtype=np.float32)
    padded[: len(audio)] = audio
    computed = extractor(padded)  # type: ignore[operator]
    features = np.empty((computed.shape[0], frames), dtype=np.float32)
    count = min(frames, computed.shape[1])
    features[:, :count] = computed[:, :count]
    features[:, count:] = computed[:, -1:]
    return features


def _segments_within(tokens: list[int], tokenizer: object, audio_s: float) -> list[str]:
    """Texts of the timestamped segments that start inside the audio, repeats dropped."""
    begin: int = tokenizer.timestamp_begin  # type: ignore[attr-defined]
    texts: list[str] = []
    current: list[int] = []
    start = 0.0
    for token in [*tokens, begin]:  # a final timestamp closes an unterminated segment
        if token < begin:
            current.append(token)
            continue
        if current:
            text = _without_repeats(tokenizer.decode(current).strip())  # type: ignore[attr-defined]
            if start >= audio_s - 0.1 or any(_begins(earlier, text) for earlier in texts):
                break  # Whisper started over (in the padding, or cut off by the end)
            if text:
                texts.append(text)
            current = []
        start = (token - begin) * 0.02
    return texts


def _without_repeats(text: str) -> str:
    """``Yes. Yes. Yes.`` -> ``Yes.``: a sentence said again and again is Whisper looping, as is
    a group of sentences said twice over (``Hello? Can you hear me? Hello? Can you hear me?
    Hello?``); and ``What do bees make? What do bees`` -> ``What do bees make?``: a last
    sentence that only begins the one before is Whisper starting over, cut off by the end of
    the audio."""
    sentences = re.findall(r"[^.!?]+[.!?]*\s*", text)
    kept = _first_round([s for i, s in enumerate(sentences)
                         if i == 0 or _words(s) != _words(sentences[i - 1])])
    if len(kept) > 1 and _begins(kept[-2], kept[-1]):
        kept.pop()
    return "".join(kept).strip()


def _first_round(sentences: list[str]) -> list[str]:
    """The first round of a group of sentences that comes again whole at least once (the last
    round may be cut off anywhere), or ``sentences`` as they are."""
    words = [_words(s) for s in sentences]
    last = len(words) - 1
    for size in range(2, len(words) // 2 + 1):
        if (all(words[i] == words[i % size] for i in range(size, last))
                and words[last % size][:len(words[last])] == words[last]):
            return sentences[:size]
    return sentences


def _words(sentence: str) -> list[str]:
    return re.findall(r"[\w']+", sentence.lower())


def _begins(text: str, part: str) -> bool:
    """Whether ``part`` says again the beginning of ``text`` (or all of it)."""
    words, start = _words(text), _words(part)
    return bool(start) and words[:len(start)] == start
