"""Where a user's turn starts and ends: silero-vad speech probabilities and an endpointing machine.

The model is the ONNX silero-vad bundled in the ``silero-vad`` wheel, run with onnxruntime
directly (the package's own wrapper needs torch, which this process does not otherwise load):
one shared inference session, and per call a :class:`VadStream` holding the recurrent state and
the 64-sample context, exactly as ``silero_vad.OnnxWrapper`` does.

:class:`Endpointer` turns audio (+ probabilities in hands-free mode, or talk presses in
push-to-talk mode) into :class:`Onset` and :class:`End` events. It is plain synchronous code,
fed by one thread at a time.

Push-to-talk listens to the VAD too, to answer sooner without ever cutting the user off: while
the button is held, a pause after speech ends the turn early (answered, played only once the
button is released, void if the user speaks again), and a release after the speech has already
stopped ends the turn at once instead of waiting for the audio still in flight.
"""

from __future__ import annotations

import collections
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime

from bus.schema import PCM_RATE

CHUNK = 512  # samples per VAD step at 16 kHz (32 ms), fixed by the model
CONTEXT = 64  # samples of the previous chunk the model sees again


def bundled_model() -> Path:
    """Path of ``silero_vad.onnx`` inside the installed wheel (found without importing torch)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the silero-vad package is not installed (pip install silero-vad)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"silero-vad model missing at {path}")
    return path


class SileroVad:
    """The loaded model; ``run`` is thread-safe (onnxruntime sessions are)."""

    def __init__(self, path: Path | None = None) -> None:
        opts = onnxruntime.SessionOptions()
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        self.path = path or bundled_model()
        self._session = onnxruntime.InferenceSession(
            str(self.path), sess_options=opts, providers=["CPUExecutionProvider"])
        self._sr = np.array(PCM_RATE, dtype=np.int64)

    def stream(self) -> VadStream:
        return VadStream(self)

    def run(self, x: np.ndarray, state: np.ndarray) -> tuple[float, np.ndarray]:
        out, new_state = self._session.run(None, {"input": x, "state": state, "sr": self._sr})
        return float(out[0, 0]), new_state


class VadStream:
    """Speech probability of consecutive 512-sample chunks of one audio stream."""

    def __init__(self, model: SileroVad) -> None:
        self._model = model
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros((1, CONTEXT), dtype=np.float32)

    def __call__(self, chunk: np.ndarray) -> float:
        x = np.concatenate([self._context, chunk.reshape(1, CHUNK).astype(np.float32)], axis=1)
        prob, self._state = self._model.run(x, self._state)
        self._context = x[:, -CONTEXT:]
        return prob


# ----------------------------------------------------------------------------- endpointing


@dataclass(frozen=True, slots=True)
class Onset:
    """The user started a turn (speech confirmed, or push-to-talk pressed)."""

    reason: str  # vad | ptt
    at: float  # wall clock


@dataclass(frozen=True, slots=True)
class End:
    """The user's turn is over: its audio, as 16 kHz s16le mono.

    ``early`` ends a hands-free turn after a short silence, before the full ``silence_s``: the
    utterance can be transcribed and answered while the silence is still being confirmed. The
    turn then ends with either :class:`Confirm` (the silence lasted) or :class:`Resume` (the user
    went on speaking: the early turn is void and the take goes on as a new turn).
    """

    pcm: bytes
    reason: str  # vad | ptt | max_length
    speech_end: float  # wall clock of the end of the last speech
    early: bool = False
    voiced: int = 0  # the leading samples of ``pcm`` that hold all its speech (0: unknown)


@dataclass(frozen=True, slots=True)
class Confirm:
    """The silence after an early :class:`End` lasted: that turn really is over."""

    at: float


@dataclass(frozen=True, slots=True)
class Resume:
    """Speech came back after an early :class:`End`: that turn is void, the take continues."""

    at: float


@dataclass(frozen=True, slots=True)
class Partial:
    """The audio so far of a turn the user is still speaking: for its words to be known early
    (a live caption, and a model that reads them before the turn ends). Never a turn's end.

    ``pause`` marks the audio at the start of a pause: if the turn ends there, its End holds
    the same speech (see ``End.voiced``), so the words found for this one are the turn's.
    """

    pcm: bytes
    reason: str  # vad | ptt
    pause: bool = False


Event = Onset | End | Confirm | Resume | Partial


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    threshold: float = 0.5
    silence_s: float = 0.5  # hands-free: silence that ends a turn
    early_s: float = 0.12  # silence after which the turn ends early (0: never)
    # silence after which the audio so far goes out as a pause Partial, so that the words are
    # being found while the early End waits for its silence (0: never)
    pause_s: float = 0.0
    # a chunk (or its second half) this much quieter (RMS) than the take's speech so far is a
    # pause too, though the VAD, whose probability lags the sound by ~60 ms, still calls it
    # speech (0: the VAD only)
    quiet_ratio: float = 0.0
    min_speech_s: float = 0.25  # speech before a hands-free turn starts (or a ptt take counts)
    max_utterance_s: float = 30.0
    pre_roll_s: float = 0.3  # audio kept from before the onset (speech starts softly)
    tail_s: float = 0.1  # audio kept after the last speech (hands-free; silero lags ~60 ms)
    ptt_tail_s: float = 0.2  # audio kept after a talk release (still in flight)
    ptt_quiet_s: float = 0.1  # push-to-talk: silence after speech that makes a release final
    pending_gap_s: float = 0.2  # silence that cancels a not-yet-confirmed onset
    partial_s: float = 0.0  # while speech goes on, its audio so far this often (0: never)
    # ...for takes up to this long: transcribing a longer one takes long enough that the end of
    # the turn would too often find the recogniser still busy with it
    partial_max_s: float = 4.0
    rate: int = PCM_RATE

    @property
    def neg_threshold(self) -> float:
        """Below this a chunk is silence; between the two it continues what came before."""
        return max(self.threshold - 0.15, 0.01)


@dataclass(slots=True)
class _Take:
    """Audio of one turn in progress."""

    reason: str
    chunks: list[np.ndarray] = field(default_factory=list)
    samples: int = 0
    speech: int = 0  # voiced samples (hands-free)
    silence_run: int = 0  # samples since the last voiced chunk
    voiced_until: int = 0  # sample position right after the last voiced chunk
    speech_end: float = 0.0
    confirmed: bool = False
    early_sent: bool = False  # an early End went out and is neither confirmed nor resumed
    pause_sent: bool = False  # a pause Partial went out since the last loud chunk
    loud_until: int = 0  # sample position right after the last loud voiced audio
    voiced_rms: float = 0.0  # sum of the voiced chunks' RMS ...
    voiced_chunks: int = 0  # ... over this many
    stop_after: int | None = None  # push-to-talk released: samples still to take
    stop_at: float = 0.0
    partial_at: int = 0  # sample position of the last Partial

    def add(self, chunk: np.ndarray) -> None:
        self.chunks.append(chunk)
        self.samples += len(chunk)


def _rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float32))))


def _to_pcm(chunks: list[np.ndarray], limit: int | None = None) -> bytes:
    audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    if limit is not None:
        audio = audio[:limit]
    return (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()


class Endpointer:
    """Hands-free (``vad``) or push-to-talk (``ptt``) turn detection over a 16 kHz stream."""

    def __init__(self, config: EndpointConfig, mode: str = "vad") -> None:
        self.config = config
        self.mode = mode
        self._pre_roll: collections.deque[np.ndarray] = collections.deque()
        self._pre_samples = 0
        self._take: _Take | None = None
        self._voiced = False

    @property
    def active(self) -> bool:
        """A turn is confirmed and in progress (its Onset was emitted)."""
        return self._take is not None and self._take.confirmed

    def _s(self, seconds: float) -> int:
        return int(seconds * self.config.rate)

    # -- commands

    def set_mode(self, mode: str, now: float) -> list[Event]:
        """Switch mode; a turn in progress ends as it is."""
        if mode == self.mode:
            return []
        events = self._finish(now) if self.active else []
        self._take = None
        self.mode = mode
        return events

    def talk_start(self, now: float) -> list[Event]:
        if self.mode != "ptt" or (self._take is not None and self._take.stop_after is None):
            return []
        events = self._finish(now) if self.active else []  # pressed again during the tail
        self._take = _Take("ptt", confirmed=True, speech_end=now)
        return [*events, Onset("ptt", now)]

    def talk_stop(self, now: float) -> list[Event]:
        take = self._take
        if self.mode != "ptt" or take is None or take.stop_after is not None:
            return []
        if take.early_sent:  # answered already, and nothing was said since
            return self._finish(now)
        if self._quiet(take):  # the user stopped speaking before letting go
            return self._finish(now, limit=self._speech_limit(take))
        take.stop_after = self._s(self.config.ptt_tail_s)
        take.stop_at = now
        if take.speech < self._s(self.config.min_speech_s):  # the VAD heard nothing to go by
            take.speech_end = now
        return []

    def _speech_limit(self, take: _Take) -> int:
        """Where a take's audio is cut: its last speech and ``tail_s`` after it."""
        return take.voiced_until + self._s(self.config.tail_s)

    def _quiet_tail(self, take: _Take, chunk: np.ndarray) -> int:
        """How many samples at the end of a voiced ``chunk`` are ``quiet_ratio`` quieter than
        the take's speech so far (the VAD's lag after the sound stopped): 0 (loud to its end),
        its second half (the sound dropped inside it: the pause is seen one chunk sooner) or all
        of it. The take's level learns from the loud part."""
        ratio = self.config.quiet_ratio
        if ratio <= 0 or not len(chunk):
            return 0
        half = len(chunk) // 2
        head, tail = _rms(chunk[:half]), _rms(chunk[half:])
        level = take.voiced_rms / take.voiced_chunks if take.voiced_chunks else 0.0
        quiet = 0
        if take.voiced_chunks and tail < ratio * level:
            if head < ratio * level:
                return len(chunk)
            quiet = len(chunk) - half
        whole = (head * head * half + tail * tail * (len(chunk) - half)) / len(chunk)
        take.voiced_rms += head if quiet else float(np.sqrt(whole))
        take.voiced_chunks += 1
        return quiet

    def _quiet(self, take: _Take) -> bool:
        """A push-to-talk take whose speech has been followed by ``ptt_quiet_s`` of silence."""
        return (take.speech >= self._s(self.config.min_speech_s)
                and take.silence_run >= self._s(self.config.ptt_quiet_s))

    def tick(self, now: float) -> list[Event]:
        """Time passes without audio: a released push-to-talk turn ends anyway."""
        take = self._take
        if take is not None and take.stop_after is not None and (
                now - take.stop_at > self.config.ptt_tail_s + 0.3):
            return self._finish(now)
        return []

    # -- audio

    def feed(self, chunk: np.ndarray, prob: float | None, now: float) -> list[Event]:
        """One chunk of audio ending at wall-clock ``now``; ``prob`` is required in vad mode
        (in ptt mode, without it a release always waits for the audio in flight)."""
        if self.mode == "ptt":
            return self._feed_ptt(chunk, prob, now)
        return self._feed_vad(chunk, prob or 0.0, now)

    def _feed_ptt(self, chunk: np.ndarray, prob: float | None, now: float) -> list[Event]:
        take = self._take
        self._voiced = self._is_voiced(prob)
        if take is None:
            return []
        take.add(chunk)
        if take.stop_after is not None:  # released: the audio still in flight is the turn's
            take.stop_after -= len(chunk)
            if prob is not None:
                self._track_voice(take, chunk, now)
                if self._quiet(take):  # the rest in flight is silence: no need to wait for it
                    return self._finish(now, limit=self._speech_limit(take))
            if take.stop_after <= 0:
                return self._finish(now)
            return []
        events = self._track_voice(take, chunk, now) if prob is not None else []
        if take.samples >= self._s(self.config.max_utterance_s):
            take.speech_end = now
            return events + self._finish(now, reason="max_length")
        if take.speech >= self._s(self.config.min_speech_s):
            events += self._early_end(take) or self._pause(take) or self._partial(take)
        return events

    def _is_voiced(self, prob: float | None) -> bool:
        """Speech now: above the threshold, or continuing speech above the lower one."""
        cfg = self.config
        return prob is not None and (
            prob >= cfg.threshold or (self._voiced and prob >= cfg.neg_threshold))

    def _track_voice(self, take: _Take, chunk: np.ndarray, now: float) -> list[Event]:
        """Count ``chunk`` as speech or silence; a Resume if it voids an early End."""
        if not self._voiced:
            take.silence_run += len(chunk)
            return []
        take.speech += len(chunk)
        take.silence_run = 0
        take.voiced_until = take.samples
        quiet = self._quiet_tail(take, chunk)
        if quiet < len(chunk):
            take.loud_until = take.samples - quiet
            take.pause_sent = False
        take.speech_end = now
        if take.early_sent:
            take.early_sent = False
            return [Resume(now)]
        return []

    def _early_end(self, take: _Take) -> list[Event]:
        """The early End of a take that has paused for ``early_s``, once per pause."""
        cfg = self.config
        if (cfg.early_s <= 0 or take.early_sent or take.silence_run < self._s(cfg.early_s)
                or (take.reason == "vad" and cfg.early_s >= cfg.silence_s)):
            return []
        take.early_sent = True
        return [End(_to_pcm(take.chunks, self._speech_limit(take)), take.reason, take.speech_end,
                    early=True, voiced=take.loud_until)]

    def _pause(self, take: _Take) -> list[Event]:
        """A pause Partial once a pause has lasted ``pause_s``, or the sound has dropped (quiet
        audio after the last loud audio, see :meth:`_quiet_tail`): the turn may end in it.
        Like plain partials, only within ``partial_max_s``: a longer take's pauses inside the
        speech would keep the recogniser busy with long audio just when the turn's end needs
        it."""
        cfg = self.config
        if (cfg.pause_s <= 0 or take.pause_sent or take.early_sent
                or take.samples > self._s(cfg.partial_max_s)):
            return []
        quiet = take.samples > take.loud_until  # the latest chunk was not loud speech
        if not (quiet and (self._voiced or take.silence_run >= self._s(cfg.pause_s))):
            return []
        take.pause_sent = True
        return [Partial(_to_pcm(take.chunks), take.reason, pause=True)]

    def _feed_vad(self, chunk: np.ndarray, prob: float, now: float) -> list[Event]:
        cfg = self.config
        self._voiced = self._is_voiced(prob)
        take = self._take
        if take is None:
            if not self._voiced:
                self._remember(chunk)
                return []
            take = self._take = _Take("vad", chunks=list(self._pre_roll),
                                      samples=self._pre_samples)
            self._pre_roll.clear()
            self._pre_samples = 0
        take.add(chunk)
        events = self._track_voice(take, chunk, now)
        if not take.confirmed:
            if take.silence_run >= self._s(min(cfg.pending_gap_s, cfg.silence_s)):
                self._take = None  # a click or a cough: forget it, keep it as pre-roll
                for piece in take.chunks:
                    self._remember(piece)
                return []
            if take.speech >= self._s(cfg.min_speech_s):
                take.confirmed = True
                return [Onset("vad", now)]
            return []
        if take.silence_run >= self._s(cfg.silence_s):
            return events + self._finish(now)
        if take.samples >= self._s(cfg.max_utterance_s):
            take.speech_end = now
            return events + self._finish(now, reason="max_length")
        return events + (self._early_end(take) or self._pause(take) or self._partial(take))

    def _partial(self, take: _Take) -> list[Event]:
        """A Partial every ``partial_s`` of a confirmed take, while its speech goes on."""
        every = self._s(self.config.partial_s)
        if (every <= 0 or not self._voiced or take.early_sent or take.speech < every
                or take.samples - take.partial_at < every
                or take.samples > self._s(self.config.partial_max_s)):
            return []
        take.partial_at = take.samples
        return [Partial(_to_pcm(take.chunks), take.reason)]

    def _remember(self, chunk: np.ndarray) -> None:
        limit = self._s(self.config.pre_roll_s)
        if limit <= 0:
            return
        self._pre_roll.append(chunk)
        self._pre_samples += len(chunk)
        while len(self._pre_roll) > 1 and self._pre_samples - len(self._pre_roll[0]) >= limit:
            self._pre_samples -= len(self._pre_roll.popleft())

    def _finish(self, now: float, reason: str | None = None,
                limit: int | None = None) -> list[Event]:
        take = self._take
        self._take = None
        if take is None or not take.confirmed:
            return []
        if take.early_sent:  # its utterance is out already; the audio since is silence
            self._keep_tail(take)
            return [Confirm(now)]
        if take.reason == "vad" and reason is None:
            limit = self._speech_limit(take)
        pcm = _to_pcm(take.chunks, limit)
        self._keep_tail(take)
        voiced = take.loud_until if limit is None or take.loud_until <= limit else 0
        return [End(pcm, reason or take.reason, take.speech_end or now, voiced=voiced)]

    def _keep_tail(self, take: _Take) -> None:
        """The trailing silence is the freshest audio: it becomes the next pre-roll."""
        if take.reason == "vad" and take.samples > take.voiced_until:
            tail = np.concatenate(take.chunks)[take.voiced_until:]
            self._remember(tail[-max(1, self._s(self.config.pre_roll_s)):])
