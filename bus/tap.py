"""Watch a live bus: ``python -m bus.tap [TOPIC ...] [--session ID] [--json]``.

Prints one line per message: readable by default, one JSON object per line with ``--json``.
Binary fields are summarised (byte count, and duration for audio), never dumped. Heartbeats are
hidden unless ``--heartbeats`` is given; ``--count N`` exits after N messages.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from dataclasses import asdict
from typing import Any, TextIO

from bus import schema
from bus.client import BusClient, Endpoints
from bus.schema import Control, ControlKind, Message, OpusPacket, Utterance
from core import config, logs

TEXT_LIMIT = 120  # readable mode shortens long strings (SDP) to this many characters


def summarise(msg: Message) -> dict[str, Any]:
    """The message's fields with binary ones replaced by a summary."""
    out: dict[str, Any] = {"topic": msg.TOPIC}
    for name, value in asdict(msg).items():
        if isinstance(value, bytes):
            summary: dict[str, Any] = {"bytes": len(value)}
            if isinstance(msg, Utterance) and name == "pcm":
                summary["seconds"] = round(msg.duration, 3)
            elif isinstance(msg, OpusPacket) and name == "packet":
                summary["ms"] = round(msg.samples / schema.OPUS_RATE * 1000, 1)
            value = summary
        out[name] = value
    return out


def readable(fields: dict[str, Any]) -> str:
    """One human line: time, topic, envelope, then the non-empty payload fields."""
    fields = dict(fields)
    ts = fields.pop("ts")
    stamp = time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts % 1 * 1000):03d}"
    head = (f"{stamp} {fields.pop('topic'):<11} session={fields.pop('session') or '-'} "
            f"turn={fields.pop('turn')} seq={fields.pop('seq')} src={fields.pop('source')}")
    parts = []
    for name, value in fields.items():
        if value in ("", 0, 0.0, False) and name not in ("index", "final"):
            continue
        if isinstance(value, dict):
            value = "<" + ", ".join(f"{k}={v}" for k, v in value.items()) + ">"
        elif isinstance(value, str):
            text = value if len(value) <= TEXT_LIMIT else value[:TEXT_LIMIT] + "…"
            value = json.dumps(text, ensure_ascii=False)
        parts.append(f"{name}={value}")
    return head + (" " + " ".join(parts) if parts else "")


def wanted(msg: Message, session: str | None, heartbeats: bool) -> bool:
    if session is not None and msg.session != session:
        return False
    return not (isinstance(msg, Control) and msg.kind == ControlKind.HEARTBEAT and not heartbeats)


async def tap(endpoints: Endpoints, topics: list[str], *, session: str | None, as_json: bool,
              heartbeats: bool, count: int, out: TextIO) -> int:
    bus = BusClient(endpoints, "tap", topics)
    try:
        await bus.wait_connected(timeout=10.0)
        print(f"# tapping {', '.join(topics)} on {endpoints.sub}", file=sys.stderr, flush=True)
        seen = 0
        while count <= 0 or seen < count:
            msg = await bus.recv()
            if not wanted(msg, session, heartbeats):
                continue
            fields = summarise(msg)
            print(json.dumps(fields, ensure_ascii=False) if as_json else readable(fields),
                  file=out, flush=True)
            seen += 1
    finally:
        bus.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    def extend(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("topics", nargs="*", metavar="TOPIC",
                            help=f"topics to show (default all): {', '.join(schema.TOPICS)}")
        parser.add_argument("--session", help="show only this session")
        parser.add_argument("--json", action="store_true", help="one JSON object per line")
        parser.add_argument("--heartbeats", action="store_true", help="also show heartbeats")
        parser.add_argument("--count", type=int, default=0, help="exit after this many messages")

    args = config.parse(["bus", "log"], argv, prog="python -m bus.tap",
                        description=__doc__.splitlines()[0], extend=extend)
    unknown = [t for t in args.topics if t not in schema.TOPICS]
    if unknown:
        print(f"tap: unknown topic(s) {', '.join(unknown)}; known: {', '.join(schema.TOPICS)}",
              file=sys.stderr)
        return 2
    logs.configure("tap", json=args.log_json, level=args.log_level)
    with contextlib.suppress(BrokenPipeError):
        try:
            return asyncio.run(_run(args))
        except TimeoutError as exc:
            print(f"tap: {exc}", file=sys.stderr)
            return 1
    return 0


async def _run(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    assert me is not None
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, me.cancel)
    try:
        return await tap(Endpoints.from_settings(args), args.topics or list(schema.TOPICS),
                         session=args.session, as_json=args.json, heartbeats=args.heartbeats,
                         count=args.count, out=sys.stdout)
    except asyncio.CancelledError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
