"""Messages of every topic cross the real broker between separate processes, intact."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import asdict

from bus import schema
from bus.schema import Control, Frame, Metric, OpusPacket, Sentence, Token, Transcript, Utterance
from tests import harness

SAMPLES: list[schema.Message] = [
    Utterance(session="s1", turn=3, pcm=bytes(range(256)) * 100, reason="ptt", speech_end=12.5),
    Frame(session="s1", turn=3, jpeg=b"\xff\xd8" + bytes(5000) + b"\xff\xd9", width=640, height=480),
    Transcript(session="s1", turn=3, text="what is two plus two", language="en", asr_ms=81.5),
    Token(session="s1", turn=3, text="Four", index=0),
    Sentence(session="s1", turn=3, text="It is four.", index=0, final=True),
    OpusPacket(session="s1", turn=3, packet=b"\xf8\xff\xfe", index=7, final=True),
    Control(session="s1", turn=4, kind="interrupt"),
    Metric(session="s1", turn=3, stage="first_token", at=1.5, ms=120.0),
]

PUBLISHER = r"""
import asyncio, sys
from bus.client import BusClient, Endpoints
from tests.test_bus_roundtrip import SAMPLES
async def main():
    async with BusClient(Endpoints(pub=sys.argv[1], sub=sys.argv[2]), "publisher") as bus:
        await asyncio.sleep(0.5)   # the test's subscriber is already connected
        for msg in SAMPLES:
            bus.publish(msg)
        await asyncio.sleep(0.5)
asyncio.run(main())
"""


async def test_every_topic_round_trips_between_processes(broker):
    async with harness.client(broker, schema.TOPICS) as bus:
        pub = subprocess.Popen([sys.executable, "-c", PUBLISHER, broker.pub, broker.sub],
                               cwd=harness.ROOT)
        try:
            got = [await harness.recv_until(bus, lambda m: m.source.startswith("publisher"), 20)
                   for _ in SAMPLES]
        finally:
            pub.wait(20)
    by_topic = {m.TOPIC: m for m in got}
    assert set(by_topic) == set(schema.TOPICS)
    for sent in SAMPLES:
        received = by_topic[sent.TOPIC]
        sent_fields, got_fields = asdict(sent), asdict(received)
        for envelope in ("seq", "ts", "source"):
            sent_fields.pop(envelope), got_fields.pop(envelope)
        assert got_fields == sent_fields  # binary fields byte-for-byte
        assert received.seq == 1  # first message of each topic from that publisher
        assert abs(received.ts - time.time()) < 30
