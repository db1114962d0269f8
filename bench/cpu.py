"""Who takes the CPU during a call: each actor's and each Chromium process's threads, from /proc.

Run it beside a benchmark that holds a call, e.g. (Linux only)::

    .venv/bin/python bench/cpu.py --after 20 --seconds 55 &
    .venv/bin/python bench/latency.py --turns 6 --modes vad

It reads every thread's CPU time (``/proc/PID/task/TID/stat``) of the actor processes
(``python -m actors.NAME``) and of Chromium (by its ``--type``) at two instants, ``--after``
seconds from its start and ``--seconds`` later, and prints the share of one core each kind of
thread used in between, largest first; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import time
from pathlib import Path

PROC = Path("/proc")


def process_kind(cmdline: str) -> str | None:
    """``asr``, ``llm``... for an actor, ``chromium:renderer``... for Chromium, else None."""
    if match := re.search(r"-m actors\.(\w+)", cmdline):
        return match.group(1)
    if "chrom" in cmdline:
        kind = re.search(r"--type=(\S+)", cmdline)
        sub = re.search(r"--utility-sub-type=([\w]+)", cmdline)
        return "chromium:" + (kind.group(1) if kind else "browser") + (
            f":{sub.group(1)}" if sub else "")
    return None


def snapshot() -> dict[tuple[str, str, str], int]:
    """CPU ticks (user + system) per (process kind, pid, thread name)."""
    ticks: dict[tuple[str, str, str], int] = collections.Counter()
    for proc in PROC.iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            kind = process_kind(cmdline)
            if kind is None:
                continue
            for task in (proc / "task").iterdir():
                stat = (task / "stat").read_text()
                name = stat[stat.index("(") + 1:stat.rindex(")")]
                fields = stat[stat.rindex(")") + 2:].split()
                ticks[(kind, proc.name, name)] += int(fields[11]) + int(fields[12])
        except (OSError, ValueError):
            continue  # the process or thread ended meanwhile
    return ticks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--after", type=float, default=20.0, help="seconds before the first reading")
    parser.add_argument("--seconds", type=float, default=55.0, help="seconds between the readings")
    parser.add_argument("--top", type=int, default=25, help="rows to print")
    args = parser.parse_args()
    hz = os.sysconf("SC_CLK_TCK")
    time.sleep(args.after)
    first, started = snapshot(), time.monotonic()
    time.sleep(args.seconds)
    last, elapsed = snapshot(), time.monotonic() - started
    share: dict[str, float] = collections.Counter()
    for (kind, pid, thread), value in last.items():
        share[f"{kind} {thread}"] += (value - first.get((kind, pid, thread), 0)) / hz / elapsed
    by_process: dict[str, float] = collections.Counter()
    for key, value in share.items():
        by_process[key.split(" ", 1)[0].split(":")[0]] += value
    print(f"\nShare of one core over {elapsed:.0f} s, by thread (largest first)\n")
    for key, value in sorted(share.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {key:50s} {100 * value:6.1f}%")
    print("\n  " + "  ".join(f"{k}={100 * v:.0f}%" for k, v in
                            sorted(by_process.items(), key=lambda kv: -kv[1])))
    print(json.dumps({"bench": "cpu", "seconds": round(elapsed, 1),
                      "processes": {k: round(100 * v, 1) for k, v in by_process.items()},
                      "threads": {k: round(100 * v, 1) for k, v in share.items() if v >= 0.001}}))


if __name__ == "__main__":
    main()
