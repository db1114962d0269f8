"""TTS actor: the reply's sentences in, 20 ms Opus packets out, in order, stopped at a barge-in.

Each turn of a session is one job (:class:`TurnSpeech`). Its sentences are synthesised by the
backend (up to ``backend.concurrency`` at once) and published strictly in sentence order, every
packet as soon as it exists; ``OpusPacket.index`` counts through the whole turn and the turn's
last packet carries ``final``. A *draft* (the LLM's first sentence before the token that
confirms its end) is synthesised at once but held: the sentence of its index, with the same
text, makes its audio that sentence's; any other text, or an empty draft, drops it. A newer
turn, an interrupt or the end of the session cancels the job: the runtime cancels it before it
can publish anything more.

``python -m actors.tts --tts-backend piper|openai``
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass
from typing import Final

from actors.runtime import Actor, StartupError, main
from bus.client import BusClient
from bus.schema import OPUS_SILENCE, SENTENCE, Message, Metric, OpusPacket, Sentence
from engines.tts import (
    BackendSpec,
    BackendUnavailable,
    Packet,
    SynthesisError,
    TtsBackend,
    make_backend,
)
from engines.tts.base import OPUS_RATE
from engines.tts.normalize import for_speech

# Most audio published ahead of real time: the media actor plays at 20 ms a packet, so a
# runaway text (a huge sentence) is not turned into an hour of packets queued on the bus.
MAX_LEAD_S: Final = 30.0
GAP_WAIT_S: Final = 1.0  # how long a missing sentence is awaited before the next one is spoken
SENTENCE_BUFFER: Final = 100  # packets buffered per sentence ahead of publishing
MAX_PACKET_BYTES: Final = 4000  # far above any real 20 ms packet; below the bus's 8 KB limit
INLINE_NORMALIZE_CHARS: Final = 2000  # longer texts are normalised off the event loop
SILENCE: Final = Packet(OPUS_SILENCE, 960)
_END: Final = object()


@dataclass(slots=True)
class _Draft:
    """A draft sentence and its synthesis (``task`` None until it starts)."""

    sentence: Sentence
    queue: asyncio.Queue[object]
    task: asyncio.Task[None] | None = None


class TurnSpeech:
    """One turn of one session: sentences in (any order), packets out in sentence order."""

    def __init__(self, actor: TtsActor, session: str, turn: int) -> None:
        self.session = session
        self.turn = turn
        self.finished = False
        self._actor = actor
        self._backend: TtsBackend = actor.backend
        self._log = actor.log.bind(session=session, turn=turn)
        self._waiting: dict[int, Sentence] = {}
        self._outputs: dict[int, tuple[Sentence, asyncio.Queue[object]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._tg: asyncio.TaskGroup | None = None
        self._wake = asyncio.Event()
        self._next_launch = 0  # sentence indexes start at 0 in every turn
        self._next_play = 0
        self._final_index: int | None = None
        self._draft: _Draft | None = None
        self._in_flight = 0
        self._packets = 0
        self._samples = 0
        self._first_mono: float | None = None
        self._received_at = time.time()
        self._reported = False

    # -- input (from Actor.handle, on the loop)

    def add(self, sentence: Sentence) -> None:
        if sentence.draft:
            self._set_draft(sentence)
            return
        index = sentence.index
        if self.finished or (self._final_index is not None and index > self._final_index):
            self._log.warning("sentence_after_final", index=index)
            return
        if index < self._next_launch or index in self._waiting:
            self._log.warning("sentence_duplicate", index=index)
            return
        if self._draft is not None and self._draft.sentence.index == index:
            draft, self._draft = self._draft, None
            if (draft.task is not None and draft.sentence.text == sentence.text
                    and index == self._next_launch):  # the draft's audio is this sentence's
                self._outputs[index] = (sentence, draft.queue)
                self._next_launch += 1
                if sentence.final:
                    self._final_index = index
                self._log.debug("draft_kept", index=index)
                self._launch()
                self._wake.set()
                return
            self._drop(draft)
        self._waiting[index] = sentence
        if sentence.final:
            self._final_index = index
        self._launch()
        self._wake.set()

    # -- the job

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self._launch()
                await self._play()
                for task in self._tasks:  # producers of sentences past a (late) final one
                    task.cancel()
        finally:
            self._tg = None
            self.finished = True

    def _set_draft(self, sentence: Sentence) -> None:
        """A new draft replaces the one before (an empty one only withdraws it); it is spoken
        only as the next sentence to start."""
        if self._draft is not None:
            self._drop(self._draft)
            self._draft = None
        if (sentence.text and not self.finished and sentence.index == self._next_launch
                and sentence.index not in self._waiting):
            self._draft = _Draft(sentence, asyncio.Queue(maxsize=SENTENCE_BUFFER))
            self._launch()

    def _drop(self, draft: _Draft) -> None:
        """Stop a draft's synthesis; once it has stopped its slot goes to the next sentence."""
        self._log.debug("draft_dropped", index=draft.sentence.index)
        if draft.task is not None:
            draft.task.cancel()
            draft.task.add_done_callback(lambda _: self._launch())

    def _launch(self) -> None:
        """Start producers for the next sentences in index order, within the concurrency (a
        draft's first, as it is the next sentence's)."""
        if self._tg is None or self._actor.turns.current(self.session) != self.turn:
            return
        draft = self._draft
        if (draft is not None and draft.task is None
                and self._in_flight < self._backend.concurrency):
            draft.task = self._tg.create_task(self._produce_draft(draft))
            self._tasks.append(draft.task)
        while (self._next_launch in self._waiting
               and self._in_flight < self._backend.concurrency):
            sentence = self._waiting.pop(self._next_launch)
            queue: asyncio.Queue[object] = asyncio.Queue(maxsize=SENTENCE_BUFFER)
            self._outputs[sentence.index] = (sentence, queue)
            self._in_flight += 1
            self._tasks.append(self._tg.create_task(self._produce(sentence, queue)))
            self._next_launch += 1
            self._wake.set()  # the player may be waiting for this one (a slot came free late)

    async def _produce_draft(self, draft: _Draft) -> None:
        """A draft's producer takes its slot only once it runs: a draft withdrawn at once is
        cancelled before its first step, and then no ``finally`` of it runs to give it back."""
        self._in_flight += 1
        await self._produce(draft.sentence, draft.queue)

    async def _produce(self, sentence: Sentence, queue: asyncio.Queue[object]) -> None:
        started = time.perf_counter()
        try:
            await self._synthesize(sentence, queue)
        except asyncio.CancelledError:
            self._log.debug("synthesis_cancelled", index=sentence.index,
                            ms=round((time.perf_counter() - started) * 1000))
            raise
        finally:
            self._in_flight -= 1
        self._log.debug("sentence_synthesised", index=sentence.index,
                        ms=round((time.perf_counter() - started) * 1000))
        self._launch()
        await queue.put(_END)

    async def _synthesize(self, sentence: Sentence, queue: asyncio.Queue[object]) -> None:
        """Feed ``queue`` with the sentence's packets; a failure ends the sentence, not the turn."""
        try:
            text = await _normalize(sentence.text)
            if not text:
                if sentence.text.strip():
                    self._log.info("sentence_unspeakable", index=sentence.index,
                                   chars=len(sentence.text))
                return
            await self._backend.synthesize(text, queue.put)
        except SynthesisError as exc:
            self._failed(sentence, str(exc))
        except Exception as exc:  # a backend bug must not take the turn (or the actor) down
            self._log.error("synthesis_failed", index=sentence.index, error=repr(exc),
                            exc_info=exc)
            self._failed(sentence, f"speech synthesis failed: {exc}")

    def _failed(self, sentence: Sentence, text: str) -> None:
        self._log.warning("sentence_not_spoken", index=sentence.index, error=text)
        if not self._reported:  # one message to the page per turn is enough
            self._reported = True
            self._actor.report_error(self.session, self.turn, text)

    async def _play(self) -> None:
        while True:
            sentence, queue = await self._next_sentence()
            await self._play_sentence(sentence, queue)
            if sentence.final:
                return
            self._next_play += 1
            self._launch()

    async def _next_sentence(self) -> tuple[Sentence, asyncio.Queue[object]]:
        """The producer of the sentence to speak next, skipping one that never came."""
        while True:
            entry = self._outputs.pop(self._next_play, None)
            if entry is not None:
                return entry
            self._wake.clear()
            if not self._waiting:
                await self._wake.wait()
                continue
            try:  # a later sentence is here but this one is not: give it a moment
                async with asyncio.timeout(GAP_WAIT_S):
                    while self._next_play not in self._outputs:
                        self._wake.clear()
                        await self._wake.wait()
            except TimeoutError:
                skip_to = min(self._waiting)
                self._log.warning("sentence_missing", index=self._next_play, skipped_to=skip_to)
                self._next_play = self._next_launch = skip_to
                self._launch()

    async def _play_sentence(self, sentence: Sentence, queue: asyncio.Queue[object]) -> None:
        """Publish a sentence's packets as they come; hold one back to mark the turn's last."""
        held: Packet | None = None
        first_index = self._packets
        while (item := await queue.get()) is not _END:
            assert isinstance(item, Packet)
            if not sentence.final:
                await self._send(item, sentence, final=False)
                continue
            if held is not None:
                await self._send(held, sentence, final=False)
            held = item
        if sentence.final:
            await self._send(held or SILENCE, sentence, final=True)
        self._log.debug("sentence_spoken", index=sentence.index,
                        packets=self._packets - first_index, final=sentence.final)
        if sentence.final:
            self._log.info("turn_spoken", packets=self._packets,
                           audio_ms=round(self._samples * 1000 / OPUS_RATE),
                           ms=round((time.time() - self._received_at) * 1000))

    async def _send(self, packet: Packet, sentence: Sentence, *, final: bool) -> None:
        if len(packet.data) > MAX_PACKET_BYTES:
            self._log.warning("packet_oversized", bytes=len(packet.data))
            if not final:
                return
            packet = SILENCE
        if self._first_mono is not None:
            lead = self._samples / OPUS_RATE - (time.monotonic() - self._first_mono)
            if lead > MAX_LEAD_S:
                await asyncio.sleep(lead - MAX_LEAD_S)
        if self._actor.turns.current(self.session) != self.turn:
            return  # superseded (the runtime cancels this job first; never publish stale audio)
        now = time.time()  # taken before publishing: media may send the packet at once
        self._actor.publish(OpusPacket(session=self.session, turn=self.turn, packet=packet.data,
                                       index=self._packets, samples=packet.samples,
                                       sentence=sentence.index, final=final))
        if self._first_mono is None:
            self._first_mono = time.monotonic()
            ms = (now - self._received_at) * 1000
            self._actor.publish(Metric(session=self.session, turn=self.turn,
                                       stage="first_packet", at=now, ms=ms))
            self._log.info("first_packet", ms=round(ms))
        self._packets += 1
        self._samples += packet.samples


async def _normalize(text: str) -> str:
    """Text for the voice; long texts are rewritten in a worker thread (regexes over 64 KB)."""
    if len(text) <= INLINE_NORMALIZE_CHARS:
        return for_speech(text)
    return await asyncio.to_thread(for_speech, text)


class TtsActor(Actor):
    """Speaks the assistant's sentences: Opus packets for the media actor to play."""

    name = "tts"
    topics = (SENTENCE,)
    groups = ("tts", "llm")  # llm: the endpoint and key an OpenAI TTS shares by default

    def __init__(self, settings: argparse.Namespace, bus: BusClient) -> None:
        super().__init__(settings, bus)
        self.backend: TtsBackend
        self._speech: dict[str, TurnSpeech] = {}

    async def prepare(self) -> None:
        s = self.settings
        spec = BackendSpec(backend=s.tts_backend, voice=s.tts_voice, model=s.tts_model,
                           speed=s.tts_speed, base_url=s.tts_base_url or s.llm_base_url,
                           api_key=s.llm_api_key, timeout=s.llm_timeout,
                           threads=max(0, s.tts_threads), chunk_decoder=s.tts_chunk_decoder)
        try:
            self.backend = make_backend(spec)
            await self.backend.prepare()
        except BackendUnavailable as exc:
            raise StartupError(str(exc)) from None

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            await self.backend.aclose()

    async def handle(self, msg: Message) -> None:
        if not isinstance(msg, Sentence):
            return
        speech = self._speech.get(msg.session)
        if speech is None or speech.turn != msg.turn:
            speech = TurnSpeech(self, msg.session, msg.turn)
            self._speech[msg.session] = speech
            self.jobs.start(msg.session, msg.turn, speech.run())
        speech.add(msg)

    async def interrupted(self, session: str, turn: int) -> None:
        self._stop(session, turn, "interrupt")

    async def session_ended(self, session: str) -> None:
        self._stop(session, self.turns.current(session), "session_end")

    def _stop(self, session: str, turn: int, reason: str) -> None:
        speech = self._speech.pop(session, None)
        cancelled = self.jobs.cancel(session)
        if speech is not None:
            log = self.log.info if cancelled else self.log.debug
            log("speech_stopped", session=session, turn=speech.turn, new_turn=turn,
                          reason=reason, was_speaking=cancelled)


if __name__ == "__main__":
    raise SystemExit(main(TtsActor))
