"""Media actor: the WebRTC end of every call.

Per session it answers the browser's offer with one aiortc peer connection, listens to the
microphone (streaming VAD or push-to-talk) and publishes each user turn as an ``utterance`` with
the latest camera picture as a ``frame``, and plays the assistant's ``opus_packet`` stream back,
paced at 20 ms. It assigns the turn numbers: a confirmed speech onset (or a talk press) starts
turn N+1 and publishes an ``interrupt`` for it, which is also the barge-in signal.

The event loop only relays: VAD and resampling run on a worker thread per session
(:mod:`rtc.listener`), JPEG encoding on a worker thread too, so outbound pacing stays on time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np
from aiortc import RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from actors.runtime import Actor, StartupError, main
from bus.schema import (
    CONTROL,
    OPUS_PACKET,
    VIDEO_SOURCES,
    Control,
    ControlKind,
    Frame,
    Message,
    Metric,
    OpusPacket,
    Utterance,
)
from core.priority import set_niceness
from rtc.listener import Listener
from rtc.outbound import OpusTrack
from rtc.peer import (
    create_peer,
    keep_loopback_candidates,
    offer_loopback_candidates,
    parse_ice_servers,
    shorten_audio_jitter,
)
from rtc.snapshot import LatestFrame, encode_jpeg
from rtc.vad import Confirm, End, EndpointConfig, Event, Onset, Partial, Resume, SileroVad

MODES = ("vad", "ptt")
TICK_S = 0.1  # without microphone audio, the listener still sees time pass (push-to-talk tail)
CONNECT_TIMEOUT_S = 30.0  # an offer whose peer never connects is given up


@dataclass(eq=False)
class Call:
    """Everything the media actor holds for one session; dropped when the call ends."""

    session: str
    listener: Listener
    track: OpusTrack = field(init=False)
    video: LatestFrame = field(default_factory=LatestFrame)
    pc: RTCPeerConnection | None = None
    tg: asyncio.TaskGroup | None = None  # the call's own tasks (receivers, snapshots)
    user_turn: int = 0
    video_kind: str = "camera"  # what the video track shows: camera | screen
    state: str = ""
    replaced: bool = False  # a newer offer of the same session took over
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    bad_audio: bool = False


class MediaActor(Actor):
    """WebRTC peer per call: microphone -> utterances and frames, Opus packets -> speaker."""

    name = "media"
    topics = (OPUS_PACKET, CONTROL)
    groups = ("media", "ice")

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._calls: dict[str, Call] = {}
        self._vad: SileroVad | None = None
        self._endpoint = EndpointConfig()
        self._ice_servers: list[RTCIceServer] = []
        self._orphans: set[str] = set()  # sessions whose packets we had no call for (logged once)

    # -- start-up

    async def prepare(self) -> None:
        s = self.settings
        try:
            self._ice_servers = parse_ice_servers(s.ice_servers)
        except ValueError as exc:
            raise StartupError(f"--ice-servers: {exc}") from None
        if not 0.0 < s.vad_threshold < 1.0:
            raise StartupError(f"--vad-threshold must be between 0 and 1, got {s.vad_threshold}")
        if (s.vad_silence_ms <= 0 or s.min_speech_ms < 0 or s.max_utterance_s <= 0
                or s.partial_ms < 0 or s.vad_pause_ms < 0 or s.vad_quiet_db < 0):
            raise StartupError("--vad-silence-ms and --max-utterance-s must be positive, "
                               "--min-speech-ms, --partial-ms, --vad-pause-ms and "
                               "--vad-quiet-db not negative")
        self._endpoint = EndpointConfig(
            threshold=s.vad_threshold, silence_s=s.vad_silence_ms / 1000,
            early_s=s.vad_early_ms / 1000, pause_s=s.vad_pause_ms / 1000,
            quiet_ratio=10 ** (-s.vad_quiet_db / 20) if s.vad_quiet_db > 0 else 0.0,
            partial_s=s.partial_ms / 1000,
            min_speech_s=s.min_speech_ms / 1000, max_utterance_s=s.max_utterance_s)
        if s.ice_loopback:
            offer_loopback_candidates()
        nice = set_niceness(s.media_nice)
        if nice is None:
            self.log.warning("media_priority_unchanged", wanted=s.media_nice,
                             hint="run as root or grant CAP_SYS_NICE for steadier audio under load")
        else:
            self.log.info("media_priority", nice=nice)
        if s.log_level != "debug":  # every ICE check and RTP detail is logged at info
            for noisy in ("aioice", "aiortc"):
                logging.getLogger(noisy).setLevel(logging.WARNING)
        try:
            self._vad = await asyncio.to_thread(SileroVad)
        except Exception as exc:  # onnxruntime raises its own types for a bad file
            raise StartupError(f"cannot load the silero-vad model: {exc}") from None
        # Warm up: the first inference and the first peer connection are ~10x slower.
        stream = self._vad.stream()
        await asyncio.to_thread(stream, np.zeros(512, dtype=np.float32))
        await create_peer([]).close()
        self.log.info("media_ready", ice_servers=len(self._ice_servers),
                      ice_loopback=s.ice_loopback, mode=s.turn_mode, vad_model=str(self._vad.path))

    # -- bus

    async def handle(self, msg: Message) -> None:
        if isinstance(msg, OpusPacket):
            self._play(msg)
        elif isinstance(msg, Control):
            self._control(msg)

    def _control(self, msg: Control) -> None:
        if msg.source == self.bus.instance:
            return
        if msg.kind == ControlKind.OFFER:
            self._offer(msg)
            return
        call = self._calls.get(msg.session)
        if call is None:
            return
        now = time.time()
        if msg.kind == ControlKind.MODE:
            if msg.mode in MODES:
                call.listener.command("mode", now, msg.mode)
                self.log.info("mode_changed", session=msg.session, mode=msg.mode)
            else:
                self.report_error(msg.session, msg.turn, f"unknown turn mode {msg.mode[:20]!r}")
        elif msg.kind == ControlKind.VIDEO and msg.text in VIDEO_SOURCES:
            call.video_kind = msg.text
        elif msg.kind == ControlKind.TALK_START:
            call.listener.command("talk_start", now)
        elif msg.kind == ControlKind.TALK_STOP:
            call.listener.command("talk_stop", now)

    def _play(self, msg: OpusPacket) -> None:
        call = self._calls.get(msg.session)
        if call is None:
            if msg.session not in self._orphans:
                if len(self._orphans) > 1000:  # a publisher spraying session ids
                    self._orphans.clear()
                self._orphans.add(msg.session)
                self.log.warning("packet_without_call", session=msg.session, turn=msg.turn)
            return
        if not call.track.push(msg.turn, msg.packet, msg.samples, msg.final):
            self.log.debug("packet_dropped", session=msg.session, turn=msg.turn,
                           queued=call.track.queued)

    async def interrupted(self, session: str, turn: int) -> None:
        """A newer turn: flush older queued speech at once (the call itself goes on)."""
        call = self._calls.get(session)
        if call is not None and call.track.flush(turn):
            self._state(call, "assistant_done", "interrupted")

    async def session_ended(self, session: str) -> None:
        self._orphans.discard(session)
        self.jobs.cancel(session)  # the call's finally closes the peer and frees its state

    # -- one call

    def _offer(self, msg: Control) -> None:
        if msg.sdp_type != "offer" or not msg.sdp.strip():
            self.log.warning("bad_offer", session=msg.session, sdp_type=msg.sdp_type[:20])
            self.report_error(msg.session, msg.turn, "the call offer was empty or not an offer")
            return
        mode = msg.mode if msg.mode in MODES else self.settings.turn_mode
        assert self._vad is not None
        call = Call(msg.session, Listener(self._vad, self._endpoint, mode),
                    video_kind=msg.text if msg.text in VIDEO_SOURCES else "camera")
        call.track = OpusTrack(on_turn=lambda event, turn: self._turn_event(call, event, turn))
        previous = self._calls.get(msg.session)
        if previous is not None:
            previous.replaced = True
        self._calls[msg.session] = call
        self._orphans.discard(msg.session)
        self.jobs.start(msg.session, msg.turn, self._run_call(call, msg.sdp))

    async def _run_call(self, call: Call, offer_sdp: str) -> None:
        log = self.log.bind(session=call.session)
        pc = call.pc = create_peer(self._ice_servers,
                                   on_state=lambda state: self._peer_state(call, state))
        try:
            if self.settings.ice_loopback:
                offer_sdp = keep_loopback_candidates(offer_sdp)
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
                if not any(t.kind == "audio" for t in pc.getTransceivers()):
                    raise ValueError("it has no audio")
                if not shorten_audio_jitter(pc):
                    log.warning("audio_jitter_default", note="aiortc changed; +80 ms per turn")
                pc.addTrack(call.track)
                await pc.setLocalDescription(await pc.createAnswer())
            except Exception as exc:  # aiortc's SDP parser raises assorted types
                log.warning("offer_rejected", error=repr(exc)[:300])
                self.report_error(call.session, 0, f"the call offer could not be used: {exc}")
                self._state(call, "failed")
                return
            local = pc.localDescription
            self.publish(Control(session=call.session, kind=ControlKind.ANSWER, sdp=local.sdp,
                                 sdp_type=local.type, actor=self.name,
                                 instance=self.bus.instance))
            log.info("answered", mode=call.listener.mode)
            async with asyncio.TaskGroup() as tg:
                call.tg = tg
                for transceiver in pc.getTransceivers():
                    track = transceiver.receiver.track
                    loop = self._listen if transceiver.kind == "audio" else self._watch
                    self._spawn(call, tg, loop(call, track))
                self._spawn(call, tg, self._connect_deadline(call))
                await call.closed.wait()
                for task in list(call.tasks):
                    task.cancel()
        finally:
            call.tg = None
            await self._free(call, pc)

    async def _free(self, call: Call, pc: RTCPeerConnection) -> None:
        current = self._calls.get(call.session) is call
        if current:
            del self._calls[call.session]
        call.track.stop()
        try:
            await pc.close()
        except Exception as exc:  # closing a half-built peer can fail; nothing to keep
            self.log.debug("close_failed", session=call.session, error=repr(exc))
        if current and call.state != "closed":
            self._state(call, "closed")
        track = call.track
        self.log.info("call_freed", session=call.session, underruns=track.underruns,
                      stalls=track.caught_up, forgiven=track.forgiven,
                      max_late_ms=round(track.max_late_ms, 1))

    @staticmethod
    def _spawn(call: Call, tg: asyncio.TaskGroup, coro: Coroutine[Any, Any, None]) -> None:
        task = tg.create_task(coro)
        call.tasks.add(task)
        task.add_done_callback(call.tasks.discard)

    def _peer_state(self, call: Call, state: str) -> None:
        if state not in ("connected", "failed", "closed") or state == call.state:
            return
        if state == "connected":
            call.connected.set()
        else:
            call.closed.set()
        if call.replaced:
            return
        self._state(call, state)
        self.log.info("peer_state", session=call.session, state=state)
        if state == "connected":
            self._state(call, "listening")

    async def _connect_deadline(self, call: Call) -> None:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await call.connected.wait()
        except TimeoutError:
            self.log.warning("connect_timeout", session=call.session)
            self._state(call, "failed")
            call.closed.set()

    async def _listen(self, call: Call, track: MediaStreamTrack) -> None:
        """Microphone frames -> listener (worker thread) -> turn events."""
        while True:
            frame = None
            try:
                async with asyncio.timeout(TICK_S):
                    frame = await track.recv()
            except TimeoutError:
                pass
            except MediaStreamError:
                return
            now = time.time()
            try:
                events = await asyncio.to_thread(call.listener.process, frame, now)
            except Exception as exc:  # an odd frame must not end the call
                if not call.bad_audio:
                    call.bad_audio = True
                    self.log.warning("bad_audio_frame", session=call.session, error=repr(exc))
                continue
            for event in events:
                self._speech_event(call, event)

    async def _watch(self, call: Call, track: MediaStreamTrack) -> None:
        """Keep the newest camera/screen frame (aiortc's queue must be drained anyway)."""
        while True:
            try:
                call.video.update(await track.recv())
            except MediaStreamError:
                return

    # -- turns

    def _speech_event(self, call: Call, event: Event) -> None:
        session = call.session
        if isinstance(event, Onset | Resume):
            turn = self._new_turn(call, void=isinstance(event, Resume))
            if isinstance(event, Resume):  # the early-ended turn is void: its reply is dropped
                self.log.info("speech_resumed", session=session, turn=turn)
                return
            self._state(call, "user_speaking")
            self.log.info("speech_start", session=session, turn=turn, reason=event.reason)
        elif isinstance(event, Confirm):
            call.track.release(call.user_turn)
            self._state(call, "listening")
            self.log.info("speech_end_confirmed", session=session, turn=call.user_turn)
        elif isinstance(event, Partial):
            turn = max(call.user_turn, self.turns.current(session))
            partial = Utterance(session=session, turn=turn, pcm=event.pcm, reason=event.reason,
                                partial=True, pause=event.pause)
            self.publish(partial)
            self.log.debug("utterance_partial", session=session, turn=turn, pause=event.pause,
                           s=round(partial.duration, 2))
        elif isinstance(event, End):
            # a page interrupt during the speech moved the turn on: the utterance belongs to it
            turn = max(call.user_turn, self.turns.current(session))
            now = time.time()
            utterance = Utterance(session=session, turn=turn, pcm=event.pcm, reason=event.reason,
                                  speech_end=event.speech_end, voiced_bytes=2 * event.voiced)
            if event.early:
                call.track.hold(turn)  # answer now, play once the silence is confirmed
            self.publish(utterance)
            self.publish(Metric(session=session, turn=turn, stage="speech_end",
                                at=event.speech_end, ms=(now - event.speech_end) * 1000))
            if not event.early:
                self._state(call, "listening")
            self.log.info("utterance", session=session, turn=turn, reason=event.reason,
                          s=round(utterance.duration, 2), early=event.early)
            frame = call.video.frame
            if frame is not None and call.tg is not None:
                self._spawn(call, call.tg, self._snapshot(call, turn, frame))

    def _new_turn(self, call: Call, void: bool = False) -> int:
        """Start the session's next turn: everything older is interrupted everywhere (and, when
        ``void``, forgotten: it was an early end of a turn the user went on with)."""
        session = call.session
        turn = self.turns.current(session) + 1
        self.turns.advance(session, turn)
        call.user_turn = turn
        cut = call.track.flush(turn)
        self.publish(Control(session=session, turn=turn, kind=ControlKind.INTERRUPT,
                             actor=self.name, instance=self.bus.instance,
                             text="void" if void else ""))
        if cut:
            self._state(call, "assistant_done", "interrupted")
        return turn

    async def _snapshot(self, call: Call, turn: int, frame: av.VideoFrame) -> None:
        started = time.perf_counter()
        try:
            shot = await asyncio.to_thread(encode_jpeg, frame)
        except Exception as exc:  # an undecodable frame: the utterance goes on without it
            self.log.warning("snapshot_failed", session=call.session, error=repr(exc))
            return
        self.publish(Frame(session=call.session, turn=turn, jpeg=shot.jpeg, width=shot.width,
                           height=shot.height, kind=call.video_kind))
        self.log.debug("frame", session=call.session, turn=turn, bytes=len(shot.jpeg),
                       ms=round((time.perf_counter() - started) * 1000, 1))

    def _turn_event(self, call: Call, event: str, turn: int) -> None:
        """The outbound track handed the first / final packet of ``turn`` to aiortc."""
        if call.replaced:
            return
        if event == "start":
            self.publish(Metric(session=call.session, turn=turn, stage="first_sent",
                                at=time.time()))
            self._state(call, "assistant_speaking", turn=turn)
        else:
            self._state(call, "assistant_done", turn=turn)

    def _state(self, call: Call, state: str, text: str = "", turn: int | None = None) -> None:
        if state in ("connected", "failed", "closed"):
            call.state = state
        self.publish(Control(session=call.session, kind=ControlKind.STATE, state=state,
                             text=text, actor=self.name, instance=self.bus.instance,
                             turn=self.turns.current(call.session) if turn is None else turn))


if __name__ == "__main__":
    raise SystemExit(main(MediaActor))

