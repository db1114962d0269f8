"""PCM at any rate in, 20 ms Opus packets at 48 kHz out, a piece at a time.

soxr's streaming resampler keeps its filter state between pieces, so a sentence synthesised in
several chunks resamples seamlessly; libopus (through PyAV) turns each 960-sample frame into a
packet at once. :meth:`OpusStreamEncoder.finish` drains both at the end of a sentence, so its
last syllable is not held back until the next sentence arrives.
"""

from __future__ import annotations

import fractions

import av
import numpy as np
import soxr

from engines.tts.base import FRAME_SAMPLES, OPUS_RATE, Packet
from engines.tts.opus_toc import packet_samples

BITRATE = 32_000  # mono speech: transparent enough, small packets
_TIME_BASE = fractions.Fraction(1, OPUS_RATE)


class OpusStreamEncoder:
    """One sentence's encoder: feed float32 mono PCM at ``source_rate``, then ``finish``."""

    def __init__(self, source_rate: int, *, bitrate: int = BITRATE) -> None:
        self._resampler = (soxr.ResampleStream(source_rate, OPUS_RATE, 1, dtype="float32")
                           if source_rate != OPUS_RATE else None)
        codec = av.CodecContext.create("libopus", "w")
        codec.sample_rate = OPUS_RATE
        codec.layout = "mono"
        codec.format = "flt"
        codec.bit_rate = bitrate
        codec.time_base = _TIME_BASE
        codec.options = {"application": "voip", "frame_duration": "20"}
        codec.open()
        self._codec = codec
        self._pending = np.zeros(0, dtype=np.float32)
        self._pts = 0

    def feed(self, pcm: np.ndarray) -> list[Packet]:
        """Encode ``pcm``; returns the packets now complete (the rest waits for more audio)."""
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if self._resampler is not None:
            pcm = self._resampler.resample_chunk(pcm)
        return self._encode_available(pcm)

    def finish(self) -> list[Packet]:
        """Flush the resampler and encoder (the last frame padded with silence)."""
        tail = np.zeros(0, dtype=np.float32)
        if self._resampler is not None:
            tail = self._resampler.resample_chunk(tail, last=True)
        packets = self._encode_available(tail)
        if len(self._pending):
            pad = np.zeros(FRAME_SAMPLES - len(self._pending), dtype=np.float32)
            packets += self._encode_frame(np.concatenate([self._pending, pad]))
            self._pending = np.zeros(0, dtype=np.float32)
        packets += self._packets(self._codec.encode(None))
        return packets

    def _encode_available(self, pcm: np.ndarray) -> list[Packet]:
        if len(self._pending):
            pcm = np.concatenate([self._pending, pcm])
        whole = len(pcm) - len(pcm) % FRAME_SAMPLES
        packets: list[Packet] = []
        for start in range(0, whole, FRAME_SAMPLES):
            packets += self._encode_frame(pcm[start:start + FRAME_SAMPLES])
        self._pending = pcm[whole:].copy()
        return packets

    def _encode_frame(self, samples: np.ndarray) -> list[Packet]:
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = OPUS_RATE
        frame.time_base = _TIME_BASE
        frame.pts = self._pts
        self._pts += FRAME_SAMPLES
        return self._packets(self._codec.encode(frame))

    @staticmethod
    def _packets(encoded: list[av.Packet]) -> list[Packet]:
        out = []
        for packet in encoded:
            data = bytes(packet)
            out.append(Packet(data, packet_samples(data)))
        return out
