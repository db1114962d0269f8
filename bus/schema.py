"""Topic names and message schemas: the one contract every actor imports.

A message on the wire is two ZeroMQ frames: ``topic + b"\\0"`` (so that subscribing to ``token``
never matches another topic that starts with it) and a msgpack map of the message's fields.
Binary fields (PCM, JPEG, Opus) travel as msgpack ``bin``, never base64.

Every message carries an envelope: ``session`` (one call), ``turn`` (one user utterance and the
reply to it; later turns make earlier ones stale), ``seq`` (per publisher and topic, so a gap
shows a drop), ``ts`` (wall-clock creation time) and ``source`` (the publishing process).

Topics travel in *lanes*, one socket per lane, so small urgent messages never queue behind bulk
data: see ``LANES`` and ``docs/architecture.md``.
"""

from __future__ import annotations

import time
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any, ClassVar

import msgpack

# ----------------------------------------------------------------------------- topics

UTTERANCE = "utterance"
FRAME = "frame"
TRANSCRIPT = "transcript"
TOKEN = "token"
SENTENCE = "sentence"
OPUS_PACKET = "opus_packet"
CONTROL = "control"
METRICS = "metrics"

PCM_RATE = 16_000  # utterance audio: s16le mono at this rate
OPUS_RATE = 48_000  # Opus timing is always counted at 48 kHz
OPUS_SILENCE = b"\xf8\xff\xfe"  # one 20 ms Opus frame of silence
VIDEO_SOURCES = ("camera", "screen")  # what a Frame shows (Frame.kind, Control VIDEO text)


@dataclass(frozen=True, slots=True)
class Lane:
    """A class of traffic with its own sockets and high-water mark (messages queued per peer)."""

    name: str
    hwm: int
    priority: int  # lower is drained first


CONTROL_LANE = Lane("control", hwm=50_000, priority=0)
# Text and audio packets: small, latency-critical, bursty (TTS runs faster than real time).
STREAM_LANE = Lane("stream", hwm=50_000, priority=1)
# Large payloads: a lagging consumer loses these first, never control or speech packets.
BULK_LANE = Lane("bulk", hwm=200, priority=2)

LANES: dict[str, Lane] = {
    CONTROL: CONTROL_LANE,
    TRANSCRIPT: STREAM_LANE,
    TOKEN: STREAM_LANE,
    SENTENCE: STREAM_LANE,
    OPUS_PACKET: STREAM_LANE,
    METRICS: STREAM_LANE,
    UTTERANCE: BULK_LANE,
    FRAME: BULK_LANE,
}

# Largest accepted encoded payload per topic; anything bigger is dropped as "oversized".
MAX_BYTES: dict[str, int] = {
    UTTERANCE: 4 * 1024 * 1024,  # > 60 s of 16 kHz s16 mono
    FRAME: 4 * 1024 * 1024,
    TRANSCRIPT: 64 * 1024,
    TOKEN: 16 * 1024,
    SENTENCE: 64 * 1024,
    OPUS_PACKET: 8 * 1024,
    CONTROL: 256 * 1024,  # SDP offers are a few KB
    METRICS: 16 * 1024,
}


# ----------------------------------------------------------------------------- messages


@dataclass(kw_only=True, slots=True)
class Message:
    """Envelope shared by every topic."""

    TOPIC: ClassVar[str] = ""

    session: str
    turn: int = 0
    seq: int = 0
    ts: float = field(default_factory=time.time)
    source: str = ""

    @property
    def topic(self) -> str:
        return self.TOPIC


@dataclass(kw_only=True, slots=True)
class Utterance(Message):
    """One user turn of speech, cut by the VAD or by push-to-talk."""

    TOPIC: ClassVar[str] = UTTERANCE

    pcm: bytes  # s16le mono
    sample_rate: int = PCM_RATE
    reason: str = "vad"  # vad | ptt | max_length
    speech_end: float = 0.0  # wall-clock time the user stopped speaking
    partial: bool = False  # the turn's audio so far, the user still speaking (for early words)
    pause: bool = False  # (partial) the audio at the start of a pause: the turn may end here
    # the leading bytes of ``pcm`` that hold all its speech (0: unknown): a turn's utterance
    # whose speech a pause partial already held is transcribed by that partial's recognition
    voiced_bytes: int = 0

    @property
    def duration(self) -> float:
        return len(self.pcm) / 2 / self.sample_rate if self.sample_rate > 0 else 0.0


@dataclass(kw_only=True, slots=True)
class Frame(Message):
    """The latest camera or screen picture at the end of an utterance."""

    TOPIC: ClassVar[str] = FRAME

    jpeg: bytes
    width: int
    height: int
    kind: str = "camera"  # camera | screen


@dataclass(kw_only=True, slots=True)
class Transcript(Message):
    """What the user said in one turn."""

    TOPIC: ClassVar[str] = TRANSCRIPT

    text: str
    language: str = ""
    asr_ms: float = 0.0
    audio_s: float = 0.0
    partial: bool = False  # the words so far of a turn still being spoken (a live caption)
    # (partial) the words at a pause, whole: if the turn ends in this pause, its transcript
    pause: bool = False


@dataclass(kw_only=True, slots=True)
class Token(Message):
    """A text delta of the assistant's reply, as the model produces it."""

    TOPIC: ClassVar[str] = TOKEN

    text: str
    index: int = 0


@dataclass(kw_only=True, slots=True)
class Sentence(Message):
    """A span of the reply ready to speak; ``final`` marks the turn's last one (text may be empty)."""

    TOPIC: ClassVar[str] = SENTENCE

    text: str
    index: int = 0
    final: bool = False
    # a guess sent ahead (a sentence whose end only the next token confirms): synthesised at
    # once, spoken only when the sentence of its index comes with the same text; an empty
    # draft withdraws the guess
    draft: bool = False


@dataclass(kw_only=True, slots=True)
class OpusPacket(Message):
    """One raw Opus packet of the reply; ``final`` marks the turn's last packet."""

    TOPIC: ClassVar[str] = OPUS_PACKET

    packet: bytes
    index: int = 0  # order within the turn
    samples: int = 960  # duration at 48 kHz
    sentence: int = 0
    final: bool = False


class ControlKind(StrEnum):
    """What a control message is about; the fields each kind uses are listed beside it."""

    READY = "ready"  # actor, instance: an actor is subscribed and loaded
    HEARTBEAT = "heartbeat"  # actor, instance: still alive (every second)
    CLAIM = "claim"  # actor, instance: this worker now serves the session
    SESSION_START = "session_start"  # a page joined
    SESSION_END = "session_end"  # the page left: free every state of the session
    OFFER = "offer"  # sdp, sdp_type, mode, text (video source): the browser's WebRTC offer
    ANSWER = "answer"  # sdp, sdp_type: the media actor's answer
    MODE = "mode"  # mode: vad | ptt
    VIDEO = "video"  # text: camera | screen, what the page's video track shows now
    TALK_START = "talk_start"  # push-to-talk pressed
    TALK_STOP = "talk_stop"  # push-to-talk released
    INTERRUPT = "interrupt"  # turn: the new turn; everything older is stale. text "void": the
    # older turn was an early end the user spoke on through: forget it, not only stop it
    STATE = "state"  # state, text: something the page should show (connected, speaking...)
    ERROR = "error"  # text: a problem the user should read


@dataclass(kw_only=True, slots=True)
class Control(Message):
    """Session lifecycle, signaling relay, turn control and actor liveness."""

    TOPIC: ClassVar[str] = CONTROL

    kind: str
    actor: str = ""
    instance: str = ""
    sdp: str = ""
    sdp_type: str = ""
    mode: str = ""
    state: str = ""
    text: str = ""


@dataclass(kw_only=True, slots=True)
class Metric(Message):
    """A timing point of a turn: ``stage`` reached at ``at`` (wall clock), ``ms`` after its cause."""

    TOPIC: ClassVar[str] = METRICS

    stage: str  # speech_end | transcript | first_token | first_sentence | first_packet | first_sent
    at: float = 0.0
    ms: float = 0.0


# Session id used by messages that belong to no call (readiness, heartbeats).
NO_SESSION = ""

MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TOPIC: cls
    for cls in (Utterance, Frame, Transcript, Token, Sentence, OpusPacket, Control, Metric)
}
TOPICS: tuple[str, ...] = tuple(MESSAGE_TYPES)


# ----------------------------------------------------------------------------- codec


class DecodeError(ValueError):
    """A frame that is not a valid message; ``kind`` names the reason for drop counters."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def topic_frame(topic: str) -> bytes:
    """The first ZeroMQ frame (and subscription prefix) of ``topic``."""
    return topic.encode() + b"\0"


def encode(msg: Message) -> list[bytes]:
    """Two frames: topic and msgpack body."""
    return [topic_frame(msg.TOPIC), msgpack.packb(asdict(msg), use_bin_type=True)]


def _field_types(cls: type[Message]) -> dict[str, tuple[type, ...]]:
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[type, ...]] = {}
    for f in fields(cls):
        hint = hints[f.name]
        if isinstance(hint, types.UnionType):
            allowed = tuple(a for a in typing.get_args(hint))
        else:
            allowed = (typing.get_origin(hint) or hint,)
        if float in allowed:
            allowed = (*allowed, int)
        out[f.name] = allowed
    return out


_FIELD_TYPES: dict[str, dict[str, tuple[type, ...]]] = {
    topic: _field_types(cls) for topic, cls in MESSAGE_TYPES.items()
}
_REQUIRED: dict[str, frozenset[str]] = {
    topic: frozenset(
        f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
    )
    for topic, cls in MESSAGE_TYPES.items()
}


def decode(frames: list[bytes]) -> Message:
    """Validate and decode two frames into a message, or raise :class:`DecodeError`."""
    if len(frames) != 2:
        raise DecodeError("frame_count", f"expected 2 frames, got {len(frames)}")
    head, body = frames
    if not head.endswith(b"\0"):
        raise DecodeError("unknown_topic", repr(head[:40]))
    topic = head[:-1].decode("utf-8", "replace")
    cls = MESSAGE_TYPES.get(topic)
    if cls is None:
        raise DecodeError("unknown_topic", repr(topic[:40]))
    if len(body) > MAX_BYTES[topic]:
        raise DecodeError("oversized", f"{topic} body of {len(body)} bytes")
    try:
        data = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise DecodeError("bad_msgpack", f"{topic}: {type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise DecodeError("bad_msgpack", f"{topic}: body is {type(data).__name__}, not a map")
    missing = _REQUIRED[topic] - data.keys()
    if missing:
        raise DecodeError("missing_field", f"{topic}: {sorted(missing)}")
    types_ = _FIELD_TYPES[topic]
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        allowed = types_.get(name)
        if allowed is None:
            continue  # a newer publisher's extra field: ignore it
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise DecodeError("wrong_type", f"{topic}.{name} is {type(value).__name__}")
        kwargs[name] = float(value) if float in allowed and isinstance(value, int) else value
    return cls(**kwargs)
