"""The tap prints live messages in both formats, and garbage on the bus does not crash it."""

from __future__ import annotations

import asyncio
import json
import sys

import msgpack
import zmq

from bus.schema import Control, OpusPacket, Token, Utterance, topic_frame
from tests import harness

MESSAGES = [
    Utterance(session="s-tap", turn=2, pcm=b"\x00\x01" * 16000),
    Token(session="s-tap", turn=2, text="Hello there"),
    OpusPacket(session="s-tap", turn=2, packet=b"\xf8\xff\xfe"),
    Control(session="other", kind="interrupt", turn=5),
]


async def run_tap(broker, *args: str, publish: list | None = None,
                  raw: list[list[bytes]] | None = None) -> tuple[str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bus.tap", *args, cwd=harness.ROOT, env=harness.bus_env(broker),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stderr is not None
        banner = await asyncio.wait_for(proc.stderr.readline(), 20)
        assert b"tapping" in banner
        await asyncio.sleep(0.3)
        async with harness.client(broker) as bus:
            if raw:
                sock = zmq.Context.instance().socket(zmq.PUB)
                sock.connect(broker.pub)
                await asyncio.sleep(0.5)
                for frames in raw:
                    sock.send_multipart(frames)
                await asyncio.sleep(0.2)
                sock.close(linger=500)
            for msg in publish or []:
                bus.publish(msg)
            out, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    return out.decode(), err.decode()


async def test_tap_readable_lines_summarise_binary(broker):
    out, _ = await run_tap(broker, "--count", "3", "--session", "s-tap", publish=MESSAGES)
    lines = out.splitlines()
    assert len(lines) == 3
    utterance = next(line for line in lines if " utterance " in line)
    assert "session=s-tap" in utterance and "turn=2" in utterance
    assert "pcm=<bytes=32000, seconds=1.0>" in utterance
    assert any('text="Hello there"' in line for line in lines)
    assert any("packet=<bytes=3, ms=20.0>" in line for line in lines)
    assert "other" not in out  # session filter


async def test_tap_json_lines_by_topic(broker):
    out, _ = await run_tap(broker, "utterance", "control", "--json", "--count", "2",
                           publish=MESSAGES)
    objs = [json.loads(line) for line in out.splitlines()]
    assert {o["topic"] for o in objs} == {"utterance", "control"}
    utterance = next(o for o in objs if o["topic"] == "utterance")
    assert utterance["pcm"] == {"bytes": 32000, "seconds": 1.0}
    control = next(o for o in objs if o["topic"] == "control")
    assert control["kind"] == "interrupt" and control["turn"] == 5


async def test_garbage_frames_are_dropped_counted_and_logged_once(broker):
    garbage = [
        [topic_frame("token"), b"\xc1\xc1 not msgpack"],
        [topic_frame("token"), b"\xc1 again"],
        [topic_frame("token") + b"extra\0", msgpack.packb({"session": "x"})],
        [topic_frame("token"), msgpack.packb({"session": "x", "text": 42})],
        [topic_frame("token"), msgpack.packb([1, 2, 3])],
        [topic_frame("token"), msgpack.packb({"session": "x", "text": "x" * 100_000})],
        [topic_frame("token")],
    ]
    out, err = await run_tap(broker, "--json", "--count", "1", raw=garbage,
                             publish=[Token(session="after", text="still alive")])
    assert json.loads(out)["text"] == "still alive"
    for kind in ("bad_msgpack", "unknown_topic", "wrong_type", "oversized", "frame_count"):
        assert err.count(f"kind={kind}") == 1, (kind, err)
