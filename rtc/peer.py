"""One aiortc peer connection per call, with explicit ICE servers and calls on loopback.

Three aiortc/aioice defaults get in the way and are handled here, in one place:

* ``RTCPeerConnection()`` without a configuration silently adds a public STUN server, so a peer is
  always built with an explicit ``RTCConfiguration(iceServers=[...])`` (empty on loopback).
* aioice leaves 127.0.0.1 out of its host candidates, so a browser on the same machine (tests,
  a developer's laptop) can never reach us. :func:`offer_loopback_candidates` patches
  ``aioice.ice.get_host_addresses`` *in this process* to put 127.0.0.1 first.
* aiortc's inbound audio jitter buffer hands a packet on only once four newer ones have arrived:
  80 ms added to every turn's end before the VAD can hear it. :func:`shorten_audio_jitter`
  gives each audio receiver one that hands each packet on as it arrives (``rtc/jitter.py``).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable

import aioice.ice
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection
from aiortc.rtcicetransport import parse_stun_turn_uri

from rtc.jitter import AudioJitterBuffer

LOOPBACK = "127.0.0.1"
_RECEIVER_JITTER = "_RTCRtpReceiver__jitter_buffer"  # aiortc's private attribute


def parse_ice_servers(text: str) -> list[RTCIceServer]:
    """``stun:host:port,turn:user:pass@host:port?transport=tcp`` -> ICE servers.

    Raises ``ValueError`` naming the bad entry, so a typo fails at start-up, not mid-call.
    """
    servers: list[RTCIceServer] = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        scheme, sep, rest = entry.partition(":")
        if not sep or scheme not in ("stun", "stuns", "turn", "turns"):
            raise ValueError(f"ICE server {entry!r}: expected stun:, stuns:, turn: or turns:")
        username = credential = None
        if "@" in rest:
            creds, rest = rest.rsplit("@", 1)
            username, _, credential = creds.partition(":")
        url = f"{scheme}:{rest}"
        try:
            parse_stun_turn_uri(url)
        except ValueError as exc:
            raise ValueError(f"ICE server {entry!r}: {exc}") from None
        if scheme.startswith("turn") and not username:
            raise ValueError(f"ICE server {entry!r}: a TURN server needs user:password@")
        servers.append(RTCIceServer(urls=url, username=username, credential=credential))
    return servers


def offer_loopback_candidates() -> None:
    """Make aioice offer 127.0.0.1 as a host candidate, besides the machine's other addresses.

    This is the one process-wide patch of the media actor (aioice has no option for it). It is
    idempotent; only this process's aioice changes.
    """
    current = aioice.ice.get_host_addresses
    if getattr(current, "_with_loopback", False):
        return

    @functools.wraps(current)
    def with_loopback(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        addresses = current(use_ipv4, use_ipv6)
        return [LOOPBACK, *addresses] if use_ipv4 and LOOPBACK not in addresses else addresses

    with_loopback._with_loopback = True  # type: ignore[attr-defined]
    aioice.ice.get_host_addresses = with_loopback


def _candidate_address(line: str) -> str | None:
    # a=candidate:<foundation> <component> <transport> <priority> <address> <port> typ ...
    parts = line.split()
    return parts[4] if line.startswith("a=candidate:") and len(parts) > 5 else None


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False  # a hostname or mDNS name (.local)


def keep_loopback_candidates(sdp: str) -> str:
    """Drop the offer's non-loopback candidates when it also offers loopback ones.

    A peer that offers 127.0.0.1 is on this machine (Chromium with
    ``--allow-loopback-in-peer-connection``, or the tests' Python peer); loopback pairs always
    work there, while pairs between our 127.0.0.1 socket and its other addresses only produce
    failing checks and log noise. An offer without loopback candidates is returned unchanged.
    """
    lines = sdp.splitlines()
    addresses = [a for a in map(_candidate_address, lines) if a is not None]
    if not any(_is_loopback(a) for a in addresses):
        return sdp
    kept = [line for line in lines
            if (address := _candidate_address(line)) is None or _is_loopback(address)]
    return "\r\n".join(kept) + "\r\n"


def create_peer(ice_servers: list[RTCIceServer],
                on_state: Callable[[str], None] | None = None) -> RTCPeerConnection:
    """A peer connection using exactly ``ice_servers``; ``on_state(connectionState)`` on changes."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=list(ice_servers)))
    if on_state is not None:
        @pc.on("connectionstatechange")
        def _changed() -> None:
            on_state(pc.connectionState)
    return pc


def shorten_audio_jitter(pc: RTCPeerConnection) -> bool:
    """Give the audio receivers of ``pc`` (after ``setRemoteDescription``) a jitter buffer that
    decodes each packet as it arrives; False if this aiortc has no such buffer to replace (the
    call then works with aiortc's default, 80 ms later)."""
    receivers = [t.receiver for t in pc.getTransceivers() if t.kind == "audio"]
    if not all(hasattr(r, _RECEIVER_JITTER) for r in receivers):
        return False
    for receiver in receivers:
        setattr(receiver, _RECEIVER_JITTER, AudioJitterBuffer())
    return True
