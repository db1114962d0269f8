"""The signaling actor: serves the call page and relays between each page's WebSocket and the bus.

One WebSocket is one session. The page's WebRTC offer goes to the media actor as a ``control``
offer and its answer comes back the same way; the page's buttons become ``control`` messages;
what the other actors publish for the session (state, transcript, tokens, sentences, metrics,
errors) is pushed to its page as JSON events. Closing the page ends the session everywhere.

Every instance serves only the sessions of its own WebSockets, so it is not sharded: it sees
every message and forwards those of its own pages. The wire protocol is in ``docs/signaling.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import secrets
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import structlog
from aiohttp import WSMsgType, web

from actors.runtime import Actor, StartupError, main
from bus.schema import (
    CONTROL,
    METRICS,
    NO_SESSION,
    SENTENCE,
    TOKEN,
    TRANSCRIPT,
    VIDEO_SOURCES,
    Control,
    ControlKind,
    Message,
    Metric,
    Sentence,
    Token,
    Transcript,
)
from core.net import is_loopback_host
from rtc.peer import parse_ice_servers

WEB_DIR = Path(__file__).resolve().parent.parent / "web"

MAX_MESSAGE = 256 * 1024  # bigger text messages get an error event; the socket stays open
HARD_MAX_MESSAGE = 1024 * 1024  # bigger frames close the socket (1009) before being buffered
MAX_SDP = 64 * 1024  # a browser offer is a few KB
OUTBOX = 4096  # events queued per page before the oldest are dropped (a stalled page)
ANSWER_TIMEOUT_S = 15.0
ALIVE_S = 3.5  # an actor is live while its heartbeats are this recent
MODES = ("vad", "ptt")

# Control kinds the page is told about, and the event type each becomes.
PAGE_CONTROL: dict[str, str] = {
    ControlKind.ANSWER: "answer",
    ControlKind.STATE: "state",
    ControlKind.ERROR: "error",
    ControlKind.INTERRUPT: "interrupt",
}


class BadInput(ValueError):
    """A page message we refuse; ``code`` is stable for programs, the text is for people."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


@dataclass(slots=True)
class Peer:
    """One page's WebSocket: its session and the queue of events waiting to be sent to it."""

    session: str
    ws: web.WebSocketResponse
    remote: str
    outbox: asyncio.Queue[str] = field(default_factory=lambda: asyncio.Queue(OUTBOX))
    ended: bool = False
    dropped: int = 0
    answered: bool = False
    answer_timer: asyncio.TimerHandle | None = None

    def send(self, event: dict[str, Any]) -> None:
        """Queue an event without waiting; a page that stops reading loses its oldest events."""
        text = json.dumps(event, separators=(",", ":"))
        if self.outbox.full():
            self.outbox.get_nowait()
            self.outbox.task_done()
            self.dropped += 1
        self.outbox.put_nowait(text)

    async def write_loop(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            while True:
                text = await self.outbox.get()
                try:
                    await self.ws.send_str(text)
                finally:
                    self.outbox.task_done()


def parse_page_message(data: str) -> dict[str, Any]:
    """Decode and validate one text message from a page, or raise :class:`BadInput`."""
    if len(data) > MAX_MESSAGE:
        raise BadInput("too_big", f"message of {len(data)} bytes refused (limit {MAX_MESSAGE})")
    try:
        msg = json.loads(data)
    except ValueError:
        raise BadInput("bad_json", "message is not valid JSON") from None
    if not isinstance(msg, dict):
        raise BadInput("bad_message", "message must be a JSON object")
    kind = msg.get("type")
    if not isinstance(kind, str):
        raise BadInput("bad_message", "message has no string 'type'")
    if kind == "offer":
        sdp = msg.get("sdp")
        if not isinstance(sdp, str) or not sdp.startswith("v=0") or "\nm=" not in sdp:
            raise BadInput("bad_sdp", "offer needs 'sdp', a session description starting 'v=0'")
        if len(sdp) > MAX_SDP:
            raise BadInput("bad_sdp", f"SDP of {len(sdp)} bytes refused (limit {MAX_SDP})")
        _check_mode(msg.setdefault("mode", "vad"))
        _check_video(msg.setdefault("video", "camera"))
    elif kind == "video":
        _check_video(msg.get("source"))
    elif kind == "talk":
        if not isinstance(msg.get("pressed"), bool):
            raise BadInput("bad_message", "talk needs 'pressed': true or false")
    elif kind == "mode":
        _check_mode(msg.get("mode"))
    elif kind == "ping":
        if not isinstance(msg.get("t"), int | float) or isinstance(msg.get("t"), bool):
            raise BadInput("bad_message", "ping needs a number 't'")
    elif kind not in ("interrupt", "hangup"):
        raise BadInput("unknown_type", f"unknown message type {kind[:40]!r}")
    return msg


def _check_video(source: object) -> None:
    if source not in VIDEO_SOURCES:
        raise BadInput("bad_video", f"video source must be one of {', '.join(VIDEO_SOURCES)}")


def _check_mode(mode: object) -> None:
    if mode not in MODES:
        raise BadInput("bad_mode", "mode must be 'vad' (hands-free) or 'ptt' (push-to-talk)")


def event_for(msg: Message) -> dict[str, Any] | None:
    """The page event for a bus message of its session, or None if the page has no use for it."""
    base: dict[str, Any] = {"turn": msg.turn}
    if isinstance(msg, Transcript):
        return {"type": "transcript", **base, "text": msg.text, "language": msg.language,
                "asr_ms": msg.asr_ms, "audio_s": msg.audio_s, "partial": msg.partial}
    if isinstance(msg, Token):
        return {"type": "token", **base, "text": msg.text, "index": msg.index}
    if isinstance(msg, Sentence):
        if msg.draft:
            return None  # the voice's guess: the page shows the sentence once it is sure
        return {"type": "sentence", **base, "text": msg.text, "index": msg.index,
                "final": msg.final}
    if isinstance(msg, Metric):
        return {"type": "metric", **base, "stage": msg.stage, "at": msg.at, "ms": msg.ms}
    if isinstance(msg, Control):
        kind = PAGE_CONTROL.get(msg.kind)
        if kind == "answer":
            return {"type": "answer", "sdp": msg.sdp, "sdp_type": msg.sdp_type or "answer"}
        if kind == "state":
            return {"type": "state", **base, "state": msg.state, "text": msg.text,
                    "source": msg.actor}
        if kind == "error":
            return {"type": "error", **base, "code": "actor", "text": msg.text,
                    "source": msg.actor}
        if kind == "interrupt":
            return {"type": "interrupt", **base, **({"void": True} if msg.text == "void" else {})}
    return None


def ensure_certificate(cert_dir: Path, host: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``host`` (and localhost), made once and reused."""
    import datetime
    import socket

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    cert_path, key_path = cert_dir / "selfsigned.crt", cert_dir / "selfsigned.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    cert_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost"),
                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    for name in {host, socket.gethostname()} - {"", "localhost", "0.0.0.0", "::"}:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Parley (self-signed)")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=825))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(key, hashes.SHA256()))
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


@web.middleware
async def _headers(request: web.Request, handler: Any) -> web.StreamResponse:
    response = await handler(request)
    if response.prepared:  # a WebSocket: its headers are already sent
        return response
    response.headers.setdefault("Cache-Control", "no-cache")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault(
        "Content-Security-Policy",
        "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data: blob:; "
        "media-src 'self' blob: mediastream:; object-src 'none'; base-uri 'none'")
    return response


class Signaling(Actor):
    """Serves web/ and /ws; relays each page's session to and from the bus."""

    name: ClassVar[str] = "signaling"
    topics: ClassVar[tuple[str, ...]] = (CONTROL, TRANSCRIPT, TOKEN, SENTENCE, METRICS)
    groups: ClassVar[tuple[str, ...]] = ("signaling", "ice")
    sharded: ClassVar[bool] = False
    description: ClassVar[str] = "Serves the call page and relays its WebSocket to the bus."

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.peers: dict[str, Peer] = {}
        self.alive: dict[str, float] = {}  # actor name -> monotonic time of its last heartbeat
        self.bad_inputs: Counter[str] = Counter()
        self._runner: web.AppRunner | None = None
        self._started = time.monotonic()
        self.url = ""

    # -- start-up: bind before reporting ready, so a ready signaling accepts connections

    async def prepare(self) -> None:
        s = self.settings
        self._started = time.monotonic()
        try:  # the page gets the same STUN/TURN servers as the media actor
            self._ice_servers = [
                {"urls": [server.urls] if isinstance(server.urls, str) else list(server.urls),
                 **({"username": server.username, "credential": server.credential}
                    if server.username else {})}
                for server in parse_ice_servers(s.ice_servers)]
        except ValueError as exc:
            raise StartupError(f"--ice-servers: {exc}") from None
        tls = None
        if s.https or not is_loopback_host(s.host):
            tls = await asyncio.to_thread(self._tls_context)
        app = web.Application(middlewares=[_headers])
        app.router.add_get("/", self._index)
        app.router.add_get("/ws", self._websocket)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_static("/", WEB_DIR, show_index=False)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, s.host, s.port, ssl_context=tls)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise StartupError(f"cannot serve on {s.host}:{s.port}: {exc.strerror}") from None
        scheme = "https" if tls else "http"
        host = f"[{s.host}]" if ":" in s.host else s.host
        self.url = f"{scheme}://{host}:{s.port}/"
        self.log.info("serving", url=self.url, web=str(WEB_DIR))

    def _tls_context(self) -> ssl.SSLContext:
        s = self.settings
        if bool(s.cert) != bool(s.key):
            raise StartupError("--cert and --key go together")
        if s.cert:
            cert, key = Path(s.cert), Path(s.key)
        else:
            cert, key = ensure_certificate(Path(s.cert_dir), s.host)
            self.log.info("self_signed_certificate", cert=str(cert))
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(f"cannot load TLS certificate {cert} / key {key}: {exc}") from None
        return ctx

    async def background(self) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            for peer in list(self.peers.values()):
                self._end(peer, "server_stopping")
            if self._runner is not None:
                await self._runner.cleanup()

    # -- HTTP

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(WEB_DIR / "index.html")

    async def _healthz(self, request: web.Request) -> web.Response:
        now = time.monotonic()
        return web.json_response({
            "ok": True,
            "sessions": len(self.peers),
            "actors": {a: round(now - t, 1) for a, t in sorted(self.alive.items())
                       if now - t < ALIVE_S},
        })

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin and origin.split("://", 1)[-1] != request.host:
            # Another site's page must not drive calls from this user's browser.
            self.log.warning("ws_refused", origin=origin, host=request.host)
            return web.Response(status=403, text="cross-origin WebSocket refused")
        ws = web.WebSocketResponse(max_msg_size=HARD_MAX_MESSAGE, heartbeat=20.0)
        await ws.prepare(request)
        peer = Peer(session=secrets.token_urlsafe(9), ws=ws, remote=request.remote or "")
        log = self.log.bind(session=peer.session)
        self.peers[peer.session] = peer
        self.publish(Control(session=peer.session, kind=ControlKind.SESSION_START,
                             actor=self.name, instance=self.bus.instance))
        log.info("session_open", remote=peer.remote, sessions=len(self.peers))
        peer.send({"type": "session", "session": peer.session, "server_time": time.time(),
                   "ice_servers": self._ice_servers})
        close_reason = "page_closed"
        try:
            async with asyncio.TaskGroup() as tg:
                writer = tg.create_task(peer.write_loop())
                async for frame in ws:
                    if frame.type == WSMsgType.TEXT:
                        self._on_text(peer, frame.data)
                    elif frame.type == WSMsgType.BINARY:
                        self._refuse(peer, BadInput("binary", "binary messages are not accepted"))
                    elif frame.type == WSMsgType.ERROR:
                        close_reason = f"ws_error: {frame.data}"
                        break
                    if peer.ended:
                        close_reason = "hangup"
                        break
                # Let queued events (the hang-up acknowledgement) go out, briefly.
                if not ws.closed:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.5):
                            await peer.outbox.join()
                writer.cancel()
        finally:
            self._end(peer, close_reason)
            await ws.close()
        return ws

    # -- page -> bus

    def _on_text(self, peer: Peer, data: str) -> None:
        try:
            msg = parse_page_message(data)
        except BadInput as exc:
            self._refuse(peer, exc)
            return
        session, kind = peer.session, msg["type"]
        if kind == "offer":
            self._offer(peer, msg["sdp"], msg["mode"], msg["video"])
        elif kind == "video":
            self._control(session, ControlKind.VIDEO, text=msg["source"])
        elif kind == "talk":
            self._control(session, ControlKind.TALK_START if msg["pressed"]
                          else ControlKind.TALK_STOP)
        elif kind == "mode":
            self._control(session, ControlKind.MODE, mode=msg["mode"])
        elif kind == "interrupt":
            turn = self.turns.current(session) + 1
            self.turns.advance(session, turn)
            self._control(session, ControlKind.INTERRUPT, turn=turn)
            self.log.info("page_interrupt", session=session, turn=turn)
        elif kind == "ping":
            peer.send({"type": "pong", "t": msg["t"], "server_time": time.time()})
        elif kind == "hangup":
            self._end(peer, "hangup")
            peer.send({"type": "state", "turn": 0, "state": "ended", "text": "call ended",
                       "source": self.name})

    def _offer(self, peer: Peer, sdp: str, mode: str, video: str = "camera") -> None:
        self._control(peer.session, ControlKind.OFFER, sdp=sdp, sdp_type="offer", mode=mode,
                      text=video)
        self.log.info("offer", session=peer.session, mode=mode, bytes=len(sdp))
        peer.answered = False
        loop = asyncio.get_running_loop()
        # Heartbeats come every second: judge media's absence once we could have heard one.
        loop.call_later(max(0.0, self._started + ALIVE_S - time.monotonic()),
                        self._check_media, peer)
        if peer.answer_timer is not None:
            peer.answer_timer.cancel()
        peer.answer_timer = loop.call_later(ANSWER_TIMEOUT_S, self._answer_overdue, peer)

    def _check_media(self, peer: Peer) -> None:
        if not peer.ended and not peer.answered and not self._is_alive("media"):
            peer.send({"type": "error", "code": "media_unavailable", "turn": 0,
                       "text": "The media service is not running yet; waiting for it."})

    def _answer_overdue(self, peer: Peer) -> None:
        peer.answer_timer = None
        if not peer.ended:
            self.log.warning("answer_overdue", session=peer.session)
            text = f"The media service did not answer within {ANSWER_TIMEOUT_S:.0f} s."
            peer.send({"type": "error", "code": "no_answer", "turn": 0, "text": text})

    def _control(self, session: str, kind: ControlKind, *, turn: int = 0, **fields: str) -> None:
        self.publish(Control(session=session, turn=turn, kind=kind, actor=self.name,
                             instance=self.bus.instance, **fields))

    def _refuse(self, peer: Peer, exc: BadInput) -> None:
        first = exc.code not in self.bad_inputs
        self.bad_inputs[exc.code] += 1
        if first:  # one line per kind: a page spamming garbage must not flood the log
            self.log.warning("bad_input", session=peer.session, code=exc.code, detail=exc.text)
        peer.send({"type": "error", "code": exc.code, "turn": 0, "text": exc.text})

    def _end(self, peer: Peer, reason: str) -> None:
        """End the session once: every actor frees its state (control session_end)."""
        if peer.answer_timer is not None:
            peer.answer_timer.cancel()
            peer.answer_timer = None
        if self.peers.get(peer.session) is peer:
            del self.peers[peer.session]
        if peer.ended:
            return
        peer.ended = True
        self._control(peer.session, ControlKind.SESSION_END)
        self.turns.forget(peer.session)
        self.log.info("session_end", session=peer.session, reason=reason, dropped=peer.dropped,
                      sessions=len(self.peers))

    def _is_alive(self, actor: str) -> bool:
        seen = self.alive.get(actor)
        return seen is not None and time.monotonic() - seen < ALIVE_S

    # -- bus -> page

    async def handle(self, msg: Message) -> None:
        if isinstance(msg, Control) and msg.session == NO_SESSION:
            if msg.kind in (ControlKind.READY, ControlKind.HEARTBEAT):
                self.alive[msg.actor] = time.monotonic()
            return
        peer = self.peers.get(msg.session)
        if peer is None:
            return
        if isinstance(msg, Control) and msg.kind == ControlKind.ANSWER:
            peer.answered = True
            if peer.answer_timer is not None:
                peer.answer_timer.cancel()
                peer.answer_timer = None
            self.log.info("answer", session=msg.session, bytes=len(msg.sdp))
        event = event_for(msg)
        if event is not None:
            peer.send(event)

    async def session_ended(self, session: str) -> None:
        peer = self.peers.get(session)
        if peer is not None and not peer.ended:
            # Someone else ended our session: tell the page, which will rejoin.
            peer.ended = True
            peer.send({"type": "state", "turn": 0, "state": "ended",
                       "text": "the session was ended by the server", "source": self.name})
            del self.peers[session]
            structlog.get_logger().info("session_ended_elsewhere", session=session)


if __name__ == "__main__":
    raise SystemExit(main(Signaling))
