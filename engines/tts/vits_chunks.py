"""A Piper (VITS) voice whose decoder runs a few frames at a time, so a span's audio starts early.

A Piper voice is one ONNX graph: text encoder, duration predictor and flow turn phonemes into a
latent sequence (one frame per ``hop`` = 256 output samples), then the HiFi-GAN decoder turns the
latent into audio. Here the decoder is most of a span's cost (~0.5 ms per frame, ~70% of a
sentence) and it is convolutional: an output sample depends only on the latent frames around it.
So the graph is cut in two at the decoder's input, and the decoder is run on the first
``FIRST_FRAMES`` frames, then on longer chunks; every chunk is decoded with
``context`` frames on both sides and cropped. The context is the decoder's receptive field,
measured at load (the smallest of ``CONTEXTS`` for which the chunks equal one whole decode), so
the audio is the same sample for sample: the first packet leaves after the front and ~40 frames
of decoder instead of after the whole span.

Loudness: Piper scales each sentence to its own peak, which needs the whole sentence; here one
gain is taken at load instead, from a calibration sentence spoken without sampling noise (so
every start gets the same gain), and samples are clipped to [-1, 1] as Piper does. For the
bundled voice the calibration peak is 0.54 and sentences' raw peaks 0.55 at the median, 0.63 at
the 95th percentile: ``TARGET_PEAK`` puts those at 0.86 and 0.99.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

FIRST_FRAMES = 16  # ~190 ms of audio in the first chunk; then 48, 128, 128...
GROWTH = 3  # each chunk this much longer than the one before: few chunks, little overlap
MAX_FRAMES = 128
CONTEXTS = (8, 12, 16, 24, 32)  # decoder context frames tried at load, smallest first
TOLERANCE = 1e-4  # chunked vs whole decode, relative to the peak: "the same audio"
CALIBRATION_TEXT = "The capital of France is Paris, a city on the river Seine."
TARGET_PEAK = 0.85  # the calibration sentence's peak after the gain (Piper: 1.0 per sentence)
DECODER_PREFIX = "/dec/"  # node names of the decoder in Piper's exported graphs


def session_options(threads: int = 0) -> Any:
    """onnxruntime options: ``threads`` intra-op threads (0: its default, one per core).

    Their threads do not spin waiting for the next run: between two runs (front, then decoder
    chunks with Opus encoding between them) a spinning pool only takes the cores from the other
    session and from the LLM (a 28-frame chunk: 15 ms without spinning, 19-39 ms with it here).
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def chunk_bounds(frames: int, first: int = FIRST_FRAMES,
                 largest: int = MAX_FRAMES) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of successive chunks covering ``frames``: short first, then longer."""
    start, size = 0, first
    while start < frames:
        end = min(frames, start + size)
        yield start, end
        start, size = end, min(largest, size * GROWTH)


@dataclass(frozen=True)
class SplitGraph:
    """The voice's graph as two serialised ONNX models, cut at the decoder's input."""

    front: bytes  # the voice's inputs -> latent (batch, channels, frames)
    decoder: bytes  # latent -> audio
    latent: str  # name of the tensor between them


def split_voice(model_path: Path) -> SplitGraph | None:
    """Cut a Piper voice at its decoder; None if ``onnx`` is missing or the graph is not one
    of Piper's (no ``/dec/`` nodes), and the voice is then used whole."""
    try:
        import onnx
        from onnx import utils
    except ImportError:
        return None
    model = onnx.load(str(model_path))
    decoder = next((node for node in model.graph.node if node.name.startswith(DECODER_PREFIX)),
                   None)
    if decoder is None or not model.graph.output:
        return None
    latent = decoder.input[0]
    extractor = utils.Extractor(model)
    inputs = [tensor.name for tensor in model.graph.input]
    output = model.graph.output[0].name
    front = extractor.extract_model(inputs, [latent])
    back = extractor.extract_model([latent], [output])
    return SplitGraph(front=front.SerializeToString(), decoder=back.SerializeToString(),
                      latent=latent)


class ChunkedVits:
    """Phoneme ids -> audio chunks (float32, the voice's rate), the decoder run chunk by chunk."""

    def __init__(self, graph: SplitGraph, threads: int, hop: int) -> None:
        import onnxruntime

        providers = ["CPUExecutionProvider"]
        self.front_session = onnxruntime.InferenceSession(
            graph.front, sess_options=session_options(threads), providers=providers)
        self._decoder = onnxruntime.InferenceSession(
            graph.decoder, sess_options=session_options(threads), providers=providers)
        self._latent = graph.latent
        self._hop = hop
        self.context = 0  # set by calibrate(); 0: no context reproduces the whole decode
        self.gain = 1.0

    def latent(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """The front half: the voice's usual inputs -> latent frames (1, channels, frames)."""
        return self.front_session.run([self._latent], inputs)[0]

    def _decode(self, latent: np.ndarray) -> np.ndarray:
        return self._decoder.run(None, {self._latent: latent})[0].reshape(-1)

    def calibrate(self, inputs: dict[str, np.ndarray]) -> None:
        """Find the decoder's context and the gain from one calibration sentence's inputs
        (given without sampling noise, so that the gain is the same at every start)."""
        latent = self.latent(inputs)
        whole = self._decode(latent)
        peak = float(np.abs(whole).max())
        self.gain = TARGET_PEAK / peak if peak > 1e-4 else 1.0
        for context in CONTEXTS:
            self.context = context
            chunked = np.concatenate(list(self._chunks(latent)))
            if (len(chunked) == len(whole)
                    and float(np.abs(chunked - whole).max()) <= TOLERANCE * max(peak, 1e-4)):
                break
        else:
            self.context = 0
        structlog.get_logger().info("tts_decoder_chunked", context=self.context,
                                    gain=round(self.gain, 3), frames=latent.shape[-1])

    def _chunks(self, latent: np.ndarray) -> Iterator[np.ndarray]:
        frames = latent.shape[-1]
        if not self.context:
            yield self._decode(latent)
            return
        for start, end in chunk_bounds(frames):
            low, high = max(0, start - self.context), min(frames, end + self.context)
            audio = self._decode(latent[:, :, low:high])
            offset = (start - low) * self._hop
            yield audio[offset:offset + (end - start) * self._hop]

    def audio(self, inputs: dict[str, np.ndarray]) -> Iterator[np.ndarray]:
        """The span's audio, chunk by chunk, at the calibrated gain."""
        for chunk in self._chunks(self.latent(inputs)):
            yield np.clip(chunk * self.gain, -1.0, 1.0).astype(np.float32)
