"""The call in a real browser: headless Chromium joins through real signaling and media actors.

Chromium's fake devices give a 640x480 test-pattern camera and a Piper speech WAV as microphone
(with silence before and after). The test plays ASR/LLM/TTS: it reads utterances and frames off
the bus and publishes real Opus packets (PyAV libopus, 20 ms at 48 kHz) that the page must hear,
which an AudioWorklet on the remote stream detects (web/onset-worklet.js).
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bus.client import BusClient
from bus.schema import (
    CONTROL,
    FRAME,
    UTTERANCE,
    Control,
    ControlKind,
    Frame,
    Metric,
    OpusPacket,
    Sentence,
    Token,
    Transcript,
    Utterance,
)
from tests import harness
from tests.browser import Chromium, Page, available
from tests.speech import opus_packets, say, silence, write_wav

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not available(), reason="Chromium is not installed (apt-get install chromium)"),
]

QUESTION = "Could you please tell me what the weather will be like in Paris tomorrow afternoon?"
REPLY = "The quick brown fox jumps over the lazy dog."
LEAD_S = 2.5  # silence before the question: the call connects meanwhile
TAIL_S = 2.5
CONNECT_S = 20.0


def speech_extent(pcm: np.ndarray, rate: int) -> float:
    """Seconds from the first to the last 20 ms block louder than -40 dBFS."""
    block = rate // 50
    blocks = pcm[: len(pcm) // block * block].astype(np.float32).reshape(-1, block) / 32768
    loud = np.flatnonzero(np.sqrt((blocks**2).mean(axis=1)) > 0.01)
    return (loud[-1] - loud[0] + 1) / 50 if len(loud) else 0.0


def trim(pcm: np.ndarray, rate: int = 48_000) -> np.ndarray:
    """``pcm`` without its leading and trailing quiet (blocks under -40 dBFS)."""
    block = rate // 50
    blocks = pcm[: len(pcm) // block * block].astype(np.float32).reshape(-1, block) / 32768
    loud = np.flatnonzero(np.sqrt((blocks**2).mean(axis=1)) > 0.01)
    return pcm[loud[0] * block:(loud[-1] + 1) * block]


def loud_seconds(pcm: np.ndarray, rate: int) -> float:
    """Seconds of 20 ms blocks louder than -40 dBFS (how much speech a signal holds)."""
    block = rate // 50
    blocks = pcm[: len(pcm) // block * block].astype(np.float32).reshape(-1, block) / 32768
    return float((np.sqrt((blocks**2).mean(axis=1)) > 0.01).sum()) / 50


@pytest.fixture(scope="module")
def question(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """The microphone WAV (48 kHz mono) and its speech."""
    speech = say(QUESTION, 48_000)
    pcm = np.concatenate([silence(LEAD_S, 48_000), speech, silence(TAIL_S, 48_000)])
    path = write_wav(tmp_path_factory.mktemp("mic") / "question.wav", pcm, 48_000)
    return path, speech


@pytest.fixture(scope="module")
def quiet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_wav(tmp_path_factory.mktemp("mic") / "quiet.wav", silence(1.0, 48_000), 48_000)


def publish_reply(bus: BusClient, session: str, turn: int, packets: list[bytes]) -> float:
    """Publish a turn's packets at once (TTS runs faster than real time); the wall time sent."""
    sent = time.time()
    for i, packet in enumerate(packets):
        bus.publish(OpusPacket(session=session, turn=turn, packet=packet, index=i,
                               final=i == len(packets) - 1))
    return sent


@dataclass
class Stack:
    base: str  # http://127.0.0.1:PORT
    bus: BusClient
    tmp: Path

    def url(self, mode: str = "vad") -> str:
        return f"{self.base}/?mode={mode}&raw=1&loopback=1"


@pytest.fixture
async def stack(broker, actors, tmp_path: Path) -> AsyncIterator[Stack]:
    """Broker, media and signaling processes, and a bus client that sees what they publish."""
    port = harness.free_port()
    await actors.start("media")
    await actors.start("signaling", "--port", str(port))
    async with harness.client(broker, [UTTERANCE, FRAME, CONTROL]) as bus:
        yield Stack(f"http://127.0.0.1:{port}", bus, tmp_path)


async def connected(page: Page) -> str:
    await page.wait_for("parley.state === 'connected'", CONNECT_S, what="call connected")
    return await page.evaluate("parley.session")


def of(session: str, cls: type, **fields: object):
    return lambda m: (isinstance(m, cls) and m.session == session
                      and all(getattr(m, k) == v for k, v in fields.items()))


async def heard_after(page: Page, since_ms: float, count: int = 1, timeout: float = 10.0) -> list:
    """Onsets (page wall-clock ms) detected after ``since_ms``, once there are ``count``."""
    expr = f"parley.onsets.filter(o => o.at > {since_ms}).map(o => o.at)"
    return await page.wait_for(f"(a => a.length >= {count} && a)({expr})", timeout,
                               what=f"{count} audio onset(s) in the page")


async def check_frame(stack: Stack, session: str, turn: int) -> None:
    frame = await harness.recv_until(stack.bus, of(session, Frame, turn=turn), 10)
    image = Image.open(io.BytesIO(frame.jpeg))
    assert image.format == "JPEG"
    assert image.size == (frame.width, frame.height) == (640, 480)


async def test_hands_free_call_utterance_frame_reply_and_interrupt(stack: Stack, question):
    wav, speech = question
    reply = opus_packets(say(REPLY, 48_000))
    reply_s = speech_extent(say(REPLY, 48_000), 48_000)
    long_reply = opus_packets(np.tile(trim(say(REPLY, 48_000)), 6))  # ~13 s without a pause
    async with Chromium(stack.tmp, mic=wav) as chrome:
        page = await chrome.open(stack.url("vad"))
        session = await connected(page)

        # The question arrives as one utterance of its length, with a camera frame.
        utt = await harness.recv_until(stack.bus, of(session, Utterance, partial=False), 25)
        expected = speech_extent(speech, 48_000)
        assert utt.reason == "vad"
        assert abs(utt.duration - expected) <= 0.2 * expected, (utt.duration, expected)
        pcm16 = np.frombuffer(utt.pcm, dtype="<i2")
        assert abs(loud_seconds(pcm16, 16_000) - loud_seconds(speech, 48_000)) \
            <= 0.2 * loud_seconds(speech, 48_000)
        await check_frame(stack, session, utt.turn)

        # ASR and LLM output reach the page's conversation as they stream.
        stack.bus.publish(Transcript(session=session, turn=utt.turn, text=QUESTION))
        stack.bus.publish(Metric(session=session, turn=utt.turn, stage="first_token",
                                 at=time.time()))
        for i, word in enumerate(REPLY.split(" ")):
            stack.bus.publish(Token(session=session, turn=utt.turn, text=f" {word}", index=i))
        stack.bus.publish(Sentence(session=session, turn=utt.turn, text=REPLY, final=True))
        # The reply's words wait for its voice: all of it has arrived, two frames have been
        # painted since, and the question shows but the reply does not yet.
        await page.wait_for(f"parley.summary().find(t => t.turn === {utt.turn} && t.done)", 5,
                            what="reply received")
        bubbles = await page.evaluate(
            "new Promise(ok => requestAnimationFrame(() => requestAnimationFrame(() => {"
            f" const el = document.querySelector('[data-turn=\"{utt.turn}\"]');"
            " ok([el.querySelector('.user .text').textContent,"
            " el.querySelector('.assistant').hidden,"
            " el.querySelector('.assistant .text').textContent]); })))")
        assert bubbles == [QUESTION, True, ""], bubbles

        # Two replies with a pause: the page hears each, and silence in between.
        now = await page.evaluate("performance.timeOrigin + performance.now()")
        first_sent = publish_reply(stack.bus, session, utt.turn, reply)
        [first] = await heard_after(page, now, 1)
        assert first > first_sent * 1000
        turn = await page.wait_for(f"parley.summary().find(t => t.turn === {utt.turn} && t.done "
                                   "&& t.stages.first_sent !== undefined)", 5, what="turn shown")
        assert turn["user"] == QUESTION and turn["assistant"].strip() == REPLY
        assert 0 < turn["stages"]["first_token"] < turn["stages"]["first_sent"] < turn["v2v"]
        # painted with the next animation frame: wait for the figures to show
        shown = await page.wait_for(
            f"(() => {{ const el = document.querySelector('[data-turn=\"{utt.turn}\"]');"
            " return el && el.innerText.includes(' ms') ? el.innerText : null; })()",
            5, what="turn painted")
        assert QUESTION in shown and "jumps over the lazy dog" in shown and " ms" in shown
        await asyncio.sleep(reply_s + 1.0)
        publish_reply(stack.bus, session, utt.turn, reply)
        _, second = await heard_after(page, now, 2)
        gaps = await page.evaluate(f"parley.offsets.map(o => o.at).filter(t => t > {first} "
                                   f"&& t < {second})")
        assert len(gaps) == 1, "one stretch of silence between the two replies"
        heard_s = (gaps[0] - first) / 1000
        assert abs(heard_s - reply_s) <= 0.25 * reply_s, (heard_s, reply_s)
        assert second - gaps[0] > 500  # the pause was sent as silence, not filled

        # Interrupt: a long queued reply stops at once; later packets of that turn stay unheard.
        await page.wait_for(f"parley.offsets.some(o => o.at > {second})", 10, what="reply end")
        now = await page.evaluate("performance.timeOrigin + performance.now()")
        publish_reply(stack.bus, session, utt.turn, long_reply)
        [started] = await heard_after(page, now, 1)
        await asyncio.sleep(1.0)
        await page.key("Escape", "Escape", 27, down=True)  # the page's interrupt shortcut
        pressed = await page.evaluate("parley.interrupts.at(-1).at")
        stopped = await page.wait_for(f"parley.offsets.find(o => o.at > {started})", 5,
                                      what="audio stops after interrupt")
        assert stopped["at"] > pressed - 100, "the long reply played on until the interrupt"
        stop_ms = stopped["at"] - pressed
        print(f"interrupt: queued audio stopped {stop_ms:.0f} ms after the click")
        interrupt = await harness.recv_until(stack.bus, of(session, Control,
                                                           kind=ControlKind.INTERRUPT,
                                                           actor="signaling"), 5)
        assert interrupt.turn == utt.turn + 1
        publish_reply(stack.bus, session, utt.turn, reply)  # stale now
        await asyncio.sleep(1.5)
        late = await page.evaluate(f"parley.onsets.filter(o => o.at > {stopped['at']}).length")
        assert late == 0, "nothing plays after the interrupt"
        assert stop_ms < 1000, "the ~12 s of queued reply stopped at the interrupt"
        assert await page.evaluate("parley.state") == "connected"
        assert page.console_errors == []


async def test_push_to_talk_sends_what_was_said_while_held(stack: Stack, question):
    wav, speech = question
    async with Chromium(stack.tmp, mic=wav) as chrome:
        page = await chrome.open(stack.url("ptt"))
        session = await connected(page)
        await page.key(" ", "Space", 32, down=True)  # hold the Space bar, as a user would
        assert await page.evaluate("parley.talking")
        pressed = await page.evaluate("performance.timeOrigin + performance.now()")
        first_loud = await page.wait_for("parley.mic.firstLoudAt", 10, what="speech starts")
        print(f"push-to-talk: pressed {first_loud - pressed:.0f} ms before the speech began")
        assert first_loud > pressed, "the call connected only after the speech began"
        # Hold until the question has been quiet for 0.6 s, as a person would.
        await page.wait_for("parley.mic.lastLoudAt && performance.timeOrigin + performance.now()"
                            " - parley.mic.lastLoudAt > 600", 15, what="speech ends")
        await page.key(" ", "Space", 32, down=False)
        assert not await page.evaluate("parley.talking")
        released = await page.evaluate("performance.timeOrigin + performance.now()")
        utt = await harness.recv_until(stack.bus, of(session, Utterance, partial=False), 10)
        held_s = (released - pressed) / 1000
        assert utt.reason == "ptt"
        assert abs(utt.duration - held_s) <= 0.2 * held_s, (utt.duration, held_s)
        pcm16 = np.frombuffer(utt.pcm, dtype="<i2")
        assert abs(loud_seconds(pcm16, 16_000) - loud_seconds(speech, 48_000)) \
            <= 0.2 * loud_seconds(speech, 48_000)
        await check_frame(stack, session, utt.turn)
        assert page.console_errors == []


async def test_two_pages_get_separate_sessions_and_closing_one_frees_it(stack: Stack, quiet):
    reply = opus_packets(say(REPLY, 48_000))
    async with Chromium(stack.tmp, mic=quiet) as chrome:
        one = await chrome.open(stack.url())
        two = await chrome.open(stack.url())
        s1, s2 = await connected(one), await connected(two)
        assert s1 != s2
        await chrome.close_page(one)
        ended = await harness.recv_until(stack.bus, of(s1, Control, kind=ControlKind.SESSION_END),
                                         10)
        assert ended.actor == "signaling"
        closed = await harness.recv_until(stack.bus, of(s1, Control, kind=ControlKind.STATE,
                                                        state="closed"), 10)
        assert closed.actor == "media"  # the media actor freed the call
        # The other call goes on: its page still hears what is sent to it.
        now = await two.evaluate("performance.timeOrigin + performance.now()")
        publish_reply(stack.bus, s2, 0, reply)
        await heard_after(two, now, 1)
        assert await two.evaluate("parley.state") == "connected"
        assert two.console_errors == []


async def test_garbage_gets_an_error_and_the_page_rejoins_after_a_server_restart(
        stack: Stack, quiet, actors):
    reply = opus_packets(say(REPLY, 48_000))
    async with Chromium(stack.tmp, mic=quiet) as chrome:
        page = await chrome.open(stack.url())
        session = await connected(page)
        await page.evaluate("parley.ws.send('{garbage'); parley.ws.send('{\"type\": \"fly\"}')")
        codes = await page.wait_for("parley.errors.length >= 2 && parley.errors.map(e => e.code)",
                                    5, what="error events")
        assert codes == ["bad_json", "unknown_type"]
        assert await page.evaluate("document.getElementById('toast-text').textContent") \
            == "unknown message type 'fly'"
        # The call continues: same session, still connected, still hearing replies.
        now = await page.evaluate("performance.timeOrigin + performance.now()")
        publish_reply(stack.bus, session, 0, reply)
        await heard_after(page, now, 1)
        assert await page.evaluate("[parley.state, parley.session]") == ["connected", session]

        # The signaling server restarts on the same port: the page rejoins by itself.
        signaling = next(p for p in actors.procs if "actors.signaling" in p.args)
        await asyncio.to_thread(signaling.stop)
        ended = await harness.recv_until(stack.bus, of(session, Control,
                                                       kind=ControlKind.SESSION_END), 5)
        assert ended.actor == "signaling"  # a stopping server ends its sessions
        await page.wait_for("parley.state !== 'connected'", 10, what="the page notices")
        await actors.start("signaling", *signaling.args[3:], log_name="signaling2")
        rejoined = await page.wait_for(
            f"parley.state === 'connected' && parley.session !== '{session}' && parley.session",
            CONNECT_S, what="rejoined with a new session")
        now = await page.evaluate("performance.timeOrigin + performance.now()")
        publish_reply(stack.bus, rejoined, 0, reply)
        await heard_after(page, now, 1)
