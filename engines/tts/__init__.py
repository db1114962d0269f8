"""Speech synthesis engines behind one interface (:class:`TtsBackend`), streaming Opus packets."""

from __future__ import annotations

from engines.tts.base import (
    BackendSpec,
    BackendUnavailable,
    Emit,
    Packet,
    SynthesisError,
    TtsBackend,
)

BACKENDS = ("piper", "openai")

__all__ = ["BACKENDS", "BackendSpec", "BackendUnavailable", "Emit", "Packet", "SynthesisError",
           "TtsBackend", "make_backend"]


def make_backend(spec: BackendSpec) -> TtsBackend:
    """The backend ``spec`` names, not yet prepared (heavy imports happen in ``prepare``)."""
    if spec.backend == "piper":
        from engines.tts.piper_backend import PiperBackend

        return PiperBackend(spec)
    if spec.backend == "openai":
        from engines.tts.openai_backend import OpenAIBackend

        return OpenAIBackend(spec)
    raise BackendUnavailable(f"unknown TTS backend {spec.backend!r}; choose one of {BACKENDS}")
