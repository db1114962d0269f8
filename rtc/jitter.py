"""An inbound audio jitter buffer that holds nothing back: each Opus packet is decoded on arrival.

aiortc's :class:`~aiortc.jitterbuffer.JitterBuffer` knows a frame is complete only when a packet
of the next frame arrives, and for audio it then waits for four more (80 ms). An Opus packet is
a whole frame by itself, so here a packet is handed on the moment it arrives, in order: the VAD
hears the end of a turn (and the start of a barge-in) one packet sooner than with even a
one-packet wait. A packet older than one already handed on (reordered or duplicated on the way)
is dropped: the decoder never goes back in time, and the gap is 20 ms of audio the VAD can do
without. Audio is played by the browser, not here, so there is nothing to smooth.
"""

from __future__ import annotations

from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket
from aiortc.utils import uint16_add

HALF_RANGE = 0x8000  # sequence numbers this far ahead (mod 2**16) are behind


class AudioJitterBuffer(JitterBuffer):
    """What aiortc's receiver calls (``add``), for one audio stream."""

    def __init__(self) -> None:
        super().__init__(capacity=1)
        self.late = 0  # packets dropped for arriving after a newer one

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        """(no picture loss to report, the packet's frame or None when it is late)."""
        if self._origin is not None and uint16_add(packet.sequence_number,
                                                   -self._origin) >= HALF_RANGE:
            self.late += 1
            return False, None
        self._origin = uint16_add(packet.sequence_number, 1)  # the next one expected
        data = getattr(packet, "_data", packet.payload)  # depayloaded by the receiver
        return False, JitterFrame(data=data, timestamp=packet.timestamp)
