"""The picture that goes with an utterance: the latest camera (or screen) frame as a JPEG.

Frames arrive ~20 times a second; only the newest is kept (a reference, no copy). Encoding
(YUV420 -> RGB through libswscale in ``VideoFrame.to_image``, then Pillow's JPEG encoder) takes
several milliseconds, so callers run :func:`encode_jpeg` on a worker thread.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import av

JPEG_QUALITY = 80


@dataclass(frozen=True, slots=True)
class Snapshot:
    jpeg: bytes
    width: int
    height: int


def encode_jpeg(frame: av.VideoFrame, quality: int = JPEG_QUALITY) -> Snapshot:
    """JPEG of ``frame`` at its own resolution (any pixel format PyAV can convert to RGB)."""
    image = frame.to_image()
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return Snapshot(out.getvalue(), image.width, image.height)


class LatestFrame:
    """Holds the newest video frame of a call."""

    def __init__(self) -> None:
        self.frame: av.VideoFrame | None = None
        self.count = 0

    def update(self, frame: av.VideoFrame) -> None:
        self.frame = frame
        self.count += 1
