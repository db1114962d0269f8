"""What every local decoder shares: how a generation is stopped and what a prompt cache is.

Two decoders compute a local model's tokens: :mod:`engines.llm.llama_cpp` (llama.cpp's 4-bit
kernels, for a GGUF file on the CPU) and :mod:`engines.llm.llama_fast` (a lean torch pass over
a loaded Llama). Both keep each session's computed prompt in a cache that
:mod:`engines.llm.prefix_cache` manages through the protocol below, and both raise
:class:`Stopped` when a generation is abandoned.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, Self, TypeVar


class Stopped(Exception):
    """The stop flag was set: the generation is abandoned."""


class StopFlag(Protocol):
    """What a forward pass checks between steps (a ``threading.Event`` is one)."""

    def is_set(self) -> bool: ...


class PromptCache(Protocol):
    """The computed keys and values of one token sequence, ``ids``."""

    ids: list[int]

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions only."""
        ...

    def copy_prefix(self, length: int) -> Self:
        """A new cache holding the first ``length`` positions of this one."""
        ...

    def load_prefix(self, other: Self, length: int) -> None:
        """Replace this cache's contents with the first ``length`` positions of ``other``."""
        ...

    @property
    def nbytes(self) -> int: ...


Logits = TypeVar("Logits")


class Decoder(Protocol[Logits]):
    """Forward passes over :class:`PromptCache` objects, and the choice of the next token."""

    def forward(self, ids: list[int], cache: Any, stop: StopFlag | None = None,
                background: bool = False) -> Logits:
        """Append ``ids`` to ``cache``; the logits after the last of them. Raises
        :class:`Stopped` when ``stop`` is set. ``background``: work ahead of a turn, which
        should leave the other models the CPU and stop soon when the turn comes."""
        ...

    def pick(self, logits: Logits, seen: set[int], repetition_penalty: float) -> int:
        """The most likely token, under transformers' repetition penalty on ``seen``."""
        ...


def greedy(decoder: Decoder[Logits], prompt: list[int], cache: PromptCache,
           max_new_tokens: int, eos: set[int], repetition_penalty: float = 1.0,
           stop: StopFlag | None = None, last: Logits | None = None) -> Iterator[int]:
    """Yield new tokens greedily after ``prompt``, which extends ``cache.ids``.

    ``cache`` must hold a prefix of ``prompt`` (possibly empty); the rest is computed. When it
    holds all of it, ``last`` (the logits after it, if the caller kept them) gives the first
    token at once, else the last position is computed again. The repetition penalty covers
    the prompt and the reply so far, as in transformers' ``generate``. Raises
    :class:`Stopped` when ``stop`` is set.
    """
    past = len(cache.ids)
    assert cache.ids == prompt[:past], "the cache is not a prefix of the prompt"
    todo = prompt[past:]
    if not todo and last is None:  # the whole prompt is cached: its last position again
        cache.truncate(past - 1)
        todo = prompt[past - 1:]
    seen = set(prompt)
    logits = decoder.forward(todo, cache, stop) if todo else last
    for produced in range(max_new_tokens):
        token = decoder.pick(logits, seen, repetition_penalty)
        yield token
        if token in eos or produced + 1 == max_new_tokens:
            return
        if stop is not None and stop.is_set():
            raise Stopped
        seen.add(token)
        logits = decoder.forward([token], cache, stop)


def eos_ids(generation_config: Any, config: Any) -> set[int]:
    """The end-of-sequence ids ``generate`` would stop on."""
    value = getattr(generation_config, "eos_token_id", None)
    if value is None:
        value = getattr(config, "eos_token_id", None)
    if value is None:
        return set()
    return {int(v) for v in (value if isinstance(value, list | tuple) else [value])}
