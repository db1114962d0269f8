"""Duration of a raw Opus packet from its TOC byte (RFC 6716, section 3.1).

Packets are passed through without decoding, yet the media actor paces playback by duration, so
each packet's length at 48 kHz is read from its first byte (and, for code 3, its frame count).
"""

from __future__ import annotations

OPUS_RATE = 48_000
MAX_PACKET_SAMPLES = 5760  # 120 ms: the longest a packet may last

# Frame length at 48 kHz by configuration number (TOC bits 7..3).
_SILK = (480, 960, 1920, 2880)  # 10, 20, 40, 60 ms; configs 0-11, four per bandwidth
_HYBRID = (480, 960)  # 10, 20 ms; configs 12-15, two per bandwidth
_CELT = (120, 240, 480, 960)  # 2.5, 5, 10, 20 ms; configs 16-31, four per bandwidth


def frame_samples(toc: int) -> int:
    """Samples at 48 kHz of one frame of a packet whose TOC byte is ``toc``."""
    config = toc >> 3
    if config < 12:
        return _SILK[config % 4]
    if config < 16:
        return _HYBRID[config % 2]
    return _CELT[config % 4]


def frame_count(packet: bytes) -> int:
    """Number of frames in ``packet`` (TOC bits 1..0: one, two equal, two sized, or signalled)."""
    if not packet:
        raise ValueError("empty Opus packet")
    code = packet[0] & 0x03
    if code == 0:
        return 1
    if code in (1, 2):
        return 2
    if len(packet) < 2:
        raise ValueError("code 3 Opus packet without its frame count byte")
    count = packet[1] & 0x3F
    if count == 0:
        raise ValueError("code 3 Opus packet with zero frames")
    return count


def packet_samples(packet: bytes) -> int:
    """Duration of ``packet`` in samples at 48 kHz; ``ValueError`` if it cannot be a valid packet."""
    samples = frame_samples(packet[0] if packet else 0) * frame_count(packet)
    if samples > MAX_PACKET_SAMPLES:
        raise ValueError(f"Opus packet of {samples} samples exceeds 120 ms")
    return samples
