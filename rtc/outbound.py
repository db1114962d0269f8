"""The assistant's voice: a WebRTC audio track of raw Opus packets, paced at 20 ms in real time.

aiortc sends an ``av.Packet`` as it is (no re-encoding) but does not pace such a track: its sender
calls :meth:`OpusTrack.recv` again as soon as the previous packet is out. So ``recv`` waits for
each packet's slot on an *absolute* schedule ``t0 + samples_sent / 48000``: sleeping late once
does not shift every later packet (no cumulative drift). When the process was held up (a
stall of tens of milliseconds on a busy machine), the missed slots go out back to back as soon
as it runs again, so the browser sees one late packet and then the stream on time: re-anchoring
the schedule instead would make every later packet arrive late by the stall, and Chromium's
jitter buffer, which estimates the network's delay from packets' lateness over the last seconds,
would raise its target (hence the delay of the next reply) by as much. Only after a stall of more
than ``MAX_CATCH_UP_S`` (the process was stopped) is the schedule re-anchored.

When nothing is queued the track sends the 3-byte Opus silence frame, so the browser's playout
never starves. Packets of a turn older than the newest flushed one are dropped.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import av
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from bus.schema import OPUS_RATE, OPUS_SILENCE

TIME_BASE = Fraction(1, OPUS_RATE)
PACKET_SAMPLES = 960  # 20 ms at 48 kHz
OPUS_DURATIONS = frozenset({120, 240, 480, 960, 1920, 2880})  # 2.5 .. 60 ms
MAX_QUEUED = 3000  # one minute of 20 ms packets per session
STALL_S = PACKET_SAMPLES / OPUS_RATE  # a slot released later than this: the process stalled
MAX_CATCH_UP_S = 0.2  # behind by more than this: re-anchor the schedule instead of catching up


@dataclass(slots=True)
class Queued:
    turn: int
    packet: bytes
    samples: int
    final: bool


@dataclass(slots=True)
class Release:
    """One packet handed to aiortc: when it was due and when it went (event-loop clock)."""

    due: float
    at: float
    silence: bool


class OpusTrack(MediaStreamTrack):
    """Outbound audio of one call, fed with Opus packets by :meth:`push`.

    ``on_turn(event, turn)`` is called with ``"start"`` when the first packet of a turn is handed
    to aiortc and ``"done"`` when its final packet is; ``on_release`` (benchmarks) sees every
    packet's schedule. Both run on the event loop and must be quick.
    """

    kind = "audio"

    def __init__(self, on_turn: Callable[[str, int], None] | None = None,
                 on_release: Callable[[Release], None] | None = None) -> None:
        super().__init__()
        self._queue: collections.deque[Queued] = collections.deque()
        self._on_turn = on_turn
        self._on_release = on_release
        self._min_turn = 0  # packets of older turns are stale
        self._held: int | None = None  # a turn queued but not played yet (early end of speech)
        self._playing: int | None = None  # turn whose packets are going out
        self._t0: float | None = None
        self._sent_samples = 0  # schedule position since t0
        self._caught_up_to = 0.0  # slots due before this were part of a stall already counted
        self._pts = 0
        self.underruns = 0  # silence sent in the middle of a turn (the producer was too slow)
        self.caught_up = 0  # stalls of more than one packet time made up by sending at once
        self.forgiven = 0  # stalls too long to make up: the schedule was re-anchored
        self.max_late_ms = 0.0  # the longest stall seen
        self.dropped = 0  # packets refused: stale turn, full queue or bad size

    # -- producer side (bus handler)

    def push(self, turn: int, packet: bytes, samples: int = PACKET_SAMPLES,
             final: bool = False) -> bool:
        """Queue one packet; False when it is dropped (stale turn, empty, queue full)."""
        if turn < self._min_turn or not packet or len(self._queue) >= MAX_QUEUED:
            self.dropped += 1
            return False
        if samples not in OPUS_DURATIONS:
            samples = PACKET_SAMPLES
        self._queue.append(Queued(turn, packet, samples, final))
        return True

    def flush(self, turn: int) -> bool:
        """Drop every queued packet of turns before ``turn`` (barge-in); True if a turn was cut."""
        self._min_turn = max(self._min_turn, turn)
        before = len(self._queue)
        self._queue = collections.deque(q for q in self._queue if q.turn >= self._min_turn)
        cut = self._playing is not None and self._playing < self._min_turn
        if cut:
            self._playing = None
        return cut or len(self._queue) < before

    def hold(self, turn: int) -> None:
        """Queue ``turn``'s packets without playing them until :meth:`release`."""
        self._held = turn

    def release(self, turn: int) -> None:
        if self._held == turn:
            self._held = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def playing(self) -> int | None:
        return self._playing

    # -- consumer side (aiortc's RTP sender)

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._t0 is None:
            self._t0 = now
        due = self._t0 + self._sent_samples / OPUS_RATE
        if due > now:
            await asyncio.sleep(due - now)
            now = loop.time()
            if self.readyState != "live":
                raise MediaStreamError
        late = now - due
        if late > STALL_S:
            self.max_late_ms = max(self.max_late_ms, late * 1000)
            if late > MAX_CATCH_UP_S:
                self._t0 += late
                self.forgiven += 1
            elif due > self._caught_up_to:  # count a stall once, not each slot made up
                self.caught_up += 1
            self._caught_up_to = now
        item = self._next()
        data, samples = (item.packet, item.samples) if item else (OPUS_SILENCE, PACKET_SAMPLES)
        packet = av.Packet(data)
        packet.pts = self._pts
        packet.time_base = TIME_BASE
        self._pts += samples
        self._sent_samples += samples
        if self._on_release is not None:
            self._on_release(Release(due=due, at=now, silence=item is None))
        if item is not None:
            self._announce(item)
        return packet

    def _next(self) -> Queued | None:
        while self._queue:
            if self._queue[0].turn == self._held:
                return None  # its turn is not confirmed yet: keep it, send silence
            item = self._queue.popleft()
            if item.turn >= self._min_turn:
                return item
        if self._playing is not None:
            self.underruns += 1
        return None

    def _announce(self, item: Queued) -> None:
        if item.turn != self._playing:
            self._playing = item.turn
            if self._on_turn is not None:
                self._on_turn("start", item.turn)
        if item.final:
            self._playing = None
            if self._on_turn is not None:
                self._on_turn("done", item.turn)
