"""The one interface every language-model backend implements, and the errors it may raise.

A backend turns a chat (text messages, plus at most one picture for the last user message) into a
stream of text deltas. Stopping early is closing the stream: ``async with aclosing(...)``, or
cancelling the task that iterates it, must stop the generation at once and free the model.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, TypedDict


class ChatMessage(TypedDict):
    """One message of a chat, text only (pictures never enter the history)."""

    role: str  # system | user | assistant
    content: str


class ModelUnavailable(RuntimeError):
    """The chosen model cannot be found or loaded; the message says what to install or set."""


class LLMError(RuntimeError):
    """A reply failed; ``text`` is for the page, ``spoken`` a short apology for the voice.

    ``kind`` names the cause for logs and tests: auth, rate_limit, timeout, connection,
    not_found, bad_request, server, stream, local.
    """

    def __init__(self, kind: str, text: str, spoken: str = "") -> None:
        super().__init__(text)
        self.kind = kind
        self.text = text
        self.spoken = spoken or "Sorry, I could not answer that. Please try again."


class Pause:
    """Holds a local generation between two tokens, for a bounded time.

    A local model shares the CPU with speech synthesis: while the reply's first sentence is
    being synthesised, tokens for later sentences only slow down the first sound. The caller
    holds the generation (:meth:`hold`) and lets it go (:meth:`release`); the generating thread
    calls :meth:`wait` after each token. Thread-safe; a remote backend ignores it.
    """

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()
        self._until = 0.0  # time.monotonic() at which a hold lapses by itself

    def hold(self, limit_s: float) -> None:
        if limit_s > 0:
            self._until = time.monotonic() + limit_s
            self._open.clear()

    def release(self) -> None:
        self._open.set()

    def wait(self) -> None:
        """Block while held, at most until the hold lapses."""
        if not self._open.is_set():
            self._open.wait(max(0.0, self._until - time.monotonic()))


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """Which backend and model to use, and how (from the ``llm`` config group)."""

    backend: str = "auto"  # auto | openai | local
    base_url: str = ""
    api_key: str = ""
    model: str = ""  # openai model name, or Hugging Face id / folder / .gguf file (local)
    device: str = "auto"  # cpu | cuda | auto (local)
    max_tokens: int = 160
    image_detail: str = "low"  # low | high | auto
    timeout: float = 30.0  # seconds without an answer before a request is abandoned
    retries: int = 2  # extra attempts after a rate limit, server error or refused connection
    cache_dir: str = "cache"
    threads: int = 1  # CPU threads for the local model (0: torch's default)
    cache_sessions: int = 4  # sessions whose key/value cache the local model keeps
    engine: str = "auto"  # auto | llama.cpp | torch | transformers (local)
    prompt_threads: int = 2  # llama.cpp's threads for a turn's prompt
    fast: bool = True  # the lean Llama pass (local); False: always transformers ``generate``
    half_decode: bool = True  # the lean pass computes from fp16 weight copies (CPU)

    @property
    def resolved(self) -> str:
        """The backend ``auto`` stands for: openai when an endpoint or key is given."""
        if self.backend != "auto":
            return self.backend
        return "openai" if self.base_url or self.api_key else "local"


class LLMBackend(Protocol):
    """A loaded model behind a streaming chat call."""

    name: str  # backend:model, for logs and the benchmark
    can_see: bool  # whether a picture in the request is used (may turn False on first refusal)

    async def load(self) -> None:
        """Load (and convert, the first time) the model; raises :class:`ModelUnavailable`."""
        ...

    async def warm(self, system: str = "") -> None:
        """One tiny generation under the system prompt ``system``, so the first real turn pays
        no start-up cost (a local model also keeps the prompt's computed prefix)."""
        ...

    def stream(self, messages: list[ChatMessage], image: bytes | None = None,
               session: str | None = None, pause: Pause | None = None) -> AsyncIterator[str]:
        """Text deltas of the reply to ``messages``; ``image`` (JPEG) goes with the last one.

        ``session`` lets a backend keep state between the turns of one call (the local model
        its key/value cache) until :meth:`forget`. A local model waits on ``pause`` between
        tokens. Raises :class:`LLMError` for every failure a user should hear about.
        """
        ...

    def prepare(self, session: str, messages: list[ChatMessage], words: str = "",
                complete: bool = False) -> None:
        """The next request of ``session`` will start with ``messages`` (then a user message
        that begins with ``words``, when given: what the user has said so far), or, when
        ``complete``, likely be ``messages`` exactly: a backend may compute what it can now
        (the local model, its key/value cache). Never blocks."""
        ...

    def forget(self, session: str) -> None:
        """Drop whatever is kept for ``session`` (its call ended); never blocks."""
        ...

    async def aclose(self) -> None:
        """Free connections and threads."""
        ...
