"""Silero's speech probability for each 32 ms chunk of a turn's audio, each chunk computed once.

A turn's audio reaches the recogniser again and again, each time longer: the words-so-far
partials while the user speaks, the pause partial, the turn's utterance. The noise guard runs
the VAD over all of it every time, so the turn's end used to pay for the VAD over the whole turn
(6-22 ms in a call on two busy cores) right before Whisper. The VAD's recurrent state after a
chunk depends only on the audio up to it, so a :class:`SpeechProbabilities` keeps the
probabilities and the state after the last whole chunk it has seen, and for audio that begins
with what it saw computes the new chunks only. The results are exactly those of running the
model over the whole audio at once (the tests compare them).

The model is the Silero VAD inside faster-whisper (the same one its ``get_speech_timestamps``
runs), fed as faster-whisper feeds it: 512-sample chunks, each with the last 64 samples of the
one before as context, in one batch with the recurrent state carried through.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

CHUNK = 512  # samples per probability at 16 kHz, fixed by the model
CONTEXT = 64  # samples of the previous chunk each chunk is given again
STATE_SHAPE = (1, 1, 128)


def _model() -> Any:
    from faster_whisper.vad import get_vad_model

    return get_vad_model()  # loaded once per process, shared


class SpeechProbabilities:
    """The probabilities of one growing recording. Thread-safe: a recognition given up on may
    still be in its VAD when the turn's next one starts."""

    def __init__(self) -> None:
        self._reset()
        self.computed = 0  # chunks run through the model (the tests count them)
        self._lock = threading.Lock()

    def _reset(self) -> None:
        self._seen = np.zeros(0, dtype=np.float32)  # the whole chunks computed so far
        self._probs = np.zeros(0, dtype=np.float32)
        self._h = np.zeros(STATE_SHAPE, dtype=np.float32)
        self._c = np.zeros(STATE_SHAPE, dtype=np.float32)

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        """One probability per 512 samples of 16 kHz float ``audio``, the last chunk padded with
        zeros (as faster-whisper pads it)."""
        with self._lock:
            return self._probabilities(audio)

    def _probabilities(self, audio: np.ndarray) -> np.ndarray:
        whole = audio.size // CHUNK * CHUNK
        done = self._seen.size
        if done > whole or not np.array_equal(audio[:done], self._seen):
            self._reset()  # other audio than this recording's: start over
            done = 0
        if whole > done:
            probs, self._h, self._c = self._run(audio[:whole], done, self._h, self._c)
            self._probs = np.concatenate([self._probs, probs])
            self._seen = np.array(audio[:whole], dtype=np.float32)
        if whole == audio.size:
            return self._probs
        tail = np.zeros(whole + CHUNK, dtype=np.float32)
        tail[:audio.size] = audio
        last, _, _ = self._run(tail, whole, self._h, self._c)  # not kept: more audio may come
        return np.concatenate([self._probs, last])

    def _run(self, audio: np.ndarray, start: int, h: np.ndarray,
             c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The probabilities of ``audio``'s chunks from sample ``start`` on (whole chunks),
        and the state after them."""
        chunks = audio[start:].reshape(-1, CHUNK)
        before = (audio[start - CONTEXT:start] if start else np.zeros(CONTEXT, np.float32))
        contexts = np.concatenate([before[np.newaxis], chunks[:-1, -CONTEXT:]])
        batch = np.concatenate([contexts, chunks], axis=1).astype(np.float32, copy=False)
        out, h, c = _model().session.run(None, {"input": batch, "h": h, "c": c})
        self.computed += len(chunks)
        return np.asarray(out, dtype=np.float32).reshape(-1), h, c
