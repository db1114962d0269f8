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

The flow (the coupling layers between the text's noisy prior and the decoder's latent) is
convolutional too, and about half of the front: 22 ms of 44 for a 160-frame sentence here, 37 of
67 for 290 frames. Where it can be cut out as well, it runs twice: first over just the frames
the first decoder chunk needs (plus its own ``flow_context``, measured at load the same way),
then over all the rest, while the first chunk is heard. The sampling noise is drawn once, before
the flow, so both runs see the same prior.

Loudness: Piper scales each sentence to its own peak, which needs the whole sentence; here one
gain is taken at load instead, from a calibration sentence spoken without sampling noise (so
every start gets the same gain), and samples are clipped to [-1, 1] as Piper does. For the
bundled voice the calibration peak is 0.54 and sentences' raw peaks 0.55 at the median, 0.63 at
the 95th percentile: ``TARGET_PEAK`` puts those at 0.86 and 0.99.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

FIRST_FRAMES = 16  # ~190 ms of audio in the first chunk; then 48, 128, 128...
GROWTH = 3  # each chunk this much longer than the one before: few chunks, little overlap
MAX_FRAMES = 128
CONTEXTS = (8, 12, 16, 24, 32)  # decoder context frames tried at load, smallest first
FLOW_CONTEXTS = (16, 24, 32, 48, 64)  # flow context frames tried at load, smallest first
TOLERANCE = 1e-4  # chunked vs whole decode, relative to the peak: "the same audio"
CALIBRATION_TEXT = "The capital of France is Paris, a city on the river Seine."
TARGET_PEAK = 0.85  # the calibration sentence's peak after the gain (Piper: 1.0 per sentence)
DECODER_PREFIX = "/dec/"  # node names of the decoder in Piper's exported graphs
FLOW_PREFIX = "/flow/"  # and of the flow


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
class FlowGraph:
    """The flow cut out of the front: (prior, mask) -> latent."""

    model: bytes
    prior: str  # the noisy prior (batch, channels, frames), the flow's input
    mask: str  # the frames' mask (batch, 1, frames)


@dataclass(frozen=True)
class SplitGraph:
    """The voice's graph as serialised ONNX models, cut at the decoder's input (and, when it
    could be found, at the flow's)."""

    front: bytes  # the voice's inputs -> latent (batch, channels, frames), or -> prior, mask
    decoder: bytes  # latent -> audio
    latent: str  # name of the tensor between them
    flow: FlowGraph | None = None  # when set, ``front`` ends at the flow's inputs


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
    back = extractor.extract_model([latent], [output])
    flow = _flow_inputs(model, latent)
    if flow is not None:
        with contextlib.suppress(Exception):  # onnx raises many types: then no flow cut
            prior, mask = flow
            front = extractor.extract_model(inputs, [prior, mask])
            cut = extractor.extract_model([prior, mask], [latent])
            return SplitGraph(front=front.SerializeToString(), decoder=back.SerializeToString(),
                              latent=latent, flow=FlowGraph(cut.SerializeToString(), prior, mask))
    front = extractor.extract_model(inputs, [latent])
    return SplitGraph(front=front.SerializeToString(), decoder=back.SerializeToString(),
                      latent=latent)


def _flow_inputs(model: Any, latent: str) -> tuple[str, str] | None:
    """The flow's prior and mask in Piper's graph: the latent is ``flow(prior) * mask``, and
    the first ``/flow/`` node (in the graph's order, which is the order of computation) reads
    the prior. None when the graph is not shaped so."""
    producer = {output: node for node in model.graph.node for output in node.output}
    masking = producer.get(latent)
    if masking is None or masking.op_type != "Mul" or len(masking.input) != 2:
        return None
    flowed, mask = masking.input
    if not producer.get(flowed, masking).name.startswith(FLOW_PREFIX):
        flowed, mask = mask, flowed
        if not producer.get(flowed, masking).name.startswith(FLOW_PREFIX):
            return None
    first = next((node for node in model.graph.node if node.name.startswith(FLOW_PREFIX)), None)
    if first is None or not first.input:
        return None
    return first.input[0], mask


def _smallest(candidates: tuple[int, ...], works: Callable[[int], bool]) -> int:
    """The first of ``candidates`` (smallest first) that ``works``, or 0 if none does."""
    return next((candidate for candidate in candidates if works(candidate)), 0)


class Latent:
    """A span's latent frames (1, channels, frames), computed as far as they are asked for: the
    first frames asked for by one flow run, all the rest by one more (see the module doc)."""

    def __init__(self, frames: int, flow: Callable[[int, int], np.ndarray]) -> None:
        self.frames = frames
        self._flow = flow  # (start, end) -> exactly those latent frames
        self._computed: np.ndarray | None = None  # the first frames, as far as computed

    @classmethod
    def whole(cls, latent: np.ndarray) -> Latent:
        done = cls(latent.shape[-1], lambda start, end: latent[:, :, start:end])
        done._computed = latent
        return done

    def upto(self, end: int) -> np.ndarray:
        """Frames ``[0, end)``."""
        end = min(end, self.frames)
        computed = self._computed
        if computed is None:  # the first run: just what is asked for
            computed = self._computed = self._flow(0, end)
        elif end > computed.shape[-1]:  # the second: all the rest
            rest = self._flow(computed.shape[-1], self.frames)
            computed = self._computed = np.concatenate([computed, rest], axis=-1)
        return computed[:, :, :end]


class ChunkedVits:
    """Phoneme ids -> audio chunks (float32, the voice's rate), the decoder run chunk by chunk
    (and the flow in two runs, where it could be cut out)."""

    def __init__(self, graph: SplitGraph, threads: int, hop: int) -> None:
        import onnxruntime

        providers = ["CPUExecutionProvider"]

        def session(model: bytes) -> Any:
            return onnxruntime.InferenceSession(model, sess_options=session_options(threads),
                                                providers=providers)

        self.front_session = session(graph.front)
        self._decoder = session(graph.decoder)
        # the flow's graph (its tensors' names) and session, when it was cut out
        self._flow = (graph.flow, session(graph.flow.model)) if graph.flow is not None else None
        self._latent = graph.latent
        self._hop = hop
        self.context = 0  # set by calibrate(); 0: no context reproduces the whole decode
        self.flow_context = 0  # set by calibrate(); 0: the flow runs over the whole span
        self.gain = 1.0

    def latent(self, inputs: dict[str, np.ndarray]) -> Latent:
        """The front half: the voice's usual inputs -> the latent frames, as far as asked."""
        if self._flow is None:
            return Latent.whole(self.front_session.run([self._latent], inputs)[0])
        graph, session = self._flow
        prior, mask = self.front_session.run([graph.prior, graph.mask], inputs)
        frames, context = prior.shape[-1], self.flow_context

        def flow(start: int, end: int) -> np.ndarray:
            low, high = max(0, start - context), min(frames, end + context)
            latent = session.run([self._latent], {graph.prior: prior[:, :, low:high],
                                                  graph.mask: mask[:, :, low:high]})[0]
            return latent[:, :, start - low:end - low]

        if not context or frames <= 2 * (FIRST_FRAMES + self.context + context):
            return Latent.whole(flow(0, frames))  # a short span: one run costs less than two
        return Latent(frames, flow)

    def _decode(self, latent: np.ndarray) -> np.ndarray:
        return self._decoder.run(None, {self._latent: latent})[0].reshape(-1)

    def calibrate(self, inputs: dict[str, np.ndarray]) -> None:
        """Find the decoder's and the flow's contexts and the gain from one calibration
        sentence's inputs (given without sampling noise, so that the gain is the same at every
        start, and the chunked audio can be compared with the whole)."""
        self.flow_context = 0  # the whole flow at once: the reference
        span = self.latent(inputs)
        latent = span.upto(span.frames)
        whole = self._decode(latent)
        peak = float(np.abs(whole).max())
        self.gain = TARGET_PEAK / peak if peak > 1e-4 else 1.0

        def same(chunks: Iterator[np.ndarray]) -> bool:
            chunked = np.concatenate(list(chunks))
            return (len(chunked) == len(whole)
                    and float(np.abs(chunked - whole).max()) <= TOLERANCE * max(peak, 1e-4))

        def decoder_reproduces(context: int) -> bool:
            self.context = context
            return same(self._chunks(Latent.whole(latent)))

        def flow_reproduces(context: int) -> bool:
            self.flow_context = context
            return same(self._chunks(self.latent(inputs)))

        self.context = _smallest(CONTEXTS, decoder_reproduces)
        if self.context and self._flow is not None:
            self.flow_context = _smallest(FLOW_CONTEXTS, flow_reproduces)
        structlog.get_logger().info("tts_decoder_chunked", context=self.context,
                                    flow_context=self.flow_context, gain=round(self.gain, 3),
                                    frames=latent.shape[-1])

    def _chunks(self, latent: Latent) -> Iterator[np.ndarray]:
        frames = latent.frames
        if not self.context:
            yield self._decode(latent.upto(frames))
            return
        for start, end in chunk_bounds(frames):
            low, high = max(0, start - self.context), min(frames, end + self.context)
            audio = self._decode(latent.upto(high)[:, :, low:high])
            offset = (start - low) * self._hop
            yield audio[offset:offset + (end - start) * self._hop]

    def audio(self, inputs: dict[str, np.ndarray]) -> Iterator[np.ndarray]:
        """The span's audio, chunk by chunk, at the calibrated gain."""
        for chunk in self._chunks(self.latent(inputs)):
            yield np.clip(chunk * self.gain, -1.0, 1.0).astype(np.float32)
