"""One call's microphone chain: resample -> VAD -> endpointing, run off the event loop.

Silero costs up to ~1 ms per 32 ms chunk on a busy 2-core machine, too much to run on the event
loop that also paces every call's outbound audio, so the media actor calls :meth:`Listener.process`
through a worker thread, one call at a time per session (onnxruntime and soxr release the GIL).
Talk presses and mode switches arrive from the event loop through :meth:`Listener.command`, a
thread-safe queue applied in order before the next audio, so the chain's state has one owner.
"""

from __future__ import annotations

import collections

import av
import numpy as np

from rtc.inbound import Resampler
from rtc.vad import CHUNK, EndpointConfig, Endpointer, Event, SileroVad


class Listener:
    """Turns microphone frames into :class:`~rtc.vad.Onset` / :class:`~rtc.vad.End` events."""

    def __init__(self, vad: SileroVad, config: EndpointConfig, mode: str = "vad") -> None:
        self._resample = Resampler(config.rate)
        self._vad = vad.stream()
        self._endpointer = Endpointer(config, mode)
        self._carry = np.zeros(0, dtype=np.float32)
        self._heard_until = 0.0  # wall clock up to which audio (or assumed silence) was fed
        self._commands: collections.deque[tuple[str, str, float]] = collections.deque()

    @property
    def mode(self) -> str:
        return self._endpointer.mode

    def command(self, kind: str, now: float, mode: str = "") -> None:
        """Queue ``talk_start``, ``talk_stop`` or ``mode``; safe to call from any thread."""
        self._commands.append((kind, mode, now))

    def process(self, frame: av.AudioFrame | None, now: float) -> list[Event]:
        """Apply queued commands, then one frame received at wall-clock ``now`` (None: no audio)."""
        events: list[Event] = []
        while self._commands:
            kind, mode, at = self._commands.popleft()
            if kind == "talk_start":
                events += self._endpointer.talk_start(at)
            elif kind == "talk_stop":
                events += self._endpointer.talk_stop(at)
            elif kind == "mode" and mode != self._endpointer.mode:
                events += self._endpointer.set_mode(mode, at)
                self._vad.reset()
        if frame is None:
            return events + self._endpointer.tick(now) + self._missing_audio(now)
        self._heard_until = now
        audio = self._resample(frame)
        if self._carry.size:
            audio = np.concatenate([self._carry, audio])
        whole = len(audio) - len(audio) % CHUNK
        for start in range(0, whole, CHUNK):  # both modes: push-to-talk listens for pauses too
            chunk = audio[start:start + CHUNK]
            events += self._endpointer.feed(chunk, self._vad(chunk), now)
        self._carry = audio[whole:].copy()
        return events

    def _missing_audio(self, now: float) -> list[Event]:
        """No frames arrive (a browser sending nothing during silence, DTX, a stalled network):
        in hands-free mode the time passes as silence, so a turn in progress still ends."""
        if self._endpointer.mode != "vad" or not self._endpointer.active or not self._heard_until:
            self._heard_until = now
            return []
        step = CHUNK / self._endpointer.config.rate
        events: list[Event] = []
        silence = np.zeros(CHUNK, dtype=np.float32)
        while now - self._heard_until >= step:
            self._heard_until += step
            events += self._endpointer.feed(silence, 0.0, self._heard_until)
        return events
