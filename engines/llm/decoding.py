"""What every local decoder shares: how a generation is stopped and what a prompt cache is.

Two decoders compute a local model's tokens: :mod:`engines.llm.llama_cpp` (llama.cpp's 4-bit
kernels, for a GGUF file on the CPU) and :mod:`engines.llm.llama_fast` (a lean torch pass over
a loaded Llama). Both keep each session's computed prompt in a cache that
:mod:`engines.llm.prefix_cache` manages through the protocol below, and both raise
:class:`Stopped` when a generation is abandoned.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, Self


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


class Decoder(Protocol):
    """Forward passes and greedy decoding over :class:`PromptCache` objects."""

    def new_cache(self) -> PromptCache: ...

    def forward(self, ids: list[int], cache: PromptCache, stop: StopFlag | None = None) -> object:
        """Append ``ids`` to ``cache``; raises :class:`Stopped` when ``stop`` is set."""
        ...

    def greedy(self, prompt: list[int], cache: PromptCache, max_new_tokens: int,
               eos: set[int], repetition_penalty: float = 1.0,
               stop: StopFlag | None = None) -> Iterator[int]:
        """New tokens after ``prompt``; ``cache`` holds a prefix of it and is extended."""
        ...


def eos_ids(generation_config: Any, config: Any) -> set[int]:
    """The end-of-sequence ids ``generate`` would stop on."""
    value = getattr(generation_config, "eos_token_id", None)
    if value is None:
        value = getattr(config, "eos_token_id", None)
    if value is None:
        return set()
    return {int(v) for v in (value if isinstance(value, list | tuple) else [value])}
