"""Local language model: prefill, time to first token and sentence, ms per token, stop latency.

Direct backend calls (no bus), as the LLM actor makes them: the default bundled model (or
``--model``), the built-in spoken-assistant prompt, greedy decoding, the speech sentence splitter.
Each path (llama.cpp on the GGUF, the lean torch Llama pass, both with per-session prefix
caches, and plain transformers ``generate``) answers the same calls: a cold first turn of a new
session, then, after a pause (the user speaking), a second turn that repeats the first exchange
in its history. "Prefill" is the worker's time from the start of a generation to its first
token (tokenizing, prefilling the tokens not cached, and the first token); "TTFT" and "1st
sentence" are seen from the caller. "Stop" is how long closing a reply's stream takes until the
generation thread has really ended (the actor stops publishing at once; this is when the model is
free again), while decoding and in the middle of a long prompt's prefill.

    .venv/bin/python bench/llm.py [--model ID_OR_FOLDER] [--max-tokens 64] [--threads 1]
                                  [--paths llama.cpp,fast,fast32,transformers]

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
from engines.llm.history import History, default_prompt
from engines.llm.local_backend import LocalBackend
from engines.llm.sentences import SpeechChunker

CALLS = (("What is the capital of France?", "And what about Germany?"),
         ("Tell me a fun fact about cats.", "Why do they do that?"),
         ("How should I start learning to cook?", "What should I cook first?"))
PAUSE = 1.0  # seconds between turns: the user hears the reply and answers
STOP_AFTER = 5  # tokens into a long reply before it is stopped
STOP_PREFILL_AFTER = 0.15  # seconds into a long prompt's prefill before it is stopped


async def one_turn(backend: LocalBackend, messages: list[ChatMessage],
                   session: str) -> tuple[dict[str, float], str]:
    chunker = SpeechChunker()
    start = time.perf_counter()
    first_token = first_sentence = 0.0
    text = []
    async for delta in backend.stream(messages, session=session):
        now = time.perf_counter()
        text.append(delta)
        first_token = first_token or now
        if chunker.feed(delta) and not first_sentence:
            first_sentence = now
    end = time.perf_counter()
    if chunker.flush() and not first_sentence:
        first_sentence = end
    tokens = backend.last_generated
    decode = (end - first_token) / (tokens - 1) * 1000 if tokens > 1 else 0.0
    return {"prefilled": backend.last_prefilled, "prefill_ms": backend.last_prefill_ms,
            "ttft_ms": (first_token - start) * 1000,
            "first_sentence_ms": (first_sentence - start) * 1000,
            "tokens": tokens, "ms_per_token": decode}, "".join(text)


async def one_call(backend: LocalBackend, system: str, session: str,
                   questions: tuple[str, str]) -> list[dict[str, float]]:
    history = History()
    rows = []
    for question in questions:
        row, answer = await one_turn(backend, history.messages(system, question), session)
        rows.append(row)
        history.add(question, answer)
        backend.prepare(session, history.prefix(system))  # as the actor does
        await asyncio.sleep(PAUSE)
        await backend.idle()
    backend.forget(session)
    return rows


async def stop_latency(backend: LocalBackend, messages: list[ChatMessage],
                       after_tokens: int = 0, after_s: float = 0.0) -> float:
    """ms from closing the stream (or cancelling its reader) to the worker being free."""
    async with contextlib.aclosing(backend.stream(messages, session="stop")) as stream:
        if after_tokens:
            seen = 0
            async for _ in stream:
                seen += 1
                if seen == after_tokens:
                    break
            started = time.perf_counter()
        else:  # still in the prefill: no token yet
            task = asyncio.ensure_future(anext(stream))
            await asyncio.sleep(after_s)
            started = time.perf_counter()
            task.cancel()  # the stream stops its generation and waits for the worker
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await task
    elapsed = (time.perf_counter() - started) * 1000
    await backend.idle()
    backend.forget("stop")
    return elapsed


async def run_path(args: argparse.Namespace, path: str) -> dict[str, object]:
    backend = LocalBackend(BackendSpec(
        backend="local", model=args.model, device=args.device, max_tokens=args.max_tokens,
        cache_dir=args.cache_dir, threads=args.threads,
        engine={"llama.cpp": "llama.cpp", "transformers": "transformers"}.get(path, "torch"),
        prompt_threads=args.prompt_threads, half_decode=path == "fast"))
    started = time.perf_counter()
    await backend.load()
    load_ms = (time.perf_counter() - started) * 1000
    system = default_prompt(False)
    started = time.perf_counter()
    await backend.warm(system)
    warm_ms = (time.perf_counter() - started) * 1000
    calls = [await one_call(backend, system, f"call-{i}", questions)
             for i, questions in enumerate(CALLS)]
    story = [ChatMessage(role="system", content=system),
             ChatMessage(role="user", content="Tell me a long story about a dragon.")]
    long_prompt = [ChatMessage(role="system", content=system), ChatMessage(
        role="user", content="Summarise: " + "the quick brown fox jumps over it. " * 60)]
    stops = [await stop_latency(backend, story, after_tokens=STOP_AFTER) for _ in range(3)]
    stops_prefill = [await stop_latency(backend, long_prompt, after_s=STOP_PREFILL_AFTER)
                     for _ in range(3)]
    await backend.aclose()
    if backend.fast is None:
        path = "transformers"
    elif path == "fast" and not getattr(backend.fast, "half", True):
        path = "fast32"  # no fp16 kernel in this torch
    out: dict[str, object] = {"path": path, "load_ms": round(load_ms), "warm_ms": round(warm_ms),
                              "stop_ms": round(max(stops), 1),
                              "stop_prefill_ms": round(max(stops_prefill), 1)}
    for turn, name in ((0, "first"), (1, "second")):
        rows = [call[turn] for call in calls]
        for key in ("prefilled", "prefill_ms", "ttft_ms", "first_sentence_ms", "ms_per_token"):
            out[f"{name}_{key}"] = round(statistics.median(r[key] for r in rows), 1)
        out[f"{name}_rows"] = rows
    return out


def print_path(result: dict[str, object]) -> None:
    print(f"\n{result['path']}: load {result['load_ms']} ms, warm {result['warm_ms']} ms; "
          f"stop while decoding {result['stop_ms']} ms, in a long prefill "
          f"{result['stop_prefill_ms']} ms (worst of 3)")
    print(f"{'call':6} {'turn':7} {'prefilled':>9} {'prefill ms':>10} {'TTFT ms':>8} "
          f"{'1st sent ms':>11} {'tokens':>6} {'ms/token':>8}")
    for name in ("first", "second"):
        for i, row in enumerate(result[f"{name}_rows"]):  # type: ignore[arg-type]
            print(f"{i:<6} {name:7} {row['prefilled']:9.0f} {row['prefill_ms']:10.0f} "
                  f"{row['ttft_ms']:8.0f} {row['first_sentence_ms']:11.0f} {row['tokens']:6.0f} "
                  f"{row['ms_per_token']:8.1f}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="Hugging Face id/folder or .gguf; "
                        "empty: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch default)")
    parser.add_argument("--prompt-threads", type=int, default=2,
                        help="llama.cpp's threads for a prompt")
    parser.add_argument("--paths", default="llama.cpp,fast,fast32,transformers",
                        help="comma-separated: llama.cpp (4-bit kernels on the GGUF), fast "
                             "(lean torch Llama pass, fp16 decode), fast32 (the same, fp32 "
                             "decode), transformers")
    parser.add_argument("--cache-dir", default=str(Path(__file__).resolve().parent.parent / "cache"))
    args = parser.parse_args()
    logs.configure("bench", level="warning")

    results = {}
    for path in args.paths.split(","):
        results[path] = await run_path(args, path)
    load = os.getloadavg()[0]
    print(f"model {args.model or 'bundled SmolLM2-135M-Instruct'}, {args.threads} thread(s) "
          f"(llama.cpp prompts: {args.prompt_threads}), "
          f"max {args.max_tokens} tokens; load average {load:.2f} at the end")
    for result in results.values():
        print_path(result)
    figures: dict[str, object] = {"max_tokens": args.max_tokens, "threads": args.threads,
                                  "prompt_threads": args.prompt_threads,
                                  "load_avg": round(load, 2)}
    for path, result in results.items():
        for key, value in result.items():
            if not key.endswith("_rows") and key != "path":
                figures[f"{path}_{key}"] = value
    print(json.dumps(figures))


if __name__ == "__main__":
    asyncio.run(main())
