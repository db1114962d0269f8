"""The signaling actor over its real WebSocket, with a real broker and a real process.

The test plays the page (aiohttp's WebSocket client) and the other actors (a bus client that
publishes what media, ASR, LLM and TTS would).
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bus.schema import (
    CONTROL,
    Control,
    ControlKind,
    Metric,
    Sentence,
    Token,
    Transcript,
)
from tests import harness

SDP = ("v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
       "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=rtpmap:111 opus/48000/2\r\n")


async def start_signaling(actors: Any, *args: str) -> str:
    port = harness.free_port()
    await actors.start("signaling", "--port", str(port), *args)
    return f"127.0.0.1:{port}"


async def next_event(ws: aiohttp.ClientWebSocketResponse, kind: str | None = None,
                     timeout: float = 5.0) -> dict[str, Any]:
    """The next JSON event (of ``kind``, skipping others) from the server."""
    while True:
        frame = await ws.receive(timeout)
        assert frame.type == aiohttp.WSMsgType.TEXT, f"socket ended: {frame.type} {frame.data}"
        event = json.loads(frame.data)
        if kind is None or event["type"] == kind:
            return event


async def join(http: aiohttp.ClientSession, host: str) -> tuple[aiohttp.ClientWebSocketResponse, str]:
    ws = await http.ws_connect(f"ws://{host}/ws")
    event = await next_event(ws)
    assert event["type"] == "session" and event["session"]
    return ws, event["session"]


def control(kind: str, session: str | None = None):
    return lambda m: (isinstance(m, Control) and m.kind == kind
                      and (session is None or m.session == session))


async def alive(ws: aiohttp.ClientWebSocketResponse) -> bool:
    """The socket still answers: a ping gets its pong (skipping events queued before it)."""
    await ws.send_json({"type": "ping", "t": 42})
    return (await next_event(ws, "pong"))["t"] == 42


async def test_each_socket_is_a_session_and_closing_one_ends_only_it(broker, actors):
    host = await start_signaling(actors)
    async with harness.client(broker, [CONTROL]) as bus, aiohttp.ClientSession() as http:
        ws1, s1 = await join(http, host)
        ws2, s2 = await join(http, host)
        assert s1 != s2
        await ws1.close()
        ended = await harness.recv_until(bus, control(ControlKind.SESSION_END), 5)
        assert ended.session == s1
        later = await harness.collect(bus, control(ControlKind.SESSION_END), 1.0)
        assert [m.session for m in later] == []
        assert await alive(ws2)
        async with http.get(f"http://{host}/healthz") as resp:
            assert (await resp.json())["sessions"] == 1
        await ws2.send_json({"type": "hangup"})
        assert (await next_event(ws2, "state"))["state"] == "ended"
        ended = await harness.recv_until(bus, control(ControlKind.SESSION_END), 5)
        assert ended.session == s2
        assert (await ws2.receive(5)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


async def test_offer_and_controls_reach_the_bus_and_events_only_their_page(broker, actors):
    host = await start_signaling(actors)
    async with harness.client(broker, [CONTROL]) as bus, aiohttp.ClientSession() as http:
        ws1, s1 = await join(http, host)
        ws2, _ = await join(http, host)

        await ws1.send_json({"type": "offer", "sdp": SDP, "mode": "ptt", "video": "screen"})
        offer = await harness.recv_until(bus, control(ControlKind.OFFER, s1), 5)
        assert (offer.sdp, offer.sdp_type, offer.mode, offer.turn) == (SDP, "offer", "ptt", 0)
        assert offer.text == "screen"  # the page shares its screen
        await ws1.send_json({"type": "video", "source": "camera"})
        video = await harness.recv_until(bus, control(ControlKind.VIDEO, s1), 5)
        assert video.text == "camera"
        # No media actor runs here: the page is told, in words, while the offer waits.
        assert (await next_event(ws1, "error", timeout=8))["code"] == "media_unavailable"

        # The test plays media (answer, turn start), ASR, LLM and TTS.
        bus.publish(Control(session=s1, kind=ControlKind.ANSWER, sdp="v=0 answer",
                            sdp_type="answer"))
        assert (await next_event(ws1, "answer"))["sdp"] == "v=0 answer"
        published: list[Any] = [
            Control(session=s1, turn=3, kind=ControlKind.INTERRUPT, actor="media",
                    text="void"),
            Metric(session=s1, turn=3, stage="speech_end", at=1000.0),
            Transcript(session=s1, turn=3, text="hello there", language="en", asr_ms=80.0),
            Token(session=s1, turn=3, text="Hi", index=0),
            Sentence(session=s1, turn=3, text="Hi!", index=0, final=True),
            Control(session=s1, turn=3, kind=ControlKind.STATE, state="assistant_speaking",
                    actor="media"),
            Control(session=s1, turn=3, kind=ControlKind.ERROR, text="tts failed", actor="tts"),
        ]
        for msg in published:
            bus.publish(msg)
        # Control travels on its own lane, ahead of text: compare by type, not order.
        got = {e["type"]: e for e in [await next_event(ws1) for _ in published]}
        assert sorted(got) == ["error", "interrupt", "metric", "sentence", "state", "token",
                               "transcript"]
        assert all(e["turn"] == 3 for e in got.values())
        assert got["interrupt"]["void"] is True  # the early-ended turn 2 is superseded
        assert got["metric"]["stage"] == "speech_end" and got["metric"]["at"] == 1000.0
        assert got["transcript"]["text"] == "hello there" and got["token"]["text"] == "Hi"
        assert got["transcript"]["partial"] is False  # the final words, not a live caption
        assert got["sentence"]["final"] is True and got["state"]["state"] == "assistant_speaking"
        assert got["error"]["text"] == "tts failed" and got["error"]["source"] == "tts"

        # A draft (the voice's guess at a sentence) is not forwarded: the page shows sentences
        # once they are sure. A token after it, on the same lane, marks where it would be.
        bus.publish(Sentence(session=s1, turn=3, text="Hi.", index=1, draft=True))
        bus.publish(Token(session=s1, turn=3, text=" there", index=1))
        assert (await next_event(ws1))["type"] == "token"

        # A stale turn's tokens are not forwarded once the turn moved on.
        bus.publish(Token(session=s1, turn=2, text="old", index=5))

        await ws1.send_json({"type": "talk", "pressed": True})
        await ws1.send_json({"type": "talk", "pressed": False})
        await ws1.send_json({"type": "mode", "mode": "vad"})
        await ws1.send_json({"type": "interrupt"})
        kinds = [ControlKind.TALK_START, ControlKind.TALK_STOP, ControlKind.MODE,
                 ControlKind.INTERRUPT]
        seen = [await harness.recv_until(bus, lambda m: isinstance(m, Control)
                                         and m.session == s1 and m.kind in kinds
                                         and m.actor == "signaling", 5)
                for _ in kinds]
        assert [m.kind for m in seen] == kinds
        assert seen[2].mode == "vad"
        assert seen[3].turn == 4  # the last turn the session saw, plus one
        assert (await next_event(ws1))["type"] == "interrupt"  # the page hears it too
        assert await alive(ws1)  # no "old" token came before the pong

        # The other page got nothing of this session.
        await ws2.send_json({"type": "ping", "t": 1})
        assert (await next_event(ws2))["type"] == "pong"


BAD_INPUT: list[tuple[Any, str]] = [
    ("not json at all", "bad_json"),
    ("[1, 2, 3]", "bad_message"),
    ('{"type": 5}', "bad_message"),
    ('{"type": "dance"}', "unknown_type"),
    ('{"type": "offer", "sdp": 5}', "bad_sdp"),
    ('{"type": "offer", "sdp": "hello"}', "bad_sdp"),
    (json.dumps({"type": "offer", "sdp": SDP + "a=x\r\n" * 20_000}), "bad_sdp"),
    ('{"type": "offer", "sdp": "v=0\\r\\nm=audio", "mode": "loud"}', "bad_mode"),
    ('{"type": "talk", "pressed": "yes"}', "bad_message"),
    ('{"type": "mode"}', "bad_mode"),
    ('{"type": "video", "source": "webcam"}', "bad_video"),
    ('{"type": "ping", "t": true}', "bad_message"),
    (b"\x00\x01binary", "binary"),
    ("x" * 300_000, "too_big"),
]


async def test_bad_input_gets_an_error_event_and_the_call_continues(broker, actors):
    host = await start_signaling(actors)
    async with harness.client(broker, [CONTROL]) as bus, aiohttp.ClientSession() as http:
        ws, session = await join(http, host)
        other, other_session = await join(http, host)
        for data, code in BAD_INPUT:
            if isinstance(data, bytes):
                await ws.send_bytes(data)
            else:
                await ws.send_str(data)
            event = await next_event(ws)
            assert (event["type"], event["code"]) == ("error", code), data[:60]
            assert event["text"]
        assert await alive(ws)
        relayed = await harness.collect(
            bus, lambda m: isinstance(m, Control) and m.session == session
            and m.kind not in (ControlKind.SESSION_START,), 0.5)
        assert relayed == []  # nothing bad reached the bus

        # Past the hard cap the socket is closed ("message too big") and its session ended.
        await ws.send_str("y" * 1_100_000)
        closed = await ws.receive(5)
        assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 1009
        ended = await harness.recv_until(bus, control(ControlKind.SESSION_END), 5)
        assert ended.session == session
        assert await alive(other)
        await other.send_json({"type": "talk", "pressed": True})
        start = await harness.recv_until(bus, control(ControlKind.TALK_START), 5)
        assert start.session == other_session


async def test_serves_the_page_and_refuses_cross_origin_sockets(broker, actors):
    host = await start_signaling(actors)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{host}/") as resp:
            assert resp.status == 200
            assert 'src="app.js"' in await resp.text()
        for name in ("app.js", "call.js", "audio.js", "conversation.js", "onset-worklet.js"):
            async with http.get(f"http://{host}/{name}") as resp:
                assert resp.status == 200 and "javascript" in resp.content_type, name
        async with http.get(f"http://{host}/../actors/signaling.py") as resp:
            assert resp.status in (403, 404)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"ws://{host}/ws", origin="http://evil.example")
        assert refused.value.status == 403
        ws = await http.ws_connect(f"ws://{host}/ws", origin=f"http://{host}")
        assert (await next_event(ws))["type"] == "session"


async def test_https_with_a_generated_self_signed_certificate(broker, actors, tmp_path: Path):
    from cryptography import x509

    certs = tmp_path / "certs"
    host = await start_signaling(actors, "--https", "--cert-dir", str(certs))
    cert = x509.load_pem_x509_certificate((certs / "selfsigned.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    async with aiohttp.ClientSession() as http:
        async with http.get(f"https://{host}/healthz", ssl=insecure) as resp:
            assert (await resp.json())["ok"] is True
        ws = await http.ws_connect(f"wss://{host}/ws", ssl=insecure)
        assert (await next_event(ws))["type"] == "session"
        with pytest.raises(aiohttp.ClientError):  # plain HTTP is not served
            async with http.get(f"http://{host}/healthz") as resp:
                await resp.read()


async def test_the_page_gets_the_servers_ice_servers_and_bad_ones_stop_start_up(broker, actors):
    servers = "stun:stun.example.org:3478,turn:alice:s3cret@turn.example.org:3478?transport=tcp"
    host = await start_signaling(actors, "--ice-servers", servers)
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"ws://{host}/ws")
        event = await next_event(ws, "session")
    assert event["ice_servers"] == [
        {"urls": ["stun:stun.example.org:3478"]},
        {"urls": ["turn:turn.example.org:3478?transport=tcp"], "username": "alice",
         "credential": "s3cret"},
    ]
    with pytest.raises(RuntimeError, match="ice-servers"):
        await start_signaling(actors, "--ice-servers", "turn:turn.example.org:3478")
