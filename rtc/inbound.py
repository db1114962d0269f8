"""The user's microphone: WebRTC audio frames -> 16 kHz mono float32, streaming.

Browsers send Opus that aiortc decodes to s16 packed stereo at 48 kHz, 960 samples per frame;
other layouts and formats are handled too. soxr resamples as a stream (its filter state carries
across frames, so there are no clicks at frame edges); it is recreated if the rate changes.
"""

from __future__ import annotations

import av
import numpy as np
import soxr

from bus.schema import PCM_RATE

_SCALE = {"s16": 32768.0, "s16p": 32768.0, "s32": 2147483648.0, "s32p": 2147483648.0}


def frame_to_mono(frame: av.AudioFrame) -> np.ndarray:
    """Downmix one audio frame to mono float32 in [-1, 1] at the frame's own rate."""
    data = frame.to_ndarray()
    channels = max(1, len(frame.layout.channels))
    # planar: one row per channel; packed: channels interleaved in one row
    planes = data.reshape(channels, -1) if frame.format.is_planar else data.reshape(-1, channels).T
    scale = _SCALE.get(frame.format.name, 1.0)  # float formats are already in [-1, 1]
    mono = planes.astype(np.float32).mean(axis=0)
    if scale != 1.0:
        mono /= scale
    return mono


class Resampler:
    """Stateful downmix + resample of a stream of frames to ``rate`` (16 kHz) mono."""

    def __init__(self, rate: int = PCM_RATE) -> None:
        self.rate = rate
        self._source_rate = 0
        self._stream: soxr.ResampleStream | None = None

    def __call__(self, frame: av.AudioFrame) -> np.ndarray:
        mono = frame_to_mono(frame)
        if frame.sample_rate == self.rate:
            return mono
        if self._stream is None or frame.sample_rate != self._source_rate:
            self._source_rate = frame.sample_rate
            self._stream = soxr.ResampleStream(frame.sample_rate, self.rate, 1, dtype="float32")
        return self._stream.resample_chunk(mono)
