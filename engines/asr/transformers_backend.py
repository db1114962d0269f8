"""Whisper on Hugging Face transformers: any Whisper id or folder, fp16 on CUDA.

This is the reference design's path and the one to use on a GPU with large models (e.g.
``openai/whisper-large-v3-turbo``). The encoder runs once; the greedy decode and one decoder step
from the start token (for Whisper's no-speech probability) both reuse its output, so the guard
gets the same evidence as from faster-whisper. Audio over 30 s goes through transformers'
sequential long-form decoding, which applies the same thresholds itself.
"""

from __future__ import annotations

import threading
import zlib

import numpy as np

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
from engines.asr.guard import LOGPROB_FLOOR, NO_SPEECH_PROB

WINDOW_S = 30.0  # Whisper's input window


def compression_ratio(text: str) -> float:
    data = text.encode()
    return len(data) / len(zlib.compress(data)) if data else 1.0


class TransformersEngine:
    """A loaded ``WhisperForConditionalGeneration`` with its processor."""

    def __init__(self, spec: EngineSpec) -> None:
        try:
            import torch
            from transformers import WhisperForConditionalGeneration, WhisperProcessor
            from transformers.utils import logging as hf_logging
        except ImportError as exc:
            raise ModelUnavailable(f"the transformers backend needs torch and transformers "
                                   f"({exc}): pip install torch transformers") from None
        # Whisper's generate warns on every call about flags it sets itself: noise in an actor's log.
        hf_logging.set_verbosity_error()
        source = models.hf_model(spec.model)
        device = spec.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        try:
            self._processor = WhisperProcessor.from_pretrained(source)
            model = WhisperForConditionalGeneration.from_pretrained(source, dtype=dtype)
            self._model = model.to(device).eval()
        except Exception as exc:  # OSError offline, ValueError on a wrong folder, CUDA errors
            raise ModelUnavailable(
                f"cannot load Hugging Face Whisper {source!r} on {device}: {exc}. Pass a local "
                f"folder, or fetch it first (huggingface-cli download {source}) where the hub is "
                f"reachable; the bundled models need no download with --asr-backend "
                f"faster-whisper") from None
        self._torch = torch
        self._dtype = dtype
        # one call at a time: a call given up on finishes before the next starts (transformers
        # does not promise that two generations on one model may overlap)
        self._lock = threading.Lock()
        self.device = device
        self.name = f"transformers:{spec.model}"
        gen = self._model.generation_config
        self.multilingual = bool(getattr(gen, "is_multilingual", False))
        self._language = spec.language if self.multilingual and spec.language else None
        self._start_token = int(gen.decoder_start_token_id)
        # Whisper's <|nospeech|> (<|nocaptions|>) sits just before <|notimestamps|>.
        self._no_speech_token = int(gen.no_timestamps_token_id) - 1

    def _generate_kwargs(self, audio_s: float) -> dict[str, object]:
        kwargs: dict[str, object] = {"max_new_tokens": max_new_tokens(audio_s, limit=400),
                                     "num_beams": 1, "do_sample": False}
        if self.multilingual:
            kwargs["task"] = "transcribe"
            if self._language:
                kwargs["language"] = self._language
        return kwargs

    def transcribe(self, audio: np.ndarray, cancelled: Cancel = never) -> AsrResult:
        with self._lock, self._torch.inference_mode():
            if audio.size / SAMPLE_RATE > WINDOW_S:
                stop_if(cancelled)
                return self._long_form(audio)
            return self._short_form(audio, cancelled)

    def _short_form(self, audio: np.ndarray, cancelled: Cancel = never) -> AsrResult:
        torch = self._torch
        features = self._processor.feature_extractor(
            audio, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        features = features.to(self.device, self._dtype)
        stop_if(cancelled)
        encoded = self._model.get_encoder()(features)
        stop_if(cancelled)
        start = torch.tensor([[self._start_token]], device=self.device)
        first = self._model(encoder_outputs=encoded, decoder_input_ids=start).logits[0, -1]
        no_speech = float(first.float().softmax(-1)[self._no_speech_token])
        out = self._model.generate(encoder_outputs=encoded, return_dict_in_generate=True,
                                   output_scores=True,
                                   **self._generate_kwargs(audio.size / SAMPLE_RATE))
        sequence = out.sequences[0]
        scores = self._model.compute_transition_scores(out.sequences, out.scores,
                                                       normalize_logits=True)[0]
        generated = sequence[-len(scores):] if len(scores) else sequence[:0]
        special = set(self._processor.tokenizer.all_special_ids)
        text_tokens = [i for i, token in enumerate(generated.tolist()) if token not in special]
        logprob = float(scores[text_tokens].float().mean()) if text_tokens else 0.0
        text = self._processor.batch_decode(sequence[None], skip_special_tokens=True)[0]
        segment = AsrSegment(text=text, avg_logprob=logprob, no_speech_prob=no_speech,
                             compression_ratio=compression_ratio(text))
        return AsrResult(segments=[segment], language=self._language or "")

    def _long_form(self, audio: np.ndarray) -> AsrResult:
        inputs = self._processor.feature_extractor(
            audio, sampling_rate=SAMPLE_RATE, return_tensors="pt", truncation=False,
            padding="longest", return_attention_mask=True)
        tokens = self._model.generate(
            inputs.input_features.to(self.device, self._dtype),
            attention_mask=inputs.attention_mask.to(self.device),
            condition_on_prev_tokens=False, temperature=0.0,
            logprob_threshold=LOGPROB_FLOOR, no_speech_threshold=NO_SPEECH_PROB,
            **self._generate_kwargs(WINDOW_S))
        text = self._processor.batch_decode(tokens, skip_special_tokens=True)[0]
        return AsrResult(segments=[AsrSegment(text=text, compression_ratio=1.0)],
                         language=self._language or "")
