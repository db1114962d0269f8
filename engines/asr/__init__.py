"""Speech recognition engines behind one interface (:class:`AsrEngine`), and the noise guard."""

from __future__ import annotations

from engines.asr.base import AsrEngine, AsrResult, AsrSegment, EngineSpec, ModelUnavailable

BACKENDS = ("faster-whisper", "transformers")

__all__ = ["BACKENDS", "AsrEngine", "AsrResult", "AsrSegment", "EngineSpec", "ModelUnavailable",
           "load_engine"]


def load_engine(spec: EngineSpec) -> AsrEngine:
    """Load ``spec``'s model (blocking, seconds): raises :class:`ModelUnavailable` with advice."""
    if spec.backend == "faster-whisper":
        from engines.asr.faster_whisper_backend import FasterWhisperEngine

        return FasterWhisperEngine(spec)
    if spec.backend == "transformers":
        from engines.asr.transformers_backend import TransformersEngine

        return TransformersEngine(spec)
    raise ModelUnavailable(f"unknown ASR backend {spec.backend!r}; choose one of "
                           f"{', '.join(BACKENDS)}")
