"""TTS benchmark: time to the first Opus packet and real-time factor of the Piper backend.

Runs the backend the actor uses (normalise, synthesise span by span, resample, encode to 20 ms
Opus) on a short and a long sentence, a few times each, after the same warm-up as the actor.

    .venv/bin/python bench/tts.py [--repeats 5] [--threads N] [--whole]

Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engines.tts import BackendSpec, Packet, TtsBackend, make_backend
from engines.tts.base import OPUS_RATE
from engines.tts.normalize import for_speech

SENTENCES = {
    "short": "Sure, it is four.",
    "long": ("Well, the capital of France is Paris, a city of about two million people on the "
             "river Seine, famous for the Eiffel Tower, the Louvre museum, its cafes, and a long "
             "history that goes back more than two thousand years."),
}


async def measure(backend: TtsBackend, text: str) -> dict[str, float]:
    samples = 0
    first: float | None = None
    started = time.perf_counter()

    async def emit(packet: Packet) -> None:
        nonlocal samples, first
        if first is None:
            first = time.perf_counter() - started
        samples += packet.samples

    await backend.synthesize(for_speech(text), emit)
    total = time.perf_counter() - started
    audio_s = samples / OPUS_RATE
    return {"first_ms": (first or total) * 1000, "total_ms": total * 1000, "audio_s": audio_s,
            "rtf": total / audio_s if audio_s else float("nan")}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--voice", default="", help="Piper .onnx voice; empty: the bundled one")
    parser.add_argument("--threads", type=int, default=0,
                        help="onnxruntime threads (0: its default, one per core)")
    parser.add_argument("--whole", action="store_true",
                        help="decode each span whole (as --tts-chunk-decoder 0)")
    args = parser.parse_args()

    backend = make_backend(BackendSpec(backend="piper", voice=args.voice, threads=args.threads,
                                       chunk_decoder=not args.whole))
    started = time.perf_counter()
    await backend.prepare()
    prepare_ms = (time.perf_counter() - started) * 1000

    results: dict[str, dict[str, float]] = {}
    print(f"piper backend, bundled voice; prepare (load + warm-up) {prepare_ms:.0f} ms")
    print(f"{'sentence':<8} {'chars':>5} {'audio s':>8} {'first ms':>9} {'total ms':>9} {'RTF':>6}")
    for name, text in SENTENCES.items():
        runs = [await measure(backend, text) for _ in range(args.repeats)]
        median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        results[name] = median
        print(f"{name:<8} {len(text):>5} {median['audio_s']:>8.2f} {median['first_ms']:>9.0f} "
              f"{median['total_ms']:>9.0f} {median['rtf']:>6.3f}")
    await backend.aclose()
    print(json.dumps({
        "backend": "piper", "threads": args.threads, "chunked": not args.whole,
        "repeats": args.repeats,
        "prepare_ms": round(prepare_ms),
        **{f"{name}_first_packet_ms": round(r["first_ms"], 1) for name, r in results.items()},
        **{f"{name}_rtf": round(r["rtf"], 4) for name, r in results.items()},
        **{f"{name}_audio_s": round(r["audio_s"], 2) for name, r in results.items()},
    }))


if __name__ == "__main__":
    asyncio.run(main())
