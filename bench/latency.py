"""Voice-to-voice latency in a real browser: the figure this project is judged by.

Starts the whole system (``python supervisor.py`` with its defaults, bundled models), opens the
call page in headless Chromium whose fake microphone plays generated speech (several different
questions, each followed by a pause), and measures at the page, per turn: from the end of the
user's speech *in the microphone signal* to the first audible sample of the reply. Both instants
come from the same AudioWorklet clock (web/onset-worklet.js on the mic and on the remote audio).

Push-to-talk is pressed when the mic signal starts and released when it has been silent for
250 ms (the page's onset detector), so the ptt figure includes that human-like release delay.
Hands-free includes the VAD's endpointing silence (--vad-silence-ms, answered speculatively
from --vad-early-ms).

Chromium shares the two cores with the system it measures, which a real call does not (the
browser runs on the user's device). ``--browser-nice 10`` runs it at a lower CPU priority, as
close as one machine gets to that (it made no measurable difference here: see
docs/performance.md); the default, 0, lets it compete as an equal.

    .venv/bin/python bench/latency.py [--turns 6] [--modes ptt,vad] [--gap 9] [--browser-nice 0]
                                      [--browser-flag=--FLAG ...] [-- SUPERVISOR ARGS]

Before the system starts and after it stops, ``bench/calibrate.py`` measures how fast this
machine runs each model alone (``--no-calibrate`` skips it): machines of one kind differ by up to
half in speed, and a shared host's speed can drift by as much within minutes, so a run's figures
are read beside its machine's, and a run whose two calibrations disagree is suspect.

Prints p50/p95 per stage and end to end per mode, the page's jitter buffer (WebRTC getStats:
how long the reply's audio waited in Chromium's buffer, on average, and the buffer's target: part
of the last stage, from the first packet sent to the first sound heard), and the stalls: silences
of at least 600 ms inside a reply (its voice waiting for the next sentence; Piper's own pauses
between sentences are 150-250 ms). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.browser import Chromium
from tests.speech import say, silence, write_wav
from tests.system import SupervisorRun

QUESTIONS = (
    "What is the capital of France?",
    "What color is the sky on a clear day?",
    "How many legs does a dog have?",
    "Can you name a fruit that is yellow?",
    "What do bees make?",
    "Which planet do we live on?",
    "What is the opposite of hot?",
    "What season comes after winter?",
    "Where does the sun rise?",
    "What do cows drink?",
)
STAGES = ("endpoint", "transcript", "first_token", "first_sentence", "first_packet", "first_sent")
RATE = 48_000
LEAD_S = 3.0  # the call connects meanwhile
GROUP_GAP_MS = 1500  # mic sounds closer than this belong to one question
STALL_MS = 600  # a silence this long inside a reply is the voice waiting, not a pause
CALIBRATE_TIMEOUT_S = 300  # bench/calibrate.py takes ~20 s (the first run converts models)

PTT_DRIVER = """
(() => {
  window.__bench = { releases: [] };
  parley.meter.addEventListener("mic-onset", () => parley.talk(true));
  parley.meter.addEventListener("mic-offset", (ev) => {
    parley.talk(false);
    window.__bench.releases.push({ end: ev.detail.at, at: performance.timeOrigin + performance.now() });
  });
  return true;
})()
"""

# The page's receiver of the reply (WebRTC getStats): the mean time an audio sample waited in
# Chromium's jitter buffer, the buffer's own target, and its concealment (samples it invented
# because a packet was late): the part of the last stage that is the network's and NetEq's.
RECEIVER_STATS = """
(async () => {
  if (!parley.pc) return "{}";
  const stats = await parley.pc.getStats();
  for (const s of stats.values()) {
    if (s.type !== "inbound-rtp" || s.kind !== "audio" || !s.jitterBufferEmittedCount) continue;
    const per = (v) => (v || 0) * 1000 / s.jitterBufferEmittedCount;
    return JSON.stringify({
      jitter_buffer_ms: per(s.jitterBufferDelay), target_ms: per(s.jitterBufferTargetDelay),
      minimum_ms: per(s.jitterBufferMinimumDelay),
      concealed_pct: 100 * (s.concealedSamples || 0) / Math.max(1, s.totalSamplesReceived || 0),
      jitter_ms: (s.jitter || 0) * 1000});
  }
  return "{}";
})()
"""


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def microphone(turns: int, gap_s: float, folder: Path) -> tuple[Path, list[str]]:
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(turns)]
    parts = [silence(LEAD_S, RATE)]
    for question in questions:
        parts += [say(question, RATE), silence(gap_s, RATE)]
    return write_wav(folder / "questions.wav", np.concatenate(parts), RATE), questions


def stalls(first: float, limit: float, onsets: list[float], offsets: list[float]) -> list[float]:
    """Silences of at least STALL_MS between a reply's first onset and ``limit``."""
    out = []
    for onset in (o for o in onsets if first < o < limit):
        before = [off for off in offsets if first <= off < onset]
        if before and onset - before[-1] >= STALL_MS:
            out.append(onset - before[-1])
    return out


def group_sounds(onsets: list[float], offsets: list[float]) -> list[tuple[float, float]]:
    """(start, end) of each spoken question in the mic signal."""
    groups: list[list[float]] = []
    for start in sorted(onsets):
        if groups and start - groups[-1][1] < GROUP_GAP_MS:
            groups[-1][1] = max(groups[-1][1], start)
        else:
            groups.append([start, start])
    spans = []
    for i, (start, _) in enumerate(groups):
        limit = groups[i + 1][0] if i + 1 < len(groups) else float("inf")
        ends = [o for o in offsets if start <= o < limit]
        if ends:
            spans.append((start, max(ends)))
    return spans


async def run_mode(mode: str, url: str, wav: Path, questions: list[str], gap_s: float,
                   nice: int, flags: tuple[str, ...] = ()) -> dict:
    duration = LEAD_S + sum(len(say(q, RATE)) / RATE + gap_s for q in questions)
    async with Chromium(mic=wav, nice=nice, extra_flags=flags) as browser:
        page = await browser.open(f"{url}?mode={mode}&raw=1&loopback=1")
        await page.wait_for("parley.state === 'connected'", timeout=30)
        if mode == "ptt":
            await page.evaluate(PTT_DRIVER)
        await asyncio.sleep(duration)
        receiver = json.loads(await page.evaluate(RECEIVER_STATS))
        data = json.loads(await page.evaluate(
            "JSON.stringify({summary: parley.summary(), micOnsets: parley.micOnsets,"
            " micOffsets: parley.micOffsets, onsets: parley.onsets, offsets: parley.offsets,"
            " errors: parley.errors,"
            " releases: (window.__bench || {}).releases || []})"))
    spans = group_sounds([o["at"] for o in data["micOnsets"]], [o["at"] for o in data["micOffsets"]])
    replies = sorted(o["at"] for o in data["onsets"])
    silences = sorted(o["at"] for o in data["offsets"])
    turns = []
    for i, (_start, end) in enumerate(spans):
        limit = spans[i + 1][0] if i + 1 < len(spans) else float("inf")
        reply = next((r for r in replies if end < r < limit), None)
        row: dict = {"question": questions[i] if i < len(questions) else "?",
                     "speech_end": end, "v2v_ms": None if reply is None else reply - end,
                     "stalls_ms": [] if reply is None else stalls(reply, limit, replies, silences)}
        turn = min(data["summary"], default=None,
                   key=lambda t: abs((t.get("speechEnd") or 0) - end))
        if turn and turn.get("speechEnd") and abs(turn["speechEnd"] - end) < GROUP_GAP_MS:
            row["heard"] = turn.get("user", "")
            row["reply"] = turn.get("assistant", "")
            row["stages"] = {"endpoint": turn["speechEnd"] - end,
                             **{k: turn["speechEnd"] + v - end
                                for k, v in (turn.get("stages") or {}).items()}}
        turns.append(row)
    return {"turns": turns, "errors": data["errors"], "questions": len(questions),
            "spoken": len(spans), "receiver": receiver}


def summarise(result: dict) -> dict:
    v2v = [t["v2v_ms"] for t in result["turns"] if t["v2v_ms"] is not None]
    gaps = [g for t in result["turns"] for g in t.get("stalls_ms", [])]
    out = {"turns": result["questions"], "answered": len(v2v),
           "replies_with_stalls": sum(1 for t in result["turns"] if t.get("stalls_ms")),
           "stalls": len(gaps), "stall_max_ms": max(gaps, default=0.0),
           "v2v_p50_ms": percentile(v2v, 50), "v2v_p95_ms": percentile(v2v, 95),
           "v2v_mean_ms": statistics.fmean(v2v) if v2v else None, "stages": {},
           "receiver": result.get("receiver", {})}
    for stage in STAGES:
        values = [t["stages"][stage] for t in result["turns"]
                  if stage in t.get("stages", {})]
        out["stages"][stage] = {"p50_ms": percentile(values, 50), "p95_ms": percentile(values, 95)}
    return out


def calibrate() -> dict:
    """This machine's speed with each model alone (``bench/calibrate.py``'s JSON line), or {}
    when it failed (the benchmark goes on without it)."""
    try:
        done = subprocess.run([sys.executable, str(ROOT / "bench" / "calibrate.py")], cwd=ROOT,
                              capture_output=True, text=True, timeout=CALIBRATE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(f"calibration gave no answer in {CALIBRATE_TIMEOUT_S} s", file=sys.stderr)
        return {}
    lines = done.stdout.strip().splitlines()
    try:
        figures = json.loads(lines[-1]) if done.returncode == 0 and lines else {}
    except json.JSONDecodeError:
        figures = {}
    if not figures:
        print(f"calibration failed (exit {done.returncode}): {done.stderr.strip()[-300:]}",
              file=sys.stderr)
    figures.pop("bench", None)
    return figures


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=6, help="questions per mode")
    parser.add_argument("--modes", default="ptt,vad")
    parser.add_argument("--gap", type=float, default=9.0, help="seconds of silence after each question")
    parser.add_argument("--keep-log", type=Path, default=None,
                        help="copy the system's log (every actor's lines) to this file")
    parser.add_argument("--browser-nice", type=int, default=0,
                        help="CPU niceness of Chromium (10: as if on another machine)")
    parser.add_argument("--browser-flag", action="append", default=[],
                        help="one more Chromium command-line flag (repeatable)")
    parser.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                        help="measure each model alone before and after the run (bench/calibrate.py)")
    parser.add_argument("supervisor_args", nargs="*", help="extra flags for supervisor.py (after --)")
    args = parser.parse_args()
    results = {}
    machine = {"before": calibrate()} if args.calibrate else {}
    with tempfile.TemporaryDirectory(prefix="parley-bench-") as tmp:
        folder = Path(tmp)
        wav, questions = microphone(args.turns, args.gap, folder)
        started = time.perf_counter()
        async with SupervisorRun(folder, *args.supervisor_args) as system:
            print(f"system ready in {time.perf_counter() - started:.1f} s", file=sys.stderr)
            for mode in args.modes.split(","):
                results[mode] = await run_mode(mode, system.url, wav, questions, args.gap,
                                               args.browser_nice, tuple(args.browser_flag))
            if args.keep_log is not None:
                args.keep_log.write_text(system.output())
    if machine:
        machine["after"] = calibrate()

    print(f"\nVoice-to-voice latency at the page, {args.turns} questions per mode "
          f"(ms after the end of speech in the mic signal), Chromium at nice "
          f"{args.browser_nice}\n")
    for when, figures in machine.items():
        shown = [f"{k.removesuffix('_ms')} {v:g}" for k, v in figures.items() if k != "repeats"]
        print(f"machine {when} the run, each model alone (bench/calibrate.py, ms): "
              + (", ".join(shown) or "not measured (see above)"))
    if machine:
        print()
    summary = {}
    for mode, result in results.items():
        summary[mode] = s = summarise(result)
        print(f"[{mode}] answered {s['answered']}/{s['turns']}")
        print(f"  {'stage':<16}{'p50':>8}{'p95':>8}")
        for stage in STAGES:
            print(f"  {stage:<16}{fmt(s['stages'][stage]['p50_ms']):>8}"
                  f"{fmt(s['stages'][stage]['p95_ms']):>8}")
        print(f"  {'voice-to-voice':<16}{fmt(s['v2v_p50_ms']):>8}{fmt(s['v2v_p95_ms']):>8}")
        if s["receiver"]:
            r = s["receiver"]
            print(f"  receiver: jitter buffer {r['jitter_buffer_ms']:.0f} ms mean (target "
                  f"{r['target_ms']:.0f}, minimum {r['minimum_ms']:.0f}), concealed "
                  f"{r['concealed_pct']:.1f}% of samples, jitter {r['jitter_ms']:.1f} ms")
        print(f"  stalls (silences >= {STALL_MS} ms inside a reply): {s['stalls']} in "
              f"{s['replies_with_stalls']} replies, longest {fmt(s['stall_max_ms'])} ms")
        for turn in result["turns"]:
            gaps = "".join(f" [stall {g:.0f} ms]" for g in turn.get("stalls_ms", []))
            print(f"    {fmt(turn['v2v_ms']):>6} ms  {turn['question']!r} -> heard "
                  f"{turn.get('heard', '')!r}; reply {turn.get('reply', '')[:60]!r}{gaps}")
        if result["errors"]:
            print(f"  errors: {result['errors'][:3]}")
        print()
    print(json.dumps({"bench": "latency", "browser_nice": args.browser_nice,
                      "browser_flags": args.browser_flag, "machine": machine, "modes": summary}))


if __name__ == "__main__":
    asyncio.run(main())
