"""Whisper on CTranslate2 (faster-whisper): the default backend, int8 on CPU, fp16 on CUDA.

Tuned for one short utterance at a time: greedy decoding (``beam_size=1``), a single temperature
(a fallback retry would double the latency of exactly the turns that are already slow), no
timestamps, no conditioning on previous text (each utterance stands alone).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import structlog

from engines.asr import models
from engines.asr.base import (
    SAMPLE_RATE,
    AsrResult,
    AsrSegment,
    EngineSpec,
    ModelUnavailable,
    max_new_tokens,
)


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
                                       cpu_threads=cpu_threads())
        except Exception as exc:  # hub errors, bad files, CUDA errors: all say the same to a user
            where = path if Path(path).is_dir() else f"the Hugging Face hub id {path!r}"
            raise ModelUnavailable(
                f"cannot load faster-whisper model from {where} on {device}: {exc}. Use a bundled "
                f"model ({', '.join(models.BUNDLED)}) or a local CTranslate2 folder") from None
        self.device = device
        self.name = f"faster-whisper:{spec.model}"
        self._language = spec.language or None
        self.multilingual = bool(self._model.model.is_multilingual)
        if not self.multilingual and self._language not in (None, "en"):
            structlog.get_logger().warning("asr_english_only_model", model=spec.model,
                                           language=self._language)

    def transcribe(self, audio: np.ndarray) -> AsrResult:
        audio_s = len(audio) / SAMPLE_RATE
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
