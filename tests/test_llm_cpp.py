"""The llama.cpp engine of the local backend, on the real bundled SmolLM2 GGUF and the real
prebuilt llama.cpp of the ``gpt4all`` wheel: it is the default, it answers, a turn computes only
what is new and answers as a cold start would, a stop ends it within a chunk, and a full context
is recovered from."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from engines.llm import BackendSpec, ChatMessage, ModelUnavailable
from engines.llm.decoding import Stopped
from engines.llm.gguf_convert import bundled_gguf
from engines.llm.history import History, default_prompt
from engines.llm.llama_cpp import (
    BACKGROUND_CHUNK,
    CHUNK,
    PRE_TOKENIZER_ALIASES,
    CacheFull,
    LlamaCpp,
    library_path,
    loadable_gguf,
)
from engines.llm.local_backend import REPETITION_PENALTY, LocalBackend
from engines.llm.prefix_cache import common_prefix
from tests import harness

SYSTEM = default_prompt(False)
FIRST = "What is the capital of France?"
SECOND = "And what is the capital of Germany?"
CACHE = harness.ROOT / "cache"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def backend() -> Iterator[LocalBackend]:
    """The bundled model as the LLM actor loads it by default."""
    loaded = LocalBackend(BackendSpec(backend="local", max_tokens=24, cache_sessions=2,
                                      cache_dir=str(CACHE)))
    asyncio.run(loaded.load())
    yield loaded
    asyncio.run(loaded.aclose())


def chat(*turns: str, replies: tuple[str, ...] = ()) -> list[ChatMessage]:
    history = History()
    for user, assistant in zip(turns, replies, strict=False):
        history.add(user, assistant)
    return history.messages(SYSTEM, turns[-1])


async def reply(backend: LocalBackend, messages: list[ChatMessage],
                session: str | None = None) -> str:
    return "".join([delta async for delta in backend.stream(messages, session=session)])


def ids_of(backend: LocalBackend, messages: list[ChatMessage]) -> list[int]:
    return backend.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True)["input_ids"]


def pre_tokenizer(path: Path) -> str:
    """The ``tokenizer.ggml.pre`` value of a GGUF, read by the gguf package."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields["tokenizer.ggml.pre"]
    return bytes(field.parts[field.data[0]]).decode()


def test_llama_cpp_is_the_default_engine_for_the_bundled_model(backend: LocalBackend) -> None:
    assert isinstance(backend.fast, LlamaCpp)
    assert backend.model is None  # no torch copy of the weights is loaded
    assert backend.fast.library == library_path()


async def test_turns_reuse_their_prefix_and_answer_as_a_cold_start(
        backend: LocalBackend) -> None:
    tok = backend.tokenizer
    await backend.warm(SYSTEM)
    first = chat(FIRST)
    first_ids = ids_of(backend, first)
    answer = await reply(backend, first, session="a")
    assert "Paris" in answer
    shared = len(first_ids) - backend.last_prefilled
    assert shared > 30  # the system prompt came from the warm-up

    second = chat(FIRST, SECOND, replies=(answer,))
    second_ids = ids_of(backend, second)
    warm = await reply(backend, second, session="a")
    assert backend.last_prefilled <= len(second_ids) - len(first_ids)
    decoder = backend.fast
    cold_ids = list(decoder.greedy(second_ids, decoder.new_cache(), 24, backend._eos,
                                   REPETITION_PENALTY))
    cold = tok.decode(cold_ids, skip_special_tokens=True)
    assert warm == cold and "Berlin" in warm

    # Another session starts from the shared system prefix only, and answers the same.
    assert await reply(backend, second, session="b") == cold
    assert backend.last_prefilled == len(second_ids) - shared


def test_a_stop_ends_a_prompt_within_one_chunk(backend: LocalBackend) -> None:
    decoder = backend.fast
    ids = ids_of(backend, chat("Tell me everything about the sea. " * 8))
    assert len(ids) > 4 * CHUNK
    cache = decoder.new_cache()

    class StopAfterFirstChunk:
        def __init__(self) -> None:
            self.calls = 0

        def is_set(self) -> bool:
            self.calls += 1
            return self.calls > 1

    with pytest.raises(Stopped):
        decoder.forward(ids, cache, StopAfterFirstChunk())
    assert cache.ids == ids[:CHUNK]  # what was computed is kept, and only that

    stop = threading.Event()
    tokens = decoder.greedy(ids, decoder.new_cache(), 50, backend._eos, stop=stop)
    next(tokens)
    stop.set()
    with pytest.raises(Stopped):
        next(tokens)


def test_work_ahead_of_a_turn_is_the_same_computation_and_stops_sooner(
        backend: LocalBackend) -> None:
    """Background work (the words so far) runs on one thread in small chunks: the same
    logits, and a stop seen after BACKGROUND_CHUNK tokens."""
    decoder = backend.fast
    ids = ids_of(backend, chat("What is the capital of France and of Spain?"))
    assert len(ids) > 2 * BACKGROUND_CHUNK
    ahead = decoder.forward(ids, decoder.new_cache(), background=True)
    now = decoder.forward(ids, decoder.new_cache())
    assert int(np.argmax(ahead)) == int(np.argmax(now))
    assert np.allclose(ahead, now, atol=0.5)  # other thread counts round differently

    class StopAfterFirstChunk:
        calls = 0

        def is_set(self) -> bool:
            self.calls += 1
            return self.calls > 1

    cache = decoder.new_cache()
    with pytest.raises(Stopped):
        decoder.forward(ids, cache, StopAfterFirstChunk(), background=True)
    assert cache.ids == ids[:BACKGROUND_CHUNK]
    # and the context is back on its prompt threads for the turn itself
    assert decoder.forward(ids[BACKGROUND_CHUNK:], cache) is not None


def test_a_full_context_is_reported_and_dropped_caches_free_it() -> None:
    gguf = loadable_gguf(bundled_gguf(), CACHE)
    decoder = LlamaCpp(gguf, sessions=1, context=2 * CHUNK)
    try:
        a = decoder.new_cache()
        decoder.forward(list(range(100, 100 + CHUNK + 4)), a)
        b = decoder.new_cache()
        with pytest.raises(CacheFull):
            decoder.forward(list(range(200, 200 + CHUNK)), b)
        del a  # its sequence is released on the next call
        decoder.forward(list(range(200, 200 + CHUNK)), b)
        assert len(b.ids) == CHUNK
        # Sequences are a bounded pool too: all in use is reported, a dropped one comes back.
        held = [decoder.new_cache() for _ in range(decoder.sequences - 1)]
        with pytest.raises(CacheFull):
            decoder.new_cache()
        held.pop()
        assert decoder.new_cache().ids == []
    finally:
        decoder.close()


async def test_the_backend_recovers_from_a_full_context(backend: LocalBackend) -> None:
    small = LlamaCpp(loadable_gguf(bundled_gguf(), CACHE), sessions=2, context=64,
                     bytes_per_position=backend.fast.bytes_per_position)
    own = backend._fast
    backend._fast = small
    backend._caches.clear()
    try:
        assert "Paris" in await reply(backend, chat(FIRST), session="x")
        # The second session does not fit beside the first: the kept prompts are dropped.
        assert "Berlin" in await reply(backend, chat(SECOND), session="y")
        assert "x" not in backend._caches
    finally:
        backend._caches.clear()
        backend._fast = own
        small.close()


def test_an_unknown_pre_tokenizer_name_is_given_an_equivalent_in_a_copy(
        tmp_path: Path) -> None:
    source = bundled_gguf()
    (name, alias), = PRE_TOKENIZER_ALIASES.items()
    assert name in source.read_bytes()[:1 << 20]
    copy = loadable_gguf(source, tmp_path)
    assert copy.parent == tmp_path and copy.stat().st_size == source.stat().st_size
    assert pre_tokenizer(source) == name.decode() and pre_tokenizer(copy) == alias.decode()
    stamp = copy.stat().st_mtime_ns
    assert loadable_gguf(source, tmp_path) == copy and copy.stat().st_mtime_ns == stamp
    other = tmp_path / "plain.gguf"
    other.write_bytes(b"GGUF" + bytes(64))
    assert loadable_gguf(other, tmp_path) == other  # nothing to rename: used as it is


async def test_without_llama_cpp_the_torch_pass_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    from engines.llm import llama_cpp
    from engines.llm.llama_fast import FastLlama

    monkeypatch.setattr(llama_cpp, "library_path", lambda: None)
    with pytest.raises(ModelUnavailable, match="gpt4all"):
        await LocalBackend(BackendSpec(backend="local", engine="llama.cpp",
                                       cache_dir=str(CACHE))).load()
    fallback = LocalBackend(BackendSpec(backend="local", max_tokens=8, cache_dir=str(CACHE)))
    await fallback.load()
    assert isinstance(fallback.fast, FastLlama)
    assert "Paris" in await reply(fallback, chat(FIRST))
    await fallback.aclose()


async def test_words_said_so_far_are_computed_before_the_turn_ends(
        backend: LocalBackend) -> None:
    await backend.warm(SYSTEM)
    history = chat(FIRST)[:-1]  # the system prompt: a new call's first turn
    # A partial transcript while the user still speaks, then a later, longer one.
    backend.prepare("words", history, words="What is the")
    backend.prepare("words", history, words="What is the capital of")
    await backend.idle()
    final = chat(FIRST)
    final_ids = ids_of(backend, final)
    answer = await reply(backend, final, session="words")
    # Only the last words and the template's end of the message were left to compute...
    assert backend.last_prefilled <= 8, backend.last_prefilled
    # ...and the answer is the one a cold start gives.
    decoder = backend.fast
    cold_ids = list(decoder.greedy(final_ids, decoder.new_cache(), 24, backend._eos,
                                   REPETITION_PENALTY))
    assert answer == backend.tokenizer.decode(cold_ids, skip_special_tokens=True)
    # Words the user then took back (Whisper heard them differently): only what still
    # matches is reused, and the answer is unchanged.
    backend.prepare("words2", history, words="Where is the cap")
    await backend.idle()
    assert await reply(backend, final, session="words2") == answer
    backend.forget("words")
    backend.forget("words2")


async def test_the_words_at_a_pause_are_computed_as_the_whole_request(
        backend: LocalBackend) -> None:
    """The words at a pause are likely the turn: their whole prompt, the template's end of the
    message and the assistant's opening included, is computed before the turn ends; the turn
    then only picks its first token. Words that differ at the end are computed as they are."""
    await backend.warm(SYSTEM)
    final = chat(FIRST)
    backend.prepare("pause", final, complete=True)
    await backend.idle()
    answer = await reply(backend, final, session="pause")
    assert backend.last_prefilled == 0  # its first token came from the logits kept
    decoder = backend.fast
    cold_ids = list(decoder.greedy(ids_of(backend, final), decoder.new_cache(), 24,
                                   backend._eos, REPETITION_PENALTY))
    assert answer == backend.tokenizer.decode(cold_ids, skip_special_tokens=True)
    # The user went on past the pause: what still matches is reused, the answer unchanged.
    backend.prepare("pause2", chat("What is the capital"), complete=True)
    await backend.idle()
    assert await reply(backend, final, session="pause2") == answer
    final_ids = ids_of(backend, final)
    kept = common_prefix(ids_of(backend, chat("What is the capital")), final_ids)
    assert backend.last_prefilled == len(final_ids) - kept > 1
    backend.forget("pause")
    backend.forget("pause2")
