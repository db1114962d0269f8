"""The lean Llama pass and the per-session prefix caches of the local backend, on the real
bundled SmolLM2 model: the same greedy tokens as transformers' own ``generate``, and turns that
only compute what is new."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from engines.llm import BackendSpec, ChatMessage
from engines.llm.history import History, default_prompt
from engines.llm.llama_fast import CHUNK, FastLlama, KVCache, Stopped, eos_ids
from engines.llm.local_backend import REPETITION_PENALTY, LocalBackend
from engines.llm.prefix_cache import PrefixCaches, common_prefix
from tests import harness

NEW_TOKENS = 24
SYSTEM = default_prompt(False)
FIRST = "What is the capital of France?"
SECOND = "And what is the capital of Germany?"


@pytest.fixture(scope="module")
def backend() -> Iterator[LocalBackend]:
    """The bundled model, loaded once for this file, on the lean pass."""
    spec = BackendSpec(backend="local", engine="torch", max_tokens=NEW_TOKENS,
                       cache_sessions=2, cache_dir=str(harness.ROOT / "cache"))
    loaded = LocalBackend(spec)
    asyncio.run(loaded.load())
    assert loaded.fast is not None  # SmolLM2 is a Llama
    yield loaded
    asyncio.run(loaded.aclose())


@pytest.fixture(scope="module")
def plain() -> Any:
    """The same model as transformers alone loads it (its weights untouched by the lean pass)."""
    from transformers import AutoModelForCausalLM

    from engines.llm.gguf_convert import bundled_gguf, ensure_converted

    folder = ensure_converted(bundled_gguf(), harness.ROOT / "cache")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def prompt_ids(backend: LocalBackend, messages: list[ChatMessage]) -> list[int]:
    return backend.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True)["input_ids"]


def reference(model: Any, ids: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    """transformers' own greedy ``generate``, with the backend's settings."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None,
            top_k=None, repetition_penalty=REPETITION_PENALTY, pad_token_id=2)
    return out[0, len(ids):].tolist()


def fast_greedy(fast: FastLlama, ids: list[int], cache: KVCache | None = None) -> list[int]:
    with torch.inference_mode():
        return list(fast.greedy(ids, cache or fast.new_cache(), NEW_TOKENS,
                                eos_ids_of(fast), REPETITION_PENALTY))


def eos_ids_of(fast: FastLlama) -> set[int]:
    return {int(fast.config.eos_token_id)}


async def reply(backend: LocalBackend, messages: list[ChatMessage],
                session: str | None = None) -> str:
    return "".join([delta async for delta in backend.stream(messages, session=session)])


def chat(*turns: str, replies: tuple[str, ...] = ()) -> list[ChatMessage]:
    history = History()
    for user, assistant in zip(turns, replies, strict=False):
        history.add(user, assistant)
    return history.messages(SYSTEM, turns[-1])


@pytest.mark.slow
def test_fast_pass_gives_the_tokens_of_transformers_generate(backend: LocalBackend,
                                                             plain: Any) -> None:
    fast = backend.fast
    assert eos_ids(plain) == eos_ids_of(fast) == {backend.tokenizer.eos_token_id}
    long_history = History()
    long_history.add("Tell me about the sea.", "The sea covers most of the planet, and it is "
                     "home to fish, whales, coral reefs and many creatures we have never seen.")
    long_history.add("What about mountains?", "Mountains rise where plates of the crust push "
                     "against each other; the highest is Mount Everest, in the Himalayas.")
    prompts = [chat(FIRST), chat("Tell me a fun fact about cats."),
               long_history.messages(SYSTEM, "Which one would you visit first?")]
    for messages in prompts:
        ids = prompt_ids(backend, messages)
        expected = reference(plain, ids)
        assert len(expected) >= 6
        assert fast_greedy(fast, ids) == expected, backend.tokenizer.decode(expected)
    assert len(ids) > CHUNK  # the last prompt was prefilled in several chunks


@pytest.mark.slow
async def test_session_turns_reuse_their_prefix_with_the_same_output(
        backend: LocalBackend, plain: Any) -> None:
    tok = backend.tokenizer
    await backend.warm(SYSTEM)  # computes the prefix every first turn starts with

    first = chat(FIRST)
    first_ids = prompt_ids(backend, first)
    answer = await reply(backend, first, session="a")
    assert "Paris" in answer
    assert answer == tok.decode(reference(plain, first_ids), skip_special_tokens=True)
    shared = len(first_ids) - backend.last_prefilled
    assert shared > 30  # the system prompt came from the warm-up, not computed again

    # The next turn of the session: only what is new since the cached prefix is computed.
    second = chat(FIRST, SECOND, replies=(answer,))
    second_ids = prompt_ids(backend, second)
    assert second_ids[:len(first_ids)] == first_ids
    warm = await reply(backend, second, session="a")
    assert backend.last_prefilled <= len(second_ids) - len(first_ids)
    # ... and answers exactly what a cold prefill of the whole prompt answers (on the lean
    # pass and in transformers).
    cold_ids = fast_greedy(backend.fast, second_ids)
    assert cold_ids == reference(plain, second_ids)
    cold = tok.decode(cold_ids, skip_special_tokens=True)
    assert warm == cold and "Berlin" in warm

    # Another session starts from the shared system prefix only.
    assert await reply(backend, second, session="b") == cold
    assert backend.last_prefilled == len(second_ids) - shared

    # Ending a session drops its cache: its next turn computes everything past the system.
    backend.forget("a")
    assert await reply(backend, second, session="a") == cold
    assert backend.last_prefilled == len(second_ids) - shared


@pytest.mark.slow
async def test_the_next_prompt_is_prefilled_while_the_reply_is_spoken(
        backend: LocalBackend, plain: Any) -> None:
    tok = backend.tokenizer

    def opening(user: str) -> int:
        """Tokens of a new user message and of the assistant's opening after it."""
        return len(tok(f"{user}<|im_end|>\n<|im_start|>assistant\n")["input_ids"])

    history = History(max_turns=1)  # the second exchange pushes the first one out
    answer = await reply(backend, history.messages(SYSTEM, FIRST), session="ahead")
    history.add(FIRST, answer)
    backend.prepare("ahead", history.prefix(SYSTEM))  # as the actor does after a reply
    await backend.idle()
    second = history.messages(SYSTEM, SECOND)
    answer = await reply(backend, second, session="ahead")
    assert answer == tok.decode(reference(plain, prompt_ids(backend, second)),
                                skip_special_tokens=True)
    assert backend.last_prefilled == opening(SECOND)  # everything before was ready

    # The history dropped the first exchange: every position moved, and the new prefix was
    # computed ahead all the same.
    history.add(SECOND, answer)
    assert len(history) == 1
    backend.prepare("ahead", history.prefix(SYSTEM))
    await backend.idle()
    third = "Which of the two is bigger?"
    await reply(backend, history.messages(SYSTEM, third), session="ahead")
    assert backend.last_prefilled == opening(third)

    # The words at a pause: the whole request is computed, its first token known ahead.
    fourth = history.messages(SYSTEM, "And the smallest?")
    backend.prepare("ahead", fourth, complete=True)
    await backend.idle()
    answer = await reply(backend, fourth, session="ahead")
    assert backend.last_prefilled == 0
    assert answer == tok.decode(reference(plain, prompt_ids(backend, fourth)),
                                skip_special_tokens=True)


@pytest.mark.slow
async def test_a_reply_stopped_in_its_prefill_leaves_the_backend_sound(
        backend: LocalBackend, plain: Any) -> None:
    messages = chat("Please summarise this: " + "the quick brown fox jumps over it. " * 60)
    assert len(prompt_ids(backend, messages)) > 5 * CHUNK
    stream = backend.stream(messages, session="stop")
    task = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.2)  # inside the prefill (over a second for this prompt)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
        await task
    await stream.aclose()  # returns once the worker has stopped
    assert backend.last_generated == 0
    short = chat(FIRST)
    assert await reply(backend, short, session="stop") == backend.tokenizer.decode(
        reference(plain, prompt_ids(backend, short)), skip_special_tokens=True)


def test_prefix_caches_are_bounded_shared_and_forgotten() -> None:
    def cache(ids: list[int]) -> KVCache:
        out = KVCache(torch.zeros(2, 1, 256, 4), torch.zeros(2, 1, 256, 4))
        for i, token in enumerate(ids):
            out.keys[:, :, i] = token
            out.values[:, :, i] = -token
        out.ids.extend(ids)
        return out

    def empty() -> KVCache:
        return cache([])

    caches = PrefixCaches(max_sessions=2)
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    first = caches.checkout("s1", [1, 2, 3], empty)
    assert first.ids == [] and "s1" in caches
    first.ids.extend([1, 2, 3, 9])  # what a generation leaves behind
    caches.share([1, 2], cache([1, 2, 3]))
    again = caches.checkout("s1", [1, 2, 3, 4], empty)
    assert again is first and again.ids == [1, 2, 3]  # cut back to the common prefix
    new = caches.checkout("s2", [1, 2, 7], empty)
    assert new is not first and new.ids == [1, 2]  # a copy of the shared prefix
    assert new.keys[0, 0, 1, 0] == 2 and new.values[0, 0, 1, 0] == -2
    caches.checkout("s3", [5], empty)
    assert len(caches) == 2 and "s1" not in caches  # the least recently used went first
    caches.forget("s2")
    assert "s2" not in caches and "s3" in caches
    assert caches.checkout(None, [1, 2], empty).ids == [1, 2]
    assert len(caches) == 1  # a generation without a session keeps nothing


class StopAfter:
    """A stop event that turns set at its ``n``-th check (one check per layer and chunk)."""

    def __init__(self, n: int) -> None:
        self.left = n

    def is_set(self) -> bool:
        self.left -= 1
        return self.left < 0


def test_cache_grows_and_keeps_the_chunks_computed_before_a_stop() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})).eval()
    fast = FastLlama(tiny)
    ids = [int(i) for i in torch.randint(0, 64, (300,))]  # past the rotary table and GROW
    cache = fast.new_cache()
    with torch.inference_mode():
        with pytest.raises(Stopped):
            fast.forward(ids, cache, StopAfter(3))  # type: ignore[arg-type]
        assert cache.ids == ids[:CHUNK]  # the first chunk, and nothing of the second
        logits = fast.forward(ids[CHUNK:], cache)
        expected = tiny(torch.tensor([ids])).logits[0, -1]
    assert cache.ids == ids and cache.capacity >= 300
    assert torch.allclose(logits, expected, atol=1e-4)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Stopped), torch.inference_mode():
        fast.forward([1, 2, 3], cache, stop)
    assert cache.ids == ids


@pytest.mark.slow
async def test_other_architectures_keep_transformers_generate(tmp_path: Path) -> None:
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    from engines.llm.gguf_convert import bundled_gguf, ensure_converted
    from engines.llm.llama_fast import unsupported_reason

    tokenizer = AutoTokenizer.from_pretrained(ensure_converted(bundled_gguf(),
                                                               harness.ROOT / "cache"))
    small = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    dynamic = LlamaForCausalLM(LlamaConfig(**small, rope_parameters={
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}))
    assert "dynamic" in (unsupported_reason(dynamic) or "")
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(**small, eos_token_id=-1))
    assert "Qwen2ForCausalLM" in (unsupported_reason(qwen) or "")
    qwen.save_pretrained(tmp_path / "tiny-qwen")
    tokenizer.save_pretrained(tmp_path / "tiny-qwen")

    backend = LocalBackend(BackendSpec(backend="local", model=str(tmp_path / "tiny-qwen"),
                                       max_tokens=5, cache_dir=str(tmp_path / "cache")))
    await backend.load()
    assert backend.fast is None
    text = await reply(backend, chat("hello"), session="q")
    assert text and backend.last_generated == 5
    backend.prepare("q", chat("hello"))  # nothing to prepare, nothing kept
    backend.forget("q")
    await backend.aclose()
