"""How fast this machine runs each bundled model alone: a yardstick for the other benchmarks.

Two machines of the same kind can differ by half in speed (a session's virtual machine
ran Whisper on a 1 s clip in 114 ms, a later one in 167), so a voice-to-voice figure means
little without the speed of the machine that gave it. This measures, on an idle machine, one
number per model, each the median of a few repeats after a warm-up:

- ``whisper_ms``: Whisper tiny.en recognising a spoken question (~1.6 s), VAD guard included;
- ``llm_prefill8_ms``: llama.cpp computing the last 8 tokens of a first turn's prompt (on the
  prompt threads, as a turn's end does);
- ``llm_token_ms``: llama.cpp decoding one token (one thread, as a reply does);
- ``tts_first_ms``: Piper's first 20 ms Opus packet of a short sentence.

    .venv/bin/python bench/calibrate.py [--repeats 5]

``bench/latency.py`` runs it before and after each run and prints its figures with the results.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QUESTION = "What is the capital of France?"
SHORT_SENTENCE = "Sure, it is four."
PREFILL_TOKENS = 8
DECODE_TOKENS = 16


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """``fn()`` once to warm up, then the median of ``repeats`` timed calls, in ms."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 1)


def whisper_ms(repeats: int) -> float:
    from engines.asr import EngineSpec, load_engine
    from engines.asr.pipeline import Recognizer
    from tests.speech import say

    spec = EngineSpec(backend="faster-whisper", model="tiny.en", device="cpu", language="en",
                      cache_dir="cache")
    recognizer = Recognizer(load_engine(spec))
    pcm = say(QUESTION).astype("<i2").tobytes()
    return median_ms(lambda: recognizer.recognise(pcm), repeats)


def llm_ms(repeats: int) -> tuple[float, float]:
    """(prefill of the prompt's last tokens, one decoded token) on llama.cpp."""
    from engines.llm import BackendSpec
    from engines.llm.history import default_prompt
    from engines.llm.local_backend import LocalBackend

    backend = LocalBackend(BackendSpec(backend="local", engine="llama.cpp"))
    asyncio.run(backend.load())
    decoder, tokenizer = backend.fast, backend.tokenizer
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": default_prompt(False)}, {"role": "user", "content": QUESTION}],
        add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    head, tail = ids[:-PREFILL_TOKENS], ids[-PREFILL_TOKENS:]

    prefills: list[float] = []
    tokens: list[float] = []

    def one_turn() -> None:
        cache = decoder.new_cache()
        decoder.forward(head, cache)
        started = time.perf_counter()
        decoder.forward(tail, cache)
        prefills.append((time.perf_counter() - started) * 1000)
        for token in ids[-1:] * DECODE_TOKENS:  # the same token again: the cost, not the text
            started = time.perf_counter()
            decoder.forward([token], cache)
            tokens.append((time.perf_counter() - started) * 1000)

    one_turn()  # warm-up
    prefills.clear()
    tokens.clear()
    for _ in range(repeats):
        one_turn()
    decoder.close()
    return round(statistics.median(prefills), 1), round(statistics.median(tokens), 1)


def tts_first_ms(repeats: int) -> float:
    from bench.tts import measure
    from engines.tts import BackendSpec, make_backend

    async def run() -> float:
        backend = make_backend(BackendSpec(backend="piper"))
        await backend.prepare()
        firsts = [(await measure(backend, SHORT_SENTENCE))["first_ms"] for _ in range(repeats)]
        await backend.aclose()
        return round(statistics.median(firsts), 1)

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    repeats = max(1, args.repeats)
    figures = {"whisper_ms": whisper_ms(repeats)}
    figures["llm_prefill8_ms"], figures["llm_token_ms"] = llm_ms(repeats)
    figures["tts_first_ms"] = tts_first_ms(repeats)
    print(f"{'model, alone':<44}{'median ms':>10}")
    for label, key in (("Whisper tiny.en, a 1.6 s question", "whisper_ms"),
                       (f"llama.cpp, the prompt's last {PREFILL_TOKENS} tokens", "llm_prefill8_ms"),
                       ("llama.cpp, one decoded token", "llm_token_ms"),
                       ("Piper, first packet of a short sentence", "tts_first_ms")):
        print(f"{label:<44}{figures[key]:>10.1f}")
    print(json.dumps({"bench": "calibrate", "repeats": repeats, **figures}))


if __name__ == "__main__":
    main()
