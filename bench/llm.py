"""Local language model: time to first token, time to first sentence, tokens/s, stop latency.

Direct backend calls (no bus), as the LLM actor makes them: the default bundled model (or
``--model``), the built-in spoken-assistant prompt, greedy decoding, the speech sentence splitter.
"Stop" is how long closing a reply's stream takes until the generation thread has really ended
(the actor stops publishing at once; this is when the model is free again).

    .venv/bin/python bench/llm.py [--model ID_OR_FOLDER] [--max-tokens 64] [--device auto]

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from core import logs
from engines.llm import BackendSpec, ChatMessage
from engines.llm.history import default_prompt
from engines.llm.local_backend import LocalBackend
from engines.llm.sentences import SpeechChunker

PROMPTS = ("What is the capital of France?", "Tell me a fun fact about cats.",
           "How should I start learning to cook?")
STOP_AFTER = 5  # tokens into a long reply before it is stopped


async def one_reply(backend: LocalBackend, question: str) -> dict[str, float]:
    messages = [ChatMessage(role="system", content=default_prompt(False)),
                ChatMessage(role="user", content=question)]
    chunker = SpeechChunker()
    start = time.perf_counter()
    first_token = first_sentence = 0.0
    async for delta in backend.stream(messages):
        now = time.perf_counter()
        first_token = first_token or now
        if chunker.feed(delta) and not first_sentence:
            first_sentence = now
    end = time.perf_counter()
    if chunker.flush() and not first_sentence:
        first_sentence = end
    tokens = backend.last_generated
    return {"ttft_ms": (first_token - start) * 1000,
            "first_sentence_ms": (first_sentence - start) * 1000,
            "tokens": tokens,
            "tokens_per_s": (tokens - 1) / (end - first_token) if tokens > 1 else 0.0,
            "total_ms": (end - start) * 1000}


async def stop_latency(backend: LocalBackend) -> float:
    messages = [ChatMessage(role="user", content="Tell me a long story about a dragon.")]
    seen = 0
    async with contextlib.aclosing(backend.stream(messages)) as stream:
        async for _ in stream:
            seen += 1
            if seen == STOP_AFTER:
                break
        started = time.perf_counter()
    return (time.perf_counter() - started) * 1000


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="Hugging Face id/folder or .gguf; "
                        "empty: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache-dir", default=str(Path(__file__).resolve().parent.parent / "cache"))
    args = parser.parse_args()
    logs.configure("bench", level="warning")

    backend = LocalBackend(BackendSpec(backend="local", model=args.model, device=args.device,
                                       max_tokens=args.max_tokens, cache_dir=args.cache_dir))
    started = time.perf_counter()
    await backend.load()
    load_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    await backend.warm()
    warm_ms = (time.perf_counter() - started) * 1000

    rows = [await one_reply(backend, q) for q in PROMPTS]
    stops = [await stop_latency(backend) for _ in range(3)]
    await backend.aclose()

    print(f"model {backend.name} on {backend.device}; load {load_ms:.0f} ms, warm {warm_ms:.0f} ms")
    print(f"{'prompt':40} {'TTFT ms':>8} {'1st sent ms':>12} {'tokens':>7} {'tok/s':>7}")
    for question, row in zip(PROMPTS, rows, strict=True):
        print(f"{question:40} {row['ttft_ms']:8.0f} {row['first_sentence_ms']:12.0f} "
              f"{row['tokens']:7.0f} {row['tokens_per_s']:7.1f}")
    print(f"stop (stream closed -> generation ended): "
          f"{', '.join(f'{s:.1f}' for s in stops)} ms")
    figures = {
        "model": backend.name, "device": backend.device, "load_ms": round(load_ms),
        "warm_ms": round(warm_ms),
        "ttft_ms": round(statistics.median(r["ttft_ms"] for r in rows), 1),
        "first_sentence_ms": round(statistics.median(r["first_sentence_ms"] for r in rows), 1),
        "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rows), 1),
        "stop_ms": round(max(stops), 1),
        "max_tokens": args.max_tokens,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    asyncio.run(main())
