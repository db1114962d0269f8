"""The media actor with a real WebRTC peer: a Python aiortc client on 127.0.0.1 plays the browser.

Real processes: a broker and ``python -m actors.media``. The test sends the offer on the bus the
way signaling would, speaks Piper speech into the call through a paced 48 kHz microphone track,
sends a 320x240 camera, and listens to what the media actor plays back.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
import uuid
from collections.abc import AsyncIterator, Callable
from fractions import Fraction

import aioice.ice
import av
import numpy as np
import pytest
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCSessionDescription,
    VideoStreamTrack,
)
from aiortc.rtp import RtpPacket
from PIL import Image

from bus.client import BusClient, Endpoints
from bus.schema import (
    CONTROL,
    FRAME,
    METRICS,
    UTTERANCE,
    Control,
    ControlKind,
    Frame,
    Message,
    Metric,
    OpusPacket,
    Utterance,
)
from rtc.jitter import AudioJitterBuffer
from rtc.outbound import MAX_CATCH_UP_S, OPUS_SILENCE, OpusTrack, Release
from rtc.peer import (
    create_peer,
    keep_loopback_candidates,
    parse_ice_servers,
    shorten_audio_jitter,
)
from rtc.vad import CHUNK, End, EndpointConfig, Endpointer, Onset, Partial
from tests import harness
from tests.speech import opus_packets, say

RATE = 48_000
PTIME = 960  # samples per 20 ms frame
CAMERA = (320, 240)
SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."
AUDIBLE_RMS = 300.0  # int16 RMS above which a received 20 ms frame is sound, not silence


@pytest.fixture(autouse=True)
def loopback_ice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our peer offers only 127.0.0.1 (aioice leaves loopback out; see shared/BROWSER.md)."""
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


# ----------------------------------------------------------------------------- the fake browser


class Microphone(MediaStreamTrack):
    """48 kHz mono s16 frames of whatever was queued with :meth:`speak`, else silence, in real time."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._pending = np.zeros(0, dtype=np.int16)
        self._start: float | None = None
        self._samples = 0
        self.loop_audio: np.ndarray | None = None  # repeated while set (push-to-talk test)

    def speak(self, pcm: np.ndarray) -> None:
        self._pending = np.concatenate([self._pending, pcm])

    def hush(self) -> None:
        self.loop_audio = None
        self._pending = np.zeros(0, dtype=np.int16)

    async def recv(self) -> av.AudioFrame:
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self._samples / RATE - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        if len(self._pending) < PTIME and self.loop_audio is not None:
            self.speak(self.loop_audio)
        chunk = np.zeros(PTIME, dtype=np.int16)
        take = self._pending[:PTIME]
        chunk[:len(take)] = take
        self._pending = self._pending[PTIME:]
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self._samples
        frame.time_base = Fraction(1, RATE)
        self._samples += PTIME
        return frame


class Camera(VideoStreamTrack):
    """A 320x240 test picture."""

    def __init__(self) -> None:
        super().__init__()
        w, h = CAMERA
        x = np.linspace(0, 255, w, dtype=np.uint8)
        self._rgb = np.stack([np.tile(x, (h, 1)), np.full((h, w), 128, np.uint8),
                              np.tile(x[::-1], (h, 1))], axis=2)

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame.from_ndarray(self._rgb, format="rgb24").reformat(format="yuv420p")
        frame.pts = pts
        frame.time_base = time_base
        return frame


class BrowserPeer:
    """An aiortc peer with a microphone and a camera that records what it hears."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.mic = Microphone()
        self.pc.addTrack(self.mic)
        self.pc.addTrack(Camera())
        self.heard: list[tuple[float, float]] = []  # (monotonic arrival, int16 RMS) per frame

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def accept(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

    async def listen(self) -> None:
        track = next(t.receiver.track for t in self.pc.getTransceivers() if t.kind == "audio")
        with contextlib.suppress(Exception):
            while True:
                frame = await track.recv()
                pcm = frame.to_ndarray().astype(np.float32)
                self.heard.append((time.monotonic(), float(np.sqrt(np.mean(pcm * pcm)))))

    def audible_since(self, since: float) -> list[float]:
        return [t for t, rms in self.heard if t >= since and rms > AUDIBLE_RMS]


class BusLog:
    """Every message of the test's bus client, kept, so a test can wait for any of them."""

    def __init__(self, bus: BusClient) -> None:
        self.bus = bus
        self.messages: list[Message] = []
        self._new = asyncio.Event()

    async def run(self) -> None:
        while True:
            self.messages.append(await self.bus.recv())
            self._new.set()

    async def wait(self, predicate: Callable[[Message], bool], timeout: float = 15.0,
                   after: int = 0) -> Message:
        """The first matching message from index ``after`` on, waiting for it if need be."""
        seen = after
        async with asyncio.timeout(timeout):
            while True:
                for msg in self.messages[seen:]:
                    if predicate(msg):
                        return msg
                seen = len(self.messages)
                self._new.clear()
                await self._new.wait()

    def find(self, predicate: Callable[[Message], bool]) -> list[Message]:
        return [m for m in self.messages if predicate(m)]


def control(session: str, kind: str, **fields: object) -> Callable[[Message], bool]:
    def match(m: Message) -> bool:
        return (isinstance(m, Control) and m.session == session and m.kind == kind
                and all(getattr(m, k) == v for k, v in fields.items()))
    return match


def of(cls: type[Message], session: str, **fields: object) -> Callable[[Message], bool]:
    return lambda m: (isinstance(m, cls) and m.session == session
                      and all(getattr(m, k) == v for k, v in fields.items()))


class Call:
    def __init__(self, bus: BusClient, log: BusLog, peer: BrowserPeer, session: str) -> None:
        self.bus, self.log, self.peer, self.session = bus, log, peer, session


@contextlib.asynccontextmanager
async def call(endpoints: Endpoints, mode: str = "vad", session: str | None = None,
               log: BusLog | None = None, video: str = "camera") -> AsyncIterator[Call]:
    """Offer over the bus like signaling does, apply the answer, wait for ``connected``.

    Without ``log`` the call has its own bus client; with one, the caller keeps it running.
    """
    session = session or f"s-{uuid.uuid4().hex[:8]}"
    async with contextlib.AsyncExitStack() as stack:
        tasks: list[asyncio.Task[None]] = []
        tg = await stack.enter_async_context(asyncio.TaskGroup())
        if log is None:
            bus = await stack.enter_async_context(
                harness.client(endpoints, [CONTROL, UTTERANCE, FRAME, METRICS]))
            log = BusLog(bus)
            tasks.append(tg.create_task(log.run()))
        bus = log.bus
        peer = BrowserPeer()
        stack.push_async_callback(peer.pc.close)
        try:
            mark = len(log.messages)  # a log shared with an earlier call holds its answer
            bus.publish(Control(session=session, kind=ControlKind.OFFER, sdp=await peer.offer(),
                                sdp_type="offer", mode=mode, text=video))
            answer = await log.wait(control(session, ControlKind.ANSWER), after=mark)
            assert answer.sdp_type == "answer" and "a=candidate:" in answer.sdp
            await peer.accept(answer.sdp)
            tasks.append(tg.create_task(peer.listen()))
            await log.wait(control(session, ControlKind.STATE, state="connected"), after=mark)
            yield Call(bus, log, peer, session)
        finally:
            for task in tasks:
                task.cancel()


# ----------------------------------------------------------------------------- audio helpers


def spoken_seconds(pcm: np.ndarray, rate: int) -> float:
    """Length of the part of ``pcm`` that is not near-silence."""
    loud = np.nonzero(np.abs(pcm.astype(np.int32)) > 300)[0]
    return (loud[-1] - loud[0]) / rate


def tone(seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (np.sin(2 * np.pi * hz * t) * 8000).astype(np.int16)


def publish_packets(bus: BusClient, session: str, turn: int, packets: list[bytes]) -> None:
    for i, packet in enumerate(packets):
        bus.publish(OpusPacket(session=session, turn=turn, packet=packet, index=i,
                               final=i == len(packets) - 1))


def segments(heard: list[tuple[float, float]]) -> list[tuple[int, int]]:
    """Runs of audible frames as (first index, length)."""
    runs: list[tuple[int, int]] = []
    for i, (_, rms) in enumerate(heard):
        if rms > AUDIBLE_RMS:
            if runs and runs[-1][0] + runs[-1][1] == i:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((i, 1))
    return runs


# ----------------------------------------------------------------------------- tests


async def test_hands_free_utterance_and_frame(broker, actors):
    await actors.start("media")
    speech = say(SENTENCE, RATE)
    async with call(broker, "vad", video="screen") as c:
        await c.log.wait(control(c.session, ControlKind.STATE, state="listening"))
        c.peer.mic.speak(np.concatenate([np.zeros(RATE // 2, np.int16), speech]))
        onset = await c.log.wait(control(c.session, ControlKind.INTERRUPT))
        utterance = await c.log.wait(of(Utterance, c.session, partial=False), timeout=20)
        frame = await c.log.wait(of(Frame, c.session))
        metric = await c.log.wait(of(Metric, c.session, stage="speech_end"))
        # the utterance leaves at an early end of speech; "listening" follows once confirmed
        speaking = c.log.messages.index(
            await c.log.wait(control(c.session, ControlKind.STATE, state="user_speaking")))
        await c.log.wait(control(c.session, ControlKind.STATE, state="listening"), after=speaking)
    assert onset.turn == 1 and utterance.turn == 1 and frame.turn == 1 and metric.turn == 1
    assert utterance.reason == "vad" and utterance.sample_rate == 16_000
    spoken = spoken_seconds(speech, RATE)
    assert abs(utterance.duration - spoken) <= 0.2 * spoken, (utterance.duration, spoken)
    pcm = np.frombuffer(utterance.pcm, dtype="<i2").astype(np.float32)
    assert np.sqrt(np.mean(pcm * pcm)) > 300  # speech, not silence
    assert utterance.ts >= utterance.speech_end > onset.ts - 5
    assert metric.at == utterance.speech_end
    # the pause it ended in went out first, holding all of the utterance's speech
    pause = [m for m in c.log.find(of(Utterance, c.session, partial=True)) if m.pause][-1]
    assert 0 < utterance.voiced_bytes <= len(pause.pcm) <= len(utterance.pcm)
    assert pause.pcm[:utterance.voiced_bytes] == utterance.pcm[:utterance.voiced_bytes]
    image = Image.open(io.BytesIO(frame.jpeg))
    assert image.format == "JPEG" and image.size == CAMERA == (frame.width, frame.height)
    assert frame.kind == "screen"  # as the offer said
    red, green, blue = image.convert("RGB").getpixel((300, 120))  # YUV -> RGB done right
    assert red > 200 and 100 < green < 160 and blue < 50, (red, green, blue)
    states = [m.state for m in c.log.find(control(c.session, ControlKind.STATE))]
    assert "listening" in states[states.index("user_speaking") + 1:], states


async def test_push_to_talk_utterance_lasts_as_long_as_the_press_then_mode_switch(broker, actors):
    await actors.start("media")
    speech = say(SENTENCE, RATE)
    async with call(broker, "ptt") as c:
        c.peer.mic.loop_audio = speech  # talking all the time
        await asyncio.sleep(1.5)
        assert not c.log.find(of(Utterance, c.session))  # speech alone starts nothing in ptt
        assert not c.log.find(control(c.session, ControlKind.INTERRUPT))
        pressed = time.monotonic()
        c.bus.publish(Control(session=c.session, kind=ControlKind.TALK_START))
        await c.log.wait(control(c.session, ControlKind.INTERRUPT, turn=1))
        await asyncio.sleep(2.5 - (time.monotonic() - pressed))
        c.bus.publish(Control(session=c.session, kind=ControlKind.TALK_STOP))
        held = time.monotonic() - pressed
        await asyncio.sleep(1.0)
        # The pauses between the repeats may each have been answered early (and voided by the
        # speech after them); the turn's own utterance is the last, and holds the whole press.
        utterance = max(c.log.find(of(Utterance, c.session, partial=False)), key=lambda u: u.turn)
        frame = await c.log.wait(of(Frame, c.session, turn=utterance.turn))
        assert utterance.reason == "ptt"
        assert abs(utterance.duration - held) <= 0.2 * held, (utterance.duration, held)
        assert (frame.width, frame.height) == CAMERA
        # hands-free from now on: speech alone makes the next turn
        c.peer.mic.hush()
        await asyncio.sleep(0.5)
        c.bus.publish(Control(session=c.session, kind=ControlKind.MODE, mode="vad"))
        await asyncio.sleep(0.3)
        c.peer.mic.speak(speech)
        second = await c.log.wait(of(Utterance, c.session, turn=utterance.turn + 1, partial=False),
                                 timeout=20)
    assert second.reason == "vad"


async def test_packets_are_heard_with_silence_between(broker, actors):
    await actors.start("media")
    packets = opus_packets(tone(1.0))
    async with call(broker) as c:
        await asyncio.sleep(0.5)
        publish_packets(c.bus, c.session, 0, packets)
        await c.log.wait(control(c.session, ControlKind.STATE, state="assistant_done", turn=0))
        await asyncio.sleep(0.8)
        publish_packets(c.bus, c.session, 1, packets)
        await c.log.wait(control(c.session, ControlKind.STATE, state="assistant_done", turn=1))
        await asyncio.sleep(0.5)
        heard = list(c.peer.heard)
    runs = segments(heard)
    assert len(runs) == 2, runs
    (first, n1), (second, n2) = runs
    assert first > 10  # silence frames arrived before the reply
    assert abs(n1 - len(packets)) <= 3 and abs(n2 - len(packets)) <= 3
    assert second - (first + n1) > 20  # silence kept flowing between the two replies
    for turn in (0, 1):
        assert c.log.find(of(Metric, c.session, stage="first_sent", turn=turn))
        assert c.log.find(control(c.session, ControlKind.STATE, state="assistant_speaking",
                                  turn=turn))


async def test_interrupt_stops_queued_audio_at_once(broker, actors):
    await actors.start("media")
    packets = opus_packets(tone(3.0))
    async with call(broker) as c:
        await asyncio.sleep(0.3)
        sent = time.monotonic()
        publish_packets(c.bus, c.session, 0, packets)
        while len(c.peer.audible_since(sent)) < 25:  # half a second of the reply heard
            await asyncio.sleep(0.01)
        delay = c.peer.audible_since(sent)[0] - sent  # bus + pacing + network + jitter buffer
        interrupted = time.monotonic()
        c.bus.publish(Control(session=c.session, turn=1, kind=ControlKind.INTERRUPT))
        await c.log.wait(control(c.session, ControlKind.STATE, state="assistant_done",
                                 text="interrupted"))
        publish_packets(c.bus, c.session, 0, packets[:50])  # a stale turn: never played
        await asyncio.sleep(1.0)
        audible = c.peer.audible_since(sent)
    after = [t for t in audible if t > interrupted]
    stopped_after = (after[-1] if after else interrupted) - interrupted - delay
    print(f"delivery {delay * 1000:.0f} ms; audio stopped {stopped_after * 1000:.0f} ms "
          f"after the interrupt (net of delivery); {len(audible)} of {len(packets)} frames heard")
    assert len(audible) < len(packets) // 2
    assert stopped_after < 0.1


async def test_session_end_frees_the_call_and_bad_offers_are_refused(broker, actors):
    await actors.start("media")
    session = f"s-{uuid.uuid4().hex[:8]}"
    async with harness.client(broker, [CONTROL, METRICS]) as bus, asyncio.TaskGroup() as tg:
        log = BusLog(bus)
        collector = tg.create_task(log.run())
        bus.publish(Control(session=session, kind=ControlKind.OFFER, sdp="v=0\r\nnonsense",
                            sdp_type="offer"))
        error = await log.wait(control(session, ControlKind.ERROR))
        assert "offer" in error.text and error.actor == "media"
        async with call(broker, session=session, log=log):
            mark = len(log.messages)
            bus.publish(Control(session=session, kind=ControlKind.SESSION_END))
            closed = await log.wait(control(session, ControlKind.STATE, state="closed"),
                                    after=mark)
            assert closed.actor == "media"
        # the session's state is gone: a new offer for the same session starts a fresh call
        async with call(broker, session=session, log=log) as c2:
            publish_packets(bus, session, 0, opus_packets(tone(0.4)))
            await log.wait(control(session, ControlKind.STATE, state="assistant_done"))
            await asyncio.sleep(0.3)
            assert len(segments(c2.peer.heard)) == 1
        collector.cancel()


# ----------------------------------------------------------------------------- pieces, in-process


def test_ice_servers_are_parsed_and_checked():
    servers = parse_ice_servers("stun:stun.example.org:3478, turn:ann:s3cret@turn.example.org:443"
                                "?transport=tcp")
    assert [s.urls for s in servers] == ["stun:stun.example.org:3478",
                                         "turn:turn.example.org:443?transport=tcp"]
    assert (servers[1].username, servers[1].credential) == ("ann", "s3cret")
    assert parse_ice_servers("") == []
    for bad in ("http://x", "turn:turn.example.org", "stun:host:port"):
        with pytest.raises(ValueError):
            parse_ice_servers(bad)


def test_offer_keeps_only_loopback_candidates_when_it_has_some():
    sdp = ("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
           "a=candidate:1 1 udp 2122260223 192.0.2.7 50000 typ host\r\n"
           "a=candidate:2 1 udp 2122194687 127.0.0.1 50001 typ host\r\n"
           "a=end-of-candidates\r\n")
    kept = keep_loopback_candidates(sdp)
    assert "127.0.0.1 50001" in kept and "192.0.2.7" not in kept and "a=end-of-candidates" in kept
    remote_only = sdp.replace("127.0.0.1", "198.51.100.3")
    assert keep_loopback_candidates(remote_only) == remote_only


async def test_inbound_audio_is_decoded_on_arrival_not_four_packets_later():
    browser, server = create_peer([]), create_peer([])
    try:
        browser.addTransceiver("audio", direction="sendonly")
        await browser.setLocalDescription(await browser.createOffer())
        await server.setRemoteDescription(browser.localDescription)
        (receiver,) = [t.receiver for t in server.getTransceivers() if t.kind == "audio"]
        assert shorten_audio_jitter(server)  # fails loudly if aiortc renames its buffer
        assert isinstance(receiver._RTCRtpReceiver__jitter_buffer, AudioJitterBuffer)
    finally:
        await browser.close()
        await server.close()


def test_audio_jitter_buffer_hands_each_packet_on_in_order_and_drops_late_ones():
    buffer = AudioJitterBuffer()

    def add(seq: int) -> bytes | None:
        packet = RtpPacket(payload_type=111, sequence_number=seq, timestamp=seq * 960,
                           payload=seq.to_bytes(2, "big"))
        _, frame = buffer.add(packet)
        if frame is not None:
            assert frame.timestamp == seq * 960
        return None if frame is None else frame.data

    handed = [add(seq) for seq in (65533, 65534, 65535, 0, 1)]  # across the wrap
    assert handed == [s.to_bytes(2, "big") for s in (65533, 65534, 65535, 0, 1)]
    assert add(1) is None and add(65535) is None  # a duplicate, a reordered one: too late
    assert add(4) == (4).to_bytes(2, "big")  # a gap (2 and 3 lost): on at once, no waiting
    assert add(3) is None and buffer.late == 3
    assert add(5) == (5).to_bytes(2, "big")


async def test_outbound_track_flushes_drops_stale_turns_and_makes_up_a_stall():
    releases: list[Release] = []
    turns: list[tuple[str, int]] = []
    track = OpusTrack(on_turn=lambda event, turn: turns.append((event, turn)),
                      on_release=releases.append)
    for i in range(3):
        assert track.push(1, b"\x01" * 40, final=i == 2)
    got = [await track.recv() for _ in range(4)]
    assert [bytes(p) for p in got] == [b"\x01" * 40] * 3 + [OPUS_SILENCE]
    assert [p.pts for p in got] == [0, 960, 1920, 2880] and got[0].time_base == Fraction(1, RATE)
    assert turns == [("start", 1), ("done", 1)]
    track.push(2, b"\x02" * 40)
    track.push(2, b"\x02" * 40)
    assert track.flush(3) and track.queued == 0  # barge-in: queued speech gone at once
    assert not track.push(2, b"\x02" * 40)  # a stale turn
    time.sleep(0.1)  # the process is held up for five packet times
    made_up = [await track.recv() for _ in range(5)]
    assert all(bytes(p) == OPUS_SILENCE for p in made_up)
    late = releases[-5:]
    assert late[0].at - late[0].due > 0.08
    # the missed slots go out at once, on the schedule's own timestamps: one late packet for
    # the browser, not a stream shifted by the stall
    assert late[-1].at - late[0].at < 0.01
    assert [r.due - late[0].due for r in late] == pytest.approx([0, 0.02, 0.04, 0.06, 0.08])
    assert track.caught_up == 1 and track.forgiven == 0 and track.max_late_ms > 80
    await track.recv()  # back on schedule: this slot waited for its time
    assert releases[-1].at >= releases[-1].due - 0.002
    time.sleep(MAX_CATCH_UP_S + 0.05)  # stopped for longer: the schedule starts again from now
    await track.recv()
    following = await track.recv()
    assert track.forgiven == 1 and track.caught_up == 1
    assert releases[-1].due == pytest.approx(releases[-2].at + 0.02)
    assert bytes(following) == OPUS_SILENCE


def test_endpointer_onset_end_pre_roll_and_max_length():
    cfg = EndpointConfig(threshold=0.5, silence_s=0.5, min_speech_s=0.25, max_utterance_s=3.0,
                         pre_roll_s=0.3, tail_s=0.1, early_s=0.0)
    ep = Endpointer(cfg)
    chunk = np.full(CHUNK, 0.1, dtype=np.float32)
    step = CHUNK / cfg.rate  # 32 ms
    events: list[tuple[int, object]] = []
    probs = [0.0] * 20 + [0.9] * 40 + [0.1] * 30  # 0.64 s silence, 1.28 s speech, 0.96 s silence
    for i, p in enumerate(probs):
        events += [(i, e) for e in ep.feed(chunk, p, now=i * step)]
    (i_on, onset), (i_end, end) = events
    assert isinstance(onset, Onset) and i_on == 20 + 7  # 8 voiced chunks >= 250 ms
    assert isinstance(end, End) and end.reason == "vad"
    assert i_end == 59 + 16  # 16 silent chunks >= 500 ms after the last voiced one
    assert end.speech_end == pytest.approx(59 * step)
    pre_roll = 10 * CHUNK  # whole chunks just over 0.3 s
    assert len(end.pcm) // 2 == pre_roll + 40 * CHUNK + int(0.1 * cfg.rate)
    # a click shorter than --min-speech-ms starts nothing
    assert not any(ep.feed(chunk, p, now=0.0) for p in [0.9, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    # speech that never pauses is cut at --max-utterance-s
    cut = [e for _ in range(200) for e in ep.feed(chunk, 0.9, now=0.0) if isinstance(e, End)]
    assert cut and cut[0].reason == "max_length"
    assert len(cut[0].pcm) // 2 == pytest.approx(3.0 * cfg.rate, abs=CHUNK)


def test_endpointer_early_end_is_confirmed_or_resumed():
    cfg = EndpointConfig(threshold=0.5, silence_s=0.5, min_speech_s=0.25, early_s=0.2,
                         pre_roll_s=0.0, tail_s=0.1)
    chunk = np.full(CHUNK, 0.1, dtype=np.float32)

    def run(probs: list[float]) -> list[tuple[int, object]]:
        ep = Endpointer(cfg)
        return [(i, e) for i, p in enumerate(probs) for e in ep.feed(chunk, p, now=float(i))]

    # a pause long enough: early End after 7 silent chunks (224 ms), Confirm after 16 (512 ms)
    events = run([0.9] * 20 + [0.1] * 20)
    kinds = [type(e).__name__ for _, e in events]
    assert kinds == ["Onset", "End", "Confirm"], kinds
    (_, _), (i_early, early), (i_confirm, _) = events
    assert early.early and i_early == 19 + 7 and i_confirm == 19 + 16
    assert len(early.pcm) // 2 == 20 * CHUNK + int(0.1 * cfg.rate)
    # the user goes on after 300 ms: the early turn is void (Resume) and the take continues;
    # its final End holds all the speech, before and after the pause
    events = run([0.9] * 20 + [0.1] * 9 + [0.9] * 20 + [0.1] * 20)
    kinds = [type(e).__name__ for _, e in events]
    assert kinds == ["Onset", "End", "Resume", "End", "Confirm"], kinds
    final = events[3][1]
    assert final.early and len(final.pcm) // 2 == 49 * CHUNK + int(0.1 * cfg.rate)


def test_push_to_talk_answers_a_pause_early_and_a_quiet_release_at_once():
    cfg = EndpointConfig(threshold=0.5, min_speech_s=0.25, early_s=0.2, tail_s=0.1,
                         ptt_tail_s=0.2, ptt_quiet_s=0.1)
    chunk = np.full(CHUNK, 0.1, dtype=np.float32)

    def held(probs: list[float]) -> tuple[Endpointer, list[object]]:
        ep = Endpointer(cfg, mode="ptt")
        events = ep.talk_start(0.0)
        for i, p in enumerate(probs):
            events += ep.feed(chunk, p, now=float(i))
        return ep, events

    # a pause while the button is held: early End after 224 ms, Confirm on the release
    ep, events = held([0.9] * 20 + [0.1] * 10)
    assert [type(e).__name__ for e in events] == ["Onset", "End"]
    assert events[1].early and events[1].reason == "ptt"
    assert len(events[1].pcm) // 2 == 20 * CHUNK + int(0.1 * cfg.rate)
    assert [type(e).__name__ for e in ep.talk_stop(40.0)] == ["Confirm"]
    # speaking again after the pause voids it; a release 160 ms into silence ends the turn at
    # once with all the speech, without waiting for the audio in flight
    ep, events = held([0.9] * 20 + [0.1] * 8 + [0.9] * 10 + [0.1] * 5)
    assert [type(e).__name__ for e in events] == ["Onset", "End", "Resume"]
    (end,) = ep.talk_stop(50.0)
    assert isinstance(end, End) and not end.early and end.speech_end == 37.0
    assert len(end.pcm) // 2 == 38 * CHUNK + int(0.1 * cfg.rate)
    # released while speaking: the 200 ms in flight still belong to the turn
    ep, events = held([0.9] * 20)
    assert not ep.talk_stop(21.0)
    tail = [e for _ in range(7) for e in ep.feed(chunk, 0.9, now=22.0)]
    assert len(tail) == 1 and len(tail[0].pcm) // 2 == 27 * CHUNK
    # ...unless the audio in flight falls silent: 100 ms of it ends the turn without the rest
    ep, events = held([0.9] * 20)
    assert not ep.talk_stop(21.0)
    quiet = [e for p in (0.9, 0.1, 0.1, 0.1, 0.1) for e in ep.feed(chunk, p, now=22.0)]
    assert len(quiet) == 1 and len(quiet[0].pcm) // 2 == 21 * CHUNK + int(0.1 * cfg.rate)
    # no VAD at all (a whisper, a muted model): the release waits for the tail as before
    ep, events = held([0.0] * 20)
    assert not ep.talk_stop(21.0) and not [e for e in events if isinstance(e, End)]


def test_endpointer_sends_the_words_so_far_while_the_user_speaks():
    cfg = EndpointConfig(threshold=0.5, silence_s=0.5, min_speech_s=0.25, early_s=0.2,
                         pre_roll_s=0.0, tail_s=0.1, partial_s=0.5)
    chunk = np.full(CHUNK, 0.1, dtype=np.float32)
    every = 16  # chunks of 32 ms in 0.5 s, rounded up

    def run(ep: Endpointer, probs: list[float]) -> list[tuple[int, object]]:
        return [(i, e) for i, p in enumerate(probs) for e in ep.feed(chunk, p, now=float(i))]

    # 1.6 s of speech: the audio so far after 0.5, 1.0 and 1.5 s of it, none during the pause
    events = run(Endpointer(cfg), [0.9] * 50 + [0.1] * 20)
    partials = [(i, e) for i, e in events if isinstance(e, Partial)]
    assert [i for i, _ in partials] == [every - 1, 2 * every - 1, 3 * every - 1]
    assert [len(e.pcm) // 2 for _, e in partials] == [every * CHUNK, 2 * every * CHUNK,
                                                      3 * every * CHUNK]
    assert all(e.reason == "vad" for _, e in partials)
    assert [type(e).__name__ for _, e in events if not isinstance(e, Partial)] == [
        "Onset", "End", "Confirm"]
    # push-to-talk: while the button is held, the same
    ep = Endpointer(cfg, mode="ptt")
    ep.talk_start(0.0)
    held = [e for _, e in run(ep, [0.9] * 40) if isinstance(e, Partial)]
    assert len(held) == 2 and held[0].reason == "ptt"
    # none past partial_max_s (4 s): a longer take would keep the recogniser busy at its end
    long_take = [e for _, e in run(Endpointer(cfg), [0.9] * 300) if isinstance(e, Partial)]
    assert len(long_take) == 7 and len(long_take[-1].pcm) // 2 <= 4 * cfg.rate
    # off by default
    assert not [e for _, e in run(Endpointer(EndpointConfig()), [0.9] * 200)
                if isinstance(e, Partial)]


def test_endpointer_sends_the_audio_at_a_pause_whose_speech_the_end_then_holds():
    cfg = EndpointConfig(threshold=0.5, silence_s=0.5, min_speech_s=0.25, early_s=0.12,
                         pause_s=0.03, pre_roll_s=0.0, tail_s=0.1)
    chunk = np.full(CHUNK, 0.1, dtype=np.float32)

    def run(ep: Endpointer, probs: list[float]) -> list[tuple[int, object]]:
        return [(i, e) for i, p in enumerate(probs) for e in ep.feed(chunk, p, now=float(i))]

    # at the first silent chunk the audio so far goes out, once per pause; the early End that
    # follows holds the same speech (its first `voiced` samples) and silence after it
    events = run(Endpointer(cfg), [0.9] * 20 + [0.1] * 20)
    assert [type(e).__name__ for _, e in events] == ["Onset", "Partial", "End", "Confirm"]
    (_, _), (i_pause, pause), (i_end, end), _ = events
    assert pause.pause and i_pause == 20 and len(pause.pcm) // 2 == 21 * CHUNK
    assert end.early and i_end == 19 + 4 and end.voiced == 20 * CHUNK
    assert pause.pcm[:2 * end.voiced] == end.pcm[:2 * end.voiced]
    # speech after a short pause arms it again: each pause sends its own, the End holds the last
    events = run(Endpointer(cfg), [0.9] * 20 + [0.1] * 2 + [0.9] * 10 + [0.1] * 20)
    pauses = [(i, e) for i, e in events if isinstance(e, Partial)]
    assert [i for i, _ in pauses] == [20, 32] and all(e.pause for _, e in pauses)
    end = next(e for _, e in events if isinstance(e, End))
    assert end.voiced == 32 * CHUNK and len(pauses[1][1].pcm) >= 2 * end.voiced
    # none past partial_max_s (4 s of take): the turn's end is then transcribed as it comes
    long_take = run(Endpointer(cfg), [0.9] * 130 + [0.1] * 20)
    assert [type(e).__name__ for _, e in long_take] == ["Onset", "End", "Confirm"]
    assert long_take[1][1].voiced == 130 * CHUNK
    # push-to-talk: the same while the button is held
    ep = Endpointer(cfg, mode="ptt")
    ep.talk_start(0.0)
    held = run(ep, [0.9] * 20 + [0.1] * 6)
    assert [type(e).__name__ for _, e in held] == ["Partial", "End"]
    assert held[0][1].pause and held[1][1].voiced == 20 * CHUNK
    # off by default; a hands-free End without VAD evidence of its speech claims none
    plain = run(Endpointer(EndpointConfig(early_s=0.0, pre_roll_s=0.0)), [0.9] * 20 + [0.1] * 20)
    assert not [e for _, e in plain if isinstance(e, Partial)]
    ep = Endpointer(cfg, mode="ptt")
    ep.talk_start(0.0)
    run(ep, [0.0] * 20)
    assert not ep.talk_stop(21.0)
    (late,) = [e for _ in range(10) for e in ep.feed(chunk, None, now=22.0)]
    assert isinstance(late, End) and late.voiced == 0


def test_a_sound_that_drops_is_a_pause_before_the_vad_hears_it():
    """The VAD's probability lags the sound (~60 ms): a voiced chunk 30 dB quieter than the
    take's speech already starts the pause, and the End's speech stops before it."""
    cfg = EndpointConfig(threshold=0.5, silence_s=0.5, min_speech_s=0.25, early_s=0.12,
                         pause_s=0.03, quiet_ratio=10 ** (-30 / 20), pre_roll_s=0.0, tail_s=0.1)
    loud, faint = np.full(CHUNK, 0.1, dtype=np.float32), np.full(CHUNK, 0.001, dtype=np.float32)
    ep = Endpointer(cfg)
    events = []
    for i, (chunk, prob) in enumerate([(loud, 0.9)] * 20 + [(faint, 0.9)] * 2 + [(faint, 0.1)] * 6):
        events += [(i, e) for e in ep.feed(chunk, prob, now=float(i))]
    assert [type(e).__name__ for _, e in events] == ["Onset", "Partial", "End"]
    (_, _), (i_pause, pause), (_, end) = events
    assert pause.pause and i_pause == 20 and len(pause.pcm) // 2 == 21 * CHUNK
    assert end.voiced == 20 * CHUNK and len(end.pcm) // 2 == 22 * CHUNK + int(0.1 * cfg.rate)
    # a quiet moment inside speech sends one too (a partial, harmless); the loud speech after
    # it arms the next pause, and the End's speech runs to the last loud chunk
    ep = Endpointer(cfg)
    probs = [(loud, 0.9)] * 10 + [(faint, 0.9)] + [(loud, 0.9)] * 10 + [(faint, 0.1)] * 6
    events = [(i, e) for i, (c, p) in enumerate(probs) for e in ep.feed(c, p, now=float(i))]
    assert [i for i, e in events if isinstance(e, Partial)] == [10, 21]
    assert next(e for _, e in events if isinstance(e, End)).voiced == 21 * CHUNK


def test_a_sound_that_drops_inside_a_chunk_is_a_pause_at_that_chunk():
    """The quiet test looks at a chunk's second half too: speech that stops in the middle of a
    chunk starts the pause at that chunk (32 ms sooner), and the End's speech stops mid-chunk;
    a chunk quiet only in its first half is still loud speech."""
    cfg = EndpointConfig(threshold=0.5, silence_s=0.5, min_speech_s=0.25, early_s=0.12,
                         pause_s=0.03, quiet_ratio=10 ** (-30 / 20), pre_roll_s=0.0, tail_s=0.1)
    loud, faint = np.full(CHUNK, 0.1, dtype=np.float32), np.full(CHUNK, 0.001, dtype=np.float32)
    half = CHUNK // 2
    dropping = np.concatenate([loud[:half], faint[:half]])
    rising = np.concatenate([faint[:half], loud[:half]])
    ep = Endpointer(cfg)
    probs = [(loud, 0.9)] * 10 + [(rising, 0.9)] + [(loud, 0.9)] * 9 + [(dropping, 0.9)] \
        + [(faint, 0.9)] * 2 + [(faint, 0.1)] * 6
    events = [(i, e) for i, (c, p) in enumerate(probs) for e in ep.feed(c, p, now=float(i))]
    assert [type(e).__name__ for _, e in events] == ["Onset", "Partial", "End"]
    (_, _), (i_pause, pause), (_, end) = events
    assert pause.pause and i_pause == 20 and len(pause.pcm) // 2 == 21 * CHUNK
    assert end.voiced == 20 * CHUNK + half
