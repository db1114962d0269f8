"""ASR actor: each utterance becomes a transcript, or a ``no_speech`` state when it holds none.

The model loads once before the actor reports ready and is warmed up by one dummy inference.
Recognition runs one utterance at a time: a second live model call would only split the same
cores. A session's new turn or an interrupt cancels the session's job; an utterance still
waiting for its turn is then never decoded, and one already being recognised stops at its next
stage (VAD, Whisper's encoder, its decoder: a CTranslate2 call cannot be stopped midway), its
result discarded. Such an abandoned call finishes its stage on a second worker thread while the
next recognition starts on the first: the turn's end, which usually abandons a partial, never
waits for a decoder that is working for nobody (the engine queues what cannot overlap).

A *partial* utterance (the audio so far of a turn still being spoken) is transcribed only when
the thread is free, and its words go out as a partial transcript: a live caption, and the LLM's
cue to compute them before the turn ends. It never waits, and the turn's real utterance cancels
it like any newer job: the end of a turn waits at most for the stage the partial is in.

A *pause* partial (the audio at the first moment of silence) is the likely end of the turn, sent
before the endpointer is sure of it. It is transcribed at once (replacing a plain partial), and
when the turn's utterance follows with the same speech (its ``voiced_bytes`` within the pause
partial's audio, only silence after), that recognition, finished or still running, gives the
turn's transcript: the turn's end does not wait for Whisper to start again.

Several ASR processes, here or on other hosts, share sessions through the runtime's membership
(see ``bus/membership.py``): each session is transcribed by exactly one of them.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from actors.runtime import Actor, StartupError, main
from bus.client import BusClient
from bus.schema import UTTERANCE, Control, ControlKind, Message, Metric, Transcript, Utterance
from engines.asr import EngineSpec, ModelUnavailable, load_engine
from engines.asr.pipeline import Recognition, Recognizer, check_pcm
from engines.asr.speech_probs import SpeechProbabilities

T = TypeVar("T")
PROGRESS_EVERY_S = 3.0  # a "still loading" line this often while a model loads
NO_SPEECH = "no_speech"


@dataclass(slots=True)
class _Pause:
    """A session's latest pause partial: its audio and, once known, its recognition."""

    utterance: Utterance
    result: Recognition | None = None
    done_at: float = 0.0  # time.perf_counter() when the recognition ended
    running: bool = True
    # the turn's utterance, arrived while the recognition ran, and when it arrived
    final: tuple[Utterance, float] | None = None

    def holds(self, msg: Utterance) -> bool:
        """Whether ``msg``, a turn's utterance, has exactly this audio's speech."""
        pause, voiced = self.utterance, msg.voiced_bytes
        return (pause.turn == msg.turn and 0 < voiced <= len(pause.pcm)
                and pause.pcm[:voiced] == msg.pcm[:voiced])


class Asr(Actor):
    """Speech to text with Whisper (faster-whisper by default, or transformers)."""

    name = "asr"
    topics = (UTTERANCE,)
    groups = ("asr",)
    description = "Speech recognition: utterance -> transcript (Whisper)."

    def __init__(self, settings: argparse.Namespace, bus: BusClient) -> None:
        super().__init__(settings, bus)
        self.spec = EngineSpec(backend=settings.asr_backend, model=settings.asr_model,
                               device=settings.asr_device, language=settings.asr_language,
                               cache_dir=settings.asr_cache_dir,
                               threads=max(0, settings.asr_threads))
        self.recognizer: Recognizer
        # two threads: one for the live recognition, one for an abandoned call finishing
        self._worker = ThreadPoolExecutor(max_workers=2, thread_name_prefix="asr")
        self._live = asyncio.Semaphore(1)  # recognitions someone waits for: one at a time
        self._rejected: collections.Counter[str] = collections.Counter()
        self._working = 0  # model calls running now, abandoned ones included
        self._working_lock = threading.Lock()  # the worker threads count them
        self._waiting = 0  # utterances (not partial) queued or being decoded
        self._pauses: dict[str, _Pause] = {}  # per session, its latest pause partial
        # per session, its turn's VAD probabilities so far: each chunk's VAD runs once a turn
        self._probs: dict[str, tuple[int, SpeechProbabilities]] = {}

    @property
    def _busy(self) -> bool:
        return self._working > 0 or self._waiting > 0

    async def prepare(self) -> None:
        self.log.info("asr_loading", backend=self.spec.backend, model=self.spec.model,
                      device=self.spec.device)
        started = time.perf_counter()
        try:
            engine = await self._in_worker(load_engine, self.spec, waiting="asr_still_loading")
        except ModelUnavailable as exc:
            self._worker.shutdown(wait=False)
            raise StartupError(str(exc)) from None
        load_ms = (time.perf_counter() - started) * 1000
        min_speech_s = max(0, self.settings.asr_min_speech_ms) / 1000
        self.recognizer = Recognizer(engine, min_speech_s=min_speech_s)
        started = time.perf_counter()
        await self._in_worker(self.recognizer.warm_up, waiting="asr_still_warming_up")
        self.log.info("asr_loaded", model=engine.name, device=engine.device,
                      load_ms=round(load_ms), warm_ms=round((time.perf_counter() - started) * 1000))

    async def background(self) -> None:
        try:
            await asyncio.Event().wait()  # the worker thread lives as long as the actor
        finally:
            self._worker.shutdown(wait=False, cancel_futures=True)

    async def handle(self, msg: Message) -> None:
        if not isinstance(msg, Utterance):
            return
        problem = check_pcm(msg.pcm, msg.sample_rate)
        if problem:
            self._reject(msg, problem)
            return
        received = time.perf_counter()
        if msg.partial and msg.pause:  # newer audio than any job of the session: it replaces it
            pause = self._pauses[msg.session] = _Pause(msg)
            self.jobs.start(msg.session, msg.turn, self._transcribe_pause(pause))
            return
        if msg.partial:
            # the latest words are worth it only if they come at once, and never in place of
            # a job of the session (an utterance that has not reached the worker yet)
            if not self._busy and not self.jobs.running(msg.session):
                self.jobs.start(msg.session, msg.turn, self._transcribe_partial(msg))
            return
        pause = self._pauses.pop(msg.session, None)  # the turn's utterance settles it either way
        if pause is not None and pause.holds(msg):
            if pause.result is not None:
                self.jobs.start(msg.session, msg.turn,
                                self._publish(msg, pause.result, received, reused=True,
                                              ahead_s=received - pause.done_at))
                return
            if pause.running and self.jobs.running(msg.session):
                pause.final = (msg, received)  # its recognition answers for the turn when done
                return
        self.jobs.start(msg.session, msg.turn, self._transcribe(msg, received))

    async def interrupted(self, session: str, turn: int) -> None:
        await super().interrupted(session, turn)
        self._pauses.pop(session, None)

    async def session_ended(self, session: str) -> None:
        await super().session_ended(session)
        self._pauses.pop(session, None)
        self._probs.pop(session, None)

    def _turn_probs(self, msg: Utterance) -> SpeechProbabilities:
        """The VAD's memory of ``msg``'s turn: its partials and its utterance share a start."""
        kept = self._probs.get(msg.session)
        if kept is None or kept[0] != msg.turn:
            kept = self._probs[msg.session] = (msg.turn, SpeechProbabilities())
        return kept[1]

    async def _recognise(self, msg: Utterance) -> Recognition:
        """``msg`` through the recogniser in a worker thread. When the job is cancelled (the
        turn's utterance replaces a partial one, or an interrupt), the thread is told to stop at
        its next stage and finishes it on its own: the next recognition starts at once, beside
        it."""
        stop = threading.Event()
        try:
            async with self._live:  # released at a cancel: the next one need not wait
                return await self._in_worker(self.recognizer.recognise, msg.pcm,
                                             msg.sample_rate, stop.is_set, self._turn_probs(msg))
        except asyncio.CancelledError:
            stop.set()
            self.log.debug("asr_cancelled", session=msg.session, turn=msg.turn,
                           partial=msg.partial)
            raise

    async def _transcribe_partial(self, msg: Utterance) -> None:
        self._publish_partial(msg, await self._recognise(msg))

    async def _transcribe_pause(self, pause: _Pause) -> None:
        """A pause partial: its words, as the turn's transcript if the turn's utterance came
        meanwhile with the same speech, else as a partial one."""
        msg = pause.utterance
        self._waiting += 1  # likely the turn's end: plain partials do not start meanwhile
        try:
            pause.result = await self._recognise(msg)
            pause.done_at = time.perf_counter()
        finally:
            self._waiting -= 1
            pause.running = False
        if pause.final is not None:
            final, received = pause.final
            await self._publish(final, pause.result, received, reused=True)
        else:
            self._publish_partial(msg, pause.result)

    def _publish_partial(self, msg: Utterance, result: Recognition) -> None:
        """The words so far of a turn still being spoken; a pause's as they are, since the
        turn may end there (the LLM then computes its whole request before it does)."""
        # a plain partial is cut mid-sentence: Whisper's full stop there is not one
        words = result.text if msg.pause else result.text.rstrip(".?!…")
        if self.turns.current(msg.session) != msg.turn or not words:
            return
        self.publish(Transcript(session=msg.session, turn=msg.turn, text=words,
                                language=result.language or self.spec.language,
                                asr_ms=result.asr_ms, audio_s=result.audio_s, partial=True,
                                pause=msg.pause))
        self.log.debug("asr_partial", session=msg.session, turn=msg.turn, pause=msg.pause,
                       audio_s=round(result.audio_s, 2), whisper_ms=round(result.asr_ms))

    async def _transcribe(self, msg: Utterance, received: float) -> None:
        self._waiting += 1
        try:
            result = await self._recognise(msg)
        finally:
            self._waiting -= 1
        await self._publish(msg, result, received)

    async def _publish(self, msg: Utterance, result: Recognition, received: float,
                       reused: bool = False, ahead_s: float = 0.0) -> None:
        """The turn's transcript (or ``no_speech``) from ``result``; ``reused`` when a pause
        partial's recognition stands for the turn's utterance, ``ahead_s`` how long before the
        utterance came that recognition was ready (the turn's end, not Whisper, was the wait)."""
        if self.turns.current(msg.session) != msg.turn:
            return  # interrupted while the model ran: nobody waits for this any more
        total_ms = (time.perf_counter() - received) * 1000
        fields = {"session": msg.session, "turn": msg.turn, "ms": round(total_ms),
                  "audio_s": round(result.audio_s, 2), "speech_s": round(result.speech_s, 2),
                  "vad_ms": round(result.vad_ms, 1), "whisper_ms": round(result.asr_ms),
                  "from_pause": reused, "ready_before_ms": round(ahead_s * 1000)}
        if not result.text:
            self.log.info("asr_no_speech", reason=result.reason, **fields)
            self.publish(Control(session=msg.session, turn=msg.turn, kind=ControlKind.STATE,
                                 state=NO_SPEECH, text=result.reason))
            return
        self.publish(Transcript(session=msg.session, turn=msg.turn, text=result.text,
                                language=result.language or self.spec.language,
                                asr_ms=total_ms, audio_s=result.audio_s))
        self.publish(Metric(session=msg.session, turn=msg.turn, stage="transcript",
                            at=time.time(), ms=total_ms))
        self.log.info("asr_transcript", chars=len(result.text), **fields)
        self.log.debug("asr_text", session=msg.session, turn=msg.turn, text=result.text)

    def _reject(self, msg: Utterance, reason: str) -> None:
        """Drop unusable audio: warn on the first of each kind, count the rest quietly."""
        self._rejected[reason] += 1
        log = self.log.warning if self._rejected[reason] == 1 else self.log.debug
        log("asr_utterance_rejected", session=msg.session, turn=msg.turn, reason=reason,
            sample_rate=msg.sample_rate, pcm_bytes=len(msg.pcm), count=self._rejected[reason])
        self.publish(Control(session=msg.session, turn=msg.turn, kind=ControlKind.STATE,
                             state=NO_SPEECH, text=reason))

    def _run(self, fn: Callable[..., T], *args: object) -> T:
        """In a worker thread: ``fn``, counted while it runs."""
        with self._working_lock:
            self._working += 1
        try:
            return fn(*args)
        finally:
            with self._working_lock:
                self._working -= 1

    async def _in_worker(self, fn: Callable[..., T], *args: object, waiting: str = "") -> T:
        """Run ``fn`` in the worker thread; log ``waiting`` every few seconds until it is done."""
        future = asyncio.get_running_loop().run_in_executor(self._worker, self._run, fn, *args)
        if not waiting:
            return await future
        started = time.monotonic()
        while True:
            done, _ = await asyncio.wait({future}, timeout=PROGRESS_EVERY_S)
            if done:
                return future.result()
            self.log.info(waiting, elapsed_s=round(time.monotonic() - started))


if __name__ == "__main__":
    raise SystemExit(main(Asr))
