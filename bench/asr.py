"""ASR latency and real-time factor for 1, 3 and 10 s utterances, per available model.

Direct engine calls (no bus): what the ASR actor's worker thread does for one utterance, the
VAD guard included. Speech is the bundled Piper voice reading a paragraph, cut to length.

    .venv/bin/python bench/asr.py [--models tiny.en,base] [--reps 3] [--backend faster-whisper]

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engines.asr import EngineSpec, ModelUnavailable, load_engine
from engines.asr.pipeline import Recognizer
from tests.speech import say

PARAGRAPH = ("The weather was calm this morning, so we walked down to the harbour and watched the "
             "fishing boats come in. Later we bought fresh bread, some cheese and two apples, and "
             "had a long lunch in the park before the rain started.")
DURATIONS = (1.0, 3.0, 10.0)


def speech_of(seconds: float) -> bytes:
    pcm = say(PARAGRAPH)
    while pcm.size < seconds * 16_000:
        pcm = np.concatenate([pcm, pcm])
    return pcm[: int(seconds * 16_000)].astype("<i2").tobytes()


def bench_model(spec: EngineSpec, reps: int) -> dict[str, object]:
    started = time.perf_counter()
    engine = load_engine(spec)
    load_s = time.perf_counter() - started
    recognizer = Recognizer(engine)
    started = time.perf_counter()
    recognizer.warm_up()
    warm_s = time.perf_counter() - started
    rows: dict[str, dict[str, float]] = {}
    for seconds in DURATIONS:
        pcm = speech_of(seconds)
        totals, whisper, vad = [], [], []
        text = ""
        for _ in range(reps):
            started = time.perf_counter()
            result = recognizer.recognise(pcm)
            totals.append((time.perf_counter() - started) * 1000)
            whisper.append(result.asr_ms)
            vad.append(result.vad_ms)
            text = result.text
        latency = statistics.median(totals)
        rows[f"{seconds:g}s"] = {
            "latency_ms": round(latency, 1),
            "whisper_ms": round(statistics.median(whisper), 1),
            "vad_ms": round(statistics.median(vad), 2),
            "rtf": round(latency / 1000 / seconds, 3),
            "words": len(text.split()),
        }
    return {"model": engine.name, "device": engine.device, "load_s": round(load_s, 2),
            "warm_s": round(warm_s, 2), "runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny.en,base")
    parser.add_argument("--backend", default="faster-whisper")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cache-dir", default="cache")
    args = parser.parse_args()

    results: list[dict[str, object]] = []
    skipped: dict[str, str] = {}
    for model in args.models.split(","):
        spec = EngineSpec(backend=args.backend, model=model, device=args.device,
                          cache_dir=args.cache_dir)
        try:
            results.append(bench_model(spec, args.reps))
        except ModelUnavailable as exc:
            skipped[model] = str(exc)
            print(f"skipped {model}: {exc}", file=sys.stderr)

    print(f"{'model':<28} {'device':<6} {'audio':>6} {'latency ms':>11} {'whisper ms':>11} "
          f"{'vad ms':>7} {'RTF':>6}")
    for res in results:
        for audio, row in res["runs"].items():  # type: ignore[union-attr]
            print(f"{res['model']:<28} {res['device']:<6} {audio:>6} {row['latency_ms']:>11} "
                  f"{row['whisper_ms']:>11} {row['vad_ms']:>7} {row['rtf']:>6}")
        print(f"{res['model']:<28} load {res['load_s']} s, warm-up {res['warm_s']} s")
    print(json.dumps({"bench": "asr", "reps": args.reps, "results": results,
                      "skipped": skipped}))


if __name__ == "__main__":
    main()
