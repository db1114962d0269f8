"""The language-model actor: a transcript (and the picture of its turn) in, a streamed reply out.

Each text delta goes out as a ``token`` at once (the page shows it); each speakable sentence goes
out as a ``sentence`` the moment it is complete (the voice starts on it), the last one marked
``final``. A newer turn, an interrupt or the end of the session cancels the reply: the job is
cancelled, the backend's generation stopped, and every publish checks that its turn is still
the session's current one, so nothing of an old turn follows.

A local model shares the CPU with speech synthesis: once the first sentence is out, its
generation is held (``--llm-yield-ms`` at most) until the TTS reports the turn's first packet, so
that first sound comes sooner; later sentences are needed only after it has been heard.

History: the user's words and the reply are recorded when the turn ends, however it ends; an
interrupted reply is kept as far as it was produced, and a turn that produced nothing is dropped.
Pictures are never kept; a frame is attached only to the user message of its own turn, and only
for a backend that can see.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from actors.runtime import Actor, StartupError, main
from bus.client import BusClient
from bus.schema import (
    CONTROL,
    FRAME,
    METRICS,
    TRANSCRIPT,
    Control,
    ControlKind,
    Frame,
    Message,
    Metric,
    Sentence,
    Token,
    Transcript,
)
from engines.llm import (
    BackendSpec,
    ChatMessage,
    LLMBackend,
    LLMError,
    ModelUnavailable,
    Pause,
    make_backend,
)
from engines.llm.history import History, default_prompt
from engines.llm.sentences import SpeechChunker

MAX_SESSIONS = 512  # state kept for sessions whose end was never announced
FAILED_SPOKEN = "Sorry, something went wrong on my side. Please try again."


SCREEN_NOTE = "(The picture is my shared screen, not my camera.)"


@dataclass(slots=True)
class Exchange:
    """The user's words of a turn and the reply produced for them so far."""

    user: str
    turn: int = 0
    reply: list[str] = field(default_factory=list)


@dataclass(slots=True)
class SessionState:
    """What the actor remembers about one call."""

    history: History
    frame: Frame | None = None  # the latest picture of the session
    turn: int = 0  # the latest turn a reply was started for
    pending: Exchange | None = None  # the exchange of the reply in progress
    pause: Pause = field(default_factory=Pause)  # of the reply in progress
    committed: int = 0  # the turn of the history's last exchange, while it may still be void
    seen: set[str] = field(default_factory=set)  # problems already logged for this session

    def commit(self, exchange: Exchange | None = None) -> None:
        """Move the pending exchange (if it is ``exchange``, when given) into the history.

        Called when a reply ends and, synchronously, before the next reply reads the history,
        so an interrupted reply is recorded even while its cancellation is still unwinding.
        """
        if self.pending is not None and (exchange is None or self.pending is exchange):
            if self.history.add(self.pending.user, "".join(self.pending.reply)):
                self.committed = self.pending.turn
            self.pending = None

    def forget(self, turn: int) -> None:
        """``turn`` was void (an early end the user spoke on through): its words and reply
        leave the history, or never enter it."""
        if self.pending is not None and self.pending.turn == turn:
            self.pending = None
        elif self.committed == turn:
            self.history.drop_last()
            self.committed = 0


class LLMActor(Actor):
    """Streams replies from a language model, cut into speakable sentences."""

    name = "llm"
    topics = (TRANSCRIPT, FRAME, METRICS, CONTROL)
    groups = ("llm",)

    def __init__(self, settings: argparse.Namespace, bus: BusClient) -> None:
        super().__init__(settings, bus)
        self.spec = BackendSpec(
            backend=settings.llm_backend, base_url=settings.llm_base_url,
            api_key=settings.llm_api_key, model=settings.llm_model, device=settings.llm_device,
            max_tokens=max(1, settings.llm_max_tokens), image_detail=settings.llm_image_detail,
            timeout=max(0.1, settings.llm_timeout), retries=max(0, settings.llm_retries),
            cache_dir=settings.cache_dir, threads=max(0, settings.llm_threads),
            cache_sessions=max(0, settings.llm_cache_sessions), engine=settings.llm_engine,
            prompt_threads=max(1, settings.llm_prompt_threads))
        self.backend: LLMBackend | None = None
        self._sessions: dict[str, SessionState] = {}
        self._told_blind = False

    async def prepare(self) -> None:
        try:
            backend = make_backend(self.spec)
            await backend.load()
            await backend.warm(self._system_prompt(backend))
        except ModelUnavailable as exc:
            raise StartupError(str(exc)) from None
        self.backend = backend
        self.log.info("llm_backend", backend=backend.name, can_see=backend.can_see,
                      max_tokens=self.spec.max_tokens)

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            if self.backend is not None:
                await self.backend.aclose()

    # -- messages

    async def handle(self, msg: Message) -> None:
        if isinstance(msg, Frame):
            self._state(msg.session).frame = msg
        elif isinstance(msg, Transcript) and msg.partial:
            self._read_ahead(msg)
        elif isinstance(msg, Transcript):
            self._start_reply(msg)
        elif isinstance(msg, Control):
            if msg.kind == ControlKind.INTERRUPT and msg.text == "void":
                state = self._sessions.get(msg.session)
                if state is not None:
                    state.forget(msg.turn - 1)
        elif isinstance(msg, Metric) and msg.stage == "first_packet":
            state = self._sessions.get(msg.session)
            if state is not None and state.turn == msg.turn:
                state.pause.release()  # the reply is being heard: on with the rest of it

    async def session_ended(self, session: str) -> None:
        self.jobs.cancel(session)
        self._sessions.pop(session, None)
        if self.backend is not None:
            self.backend.forget(session)

    def _system_prompt(self, backend: LLMBackend) -> str:
        return self.settings.llm_system_prompt or default_prompt(backend.can_see)

    def _state(self, session: str) -> SessionState:
        state = self._sessions.get(session)
        if state is None:
            while len(self._sessions) >= MAX_SESSIONS:
                oldest = next(iter(self._sessions))
                self.jobs.cancel(oldest)
                del self._sessions[oldest]
                if self.backend is not None:
                    self.backend.forget(oldest)
            state = SessionState(History(self.settings.llm_history_turns))
            self._sessions[session] = state
        return state

    def _read_ahead(self, msg: Transcript) -> None:
        """The words so far of a turn still being spoken: a local model computes them now, so
        that the turn's end leaves it only the rest of the prompt. The words at a pause are
        likely the whole turn: then the whole request is computed, as the reply will send it."""
        state = self._sessions.get(msg.session)
        words = msg.text.strip()
        if (self.backend is None or not words or self.jobs.running(msg.session)
                or (state is not None and msg.turn <= state.turn)):
            return  # no model, nothing said, or a reply still running (it has the worker)
        state = self._state(msg.session)
        state.commit()  # the previous reply is over (its turn was interrupted or it ended)
        system = self._system_prompt(self.backend)
        if msg.pause:
            self.backend.prepare(msg.session, state.history.messages(system, words),
                                 complete=True)
        else:
            self.backend.prepare(msg.session, state.history.prefix(system), words=words)

    def _start_reply(self, msg: Transcript) -> None:
        state = self._state(msg.session)
        if not msg.text.strip():
            if "empty" not in state.seen:
                state.seen.add("empty")
                self.log.warning("llm_empty_transcript", session=msg.session, turn=msg.turn)
            return
        if 0 < msg.turn <= state.turn:  # this turn was answered (or is being answered)
            self.log.warning("llm_duplicate_transcript", session=msg.session, turn=msg.turn)
            return
        assert self.backend is not None
        frame = state.frame if state.frame is not None and state.frame.turn == msg.turn else None
        image = frame.jpeg if frame is not None and self.backend.can_see else None
        if frame is not None and image is None and not self._told_blind:
            self._told_blind = True
            self.log.info("llm_cannot_see", backend=self.backend.name, session=msg.session,
                          note="this model takes no pictures: frames are ignored")
        state.turn = msg.turn
        state.commit()  # the previous reply, however far it got
        messages = state.history.messages(self._system_prompt(self.backend), msg.text.strip())
        if image is not None and frame is not None and frame.kind == "screen":
            # Said to this request only (history keeps the words): the picture is no face.
            messages[-1] = {**messages[-1],
                            "content": f"{SCREEN_NOTE} {messages[-1]['content']}"}
        exchange = state.pending = Exchange(msg.text, msg.turn)
        state.pause.release()  # whatever the previous reply was waiting for
        state.pause = Pause()
        self.jobs.start(msg.session, msg.turn,
                        self._reply(msg, state, exchange, messages, image, time.time()))

    # -- one reply

    async def _reply(self, msg: Transcript, state: SessionState, exchange: Exchange,
                     messages: list[ChatMessage], image: bytes | None, received: float) -> None:
        assert self.backend is not None
        session, turn = msg.session, msg.turn
        log = self.log.bind(session=session, turn=turn)
        chunker = SpeechChunker()
        reply = exchange.reply
        pause = state.pause
        counts = {"token": 0, "sentence": 0}
        first: dict[str, float] = {}  # when the first token came; the first sentence's figures
        drafted = ""  # the first sentence's draft out now

        def live() -> bool:
            return self.turns.current(session) == turn and self._sessions.get(session) is state

        def metric(stage: str) -> None:
            now = time.time()
            self.publish(Metric(session=session, turn=turn, stage=stage, at=now,
                                ms=(now - received) * 1000))

        def say(text: str, final: bool = False) -> None:
            if not live():
                return
            self.publish(Sentence(session=session, turn=turn, text=text,
                                  index=counts["sentence"], final=final))
            if counts["sentence"] == 0 and text:
                metric("first_sentence")
                first["sentence_tokens"] = counts["token"]
                first["sentence_ms"] = round((time.time() - first.get("token", time.time()))
                                             * 1000)
                if not final:  # more to come, but after the first sound
                    pause.hold(self.settings.llm_yield_ms / 1000)
            counts["sentence"] += 1

        def draft() -> None:
            """The first sentence, as far as the next token alone can tell it, to the voice
            now (withdrawn when that token continues it): its synthesis starts one token
            sooner. Only the first: the voice waits for no later sentence."""
            nonlocal drafted
            if counts["sentence"]:
                return
            text = chunker.draft() or ""
            if text != drafted and live():
                drafted = text
                self.publish(Sentence(session=session, turn=turn, text=text, index=0,
                                      draft=True))

        log.info("llm_turn", chars=len(msg.text), history=len(state.history),
                 image=image is not None)
        try:
            async with contextlib.aclosing(
                    self.backend.stream(messages, image, session=session,
                                        pause=pause)) as stream:
                async for delta in stream:
                    if not live():
                        return
                    reply.append(delta)
                    self.publish(Token(session=session, turn=turn, text=delta,
                                       index=counts["token"]))
                    if counts["token"] == 0:
                        metric("first_token")
                        first["token"] = time.time()
                    counts["token"] += 1
                    for sentence in chunker.feed(delta):
                        say(sentence)
                    draft()
            rest = chunker.flush()
            for i, sentence in enumerate(rest):
                say(sentence, final=i == len(rest) - 1)
            if not rest:
                say("", final=True)
            log.info("llm_reply", tokens=counts["token"], sentences=counts["sentence"],
                     ms=round((time.time() - received) * 1000),
                     first_sentence_tokens=first.get("sentence_tokens"),
                     first_sentence_ms=first.get("sentence_ms"))
            state.commit(exchange)
            if live():  # while the reply is spoken, the backend may compute the next prompt
                self.backend.prepare(session, state.history.prefix(self._system_prompt(
                    self.backend)))
        except asyncio.CancelledError:
            log.info("llm_interrupted", tokens=counts["token"], sentences=counts["sentence"])
            raise
        except LLMError as exc:
            log.warning("llm_failed", kind=exc.kind, error=exc.text)
            if live():
                self.report_error(session, turn, exc.text)
                say(exc.spoken, final=True)
        except Exception as exc:
            log.error("llm_crashed", error=repr(exc), exc_info=exc)
            if live():
                self.report_error(session, turn, f"The language model failed: {exc}")
                say(FAILED_SPOKEN, final=True)
        finally:
            pause.release()
            state.commit(exchange)


if __name__ == "__main__":
    raise SystemExit(main(LLMActor))
