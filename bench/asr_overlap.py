"""How long a turn's end waits for the partial utterance being transcribed when it comes.

While the user speaks, the media actor sends the words so far every ``--partial-ms`` as a
*partial* utterance; the ASR actor transcribes one when its thread is free. When the turn ends
while one is in progress, the turn's utterance waits for that work first. This drives a real
broker and a real ASR actor process (bundled tiny.en): a partial utterance (the first part of a
question), then, ``--delays`` ms later, the whole question as the turn's utterance, and times
the turn's transcript from the moment its utterance was published.

    .venv/bin/python bench/asr_overlap.py [--reps 5] [--delays 0,25,50,100,150]

Prints a table (p50 / max per delay, and the question alone for reference); the last line is
one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bus.schema import TRANSCRIPT, Transcript, Utterance
from tests import harness
from tests.speech import say

QUESTION = "Can you name a fruit that is yellow and sweet?"
PARTIAL_S = 1.2  # of the question, sent as the words so far


async def transcript_ms(bus, session: str, pcm: bytes, partial: bytes | None,
                        delay_s: float) -> float:
    """Milliseconds from the turn's utterance to its transcript."""
    if partial is not None:
        bus.publish(Utterance(session=session, turn=1, pcm=partial, partial=True))
        await asyncio.sleep(delay_s)
    sent = time.perf_counter()
    bus.publish(Utterance(session=session, turn=1, pcm=pcm))
    await harness.recv_until(
        bus, lambda m: isinstance(m, Transcript) and m.session == session and not m.partial, 60)
    return (time.perf_counter() - sent) * 1000


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--delays", default="0,25,50,100,150",
                        help="ms between the partial utterance and the turn's")
    args = parser.parse_args()
    delays = [int(d) for d in args.delays.split(",")]
    question = say(QUESTION)
    pcm = question.astype("<i2").tobytes()
    partial = question[: int(PARTIAL_S * 16_000)].astype("<i2").tobytes()
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="parley-bench-") as tmp:
        folder = Path(tmp)
        broker, endpoints = harness.start_broker(folder)
        try:
            asr = await harness.start_actor(folder, endpoints, "asr")
            try:
                async with harness.client(endpoints, [TRANSCRIPT], actor="bench") as bus:
                    await asyncio.sleep(0.5)
                    n = 0
                    for label, delay in [("alone", None), *((f"{d} ms", d) for d in delays)]:
                        for _ in range(args.reps):
                            n += 1
                            ms = await transcript_ms(bus, f"b{n}", pcm,
                                                     None if delay is None else partial,
                                                     (delay or 0) / 1000)
                            rows.setdefault(label, []).append(ms)
                            await asyncio.sleep(0.5)  # the partial's work, if any, is over
            finally:
                asr.stop()
        finally:
            broker.stop()
    print(f"\nThe turn's transcript after its utterance, {args.reps} reps; a partial utterance "
          f"({PARTIAL_S} s of the {len(question) / 16_000:.1f} s question) sent the given delay "
          f"before it\n")
    print(f"  {'partial sent before':<22}{'p50 ms':>8}{'max ms':>8}")
    figures = {}
    for label, values in rows.items():
        figures[label] = {"p50_ms": round(statistics.median(values), 1),
                          "max_ms": round(max(values), 1)}
        print(f"  {label:<22}{figures[label]['p50_ms']:>8.0f}{figures[label]['max_ms']:>8.0f}")
    print(json.dumps({"bench": "asr_overlap", "reps": args.reps, "question_s":
                      round(len(question) / 16_000, 2), "partial_s": PARTIAL_S,
                      "results": figures}))


if __name__ == "__main__":
    asyncio.run(main())
