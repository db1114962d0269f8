"""Language-model backends behind one streaming interface (:class:`LLMBackend`), the
per-session history, and the speech-aware sentence splitter."""

from __future__ import annotations

from engines.llm.base import (
    BackendSpec,
    ChatMessage,
    LLMBackend,
    LLMError,
    ModelUnavailable,
    Pause,
)

BACKENDS = ("openai", "local")

__all__ = ["BACKENDS", "BackendSpec", "ChatMessage", "LLMBackend", "LLMError",
           "ModelUnavailable", "Pause", "make_backend"]


def make_backend(spec: BackendSpec) -> LLMBackend:
    """The backend ``spec`` asks for, not loaded yet (call ``await backend.load()``)."""
    kind = spec.resolved
    if kind == "openai":
        from engines.llm.openai_backend import OpenAIBackend

        return OpenAIBackend(spec)
    if kind == "local":
        from engines.llm.local_backend import LocalBackend

        return LocalBackend(spec)
    raise ModelUnavailable(f"unknown LLM backend {spec.backend!r}; choose one of "
                           f"auto, {', '.join(BACKENDS)}")
