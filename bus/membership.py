"""Sharing sessions between workers of one kind (several ASR processes, on one host or many).

Every actor sends a heartbeat each second. Workers of one kind see each other's heartbeats and
agree, without a coordinator, on who serves a session: the worker that already claimed it while
it is alive, else the winner of rendezvous hashing over the live workers. The first worker to
serve a session publishes a ``claim`` so that a worker joining later does not take it over (the
LLM's conversation history stays in one place).
"""

from __future__ import annotations

import hashlib
import time

from bus.schema import Control, ControlKind

HEARTBEAT_S = 1.0
DEAD_AFTER_S = 3.5  # three missed heartbeats


def _score(instance: str, session: str) -> int:
    digest = hashlib.blake2b(f"{instance}/{session}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class Membership:
    """This worker's view of the live workers of its kind and of session claims."""

    def __init__(self, actor: str, instance: str) -> None:
        self.actor = actor
        self.instance = instance
        self._seen: dict[str, float] = {instance: float("inf")}
        self._claims: dict[str, str] = {}

    def observe(self, msg: Control) -> None:
        """Feed every control message; only this kind's liveness and claims matter."""
        if msg.actor != self.actor or msg.instance == self.instance:
            if msg.kind == ControlKind.SESSION_END:
                self._claims.pop(msg.session, None)
            return
        if msg.kind in (ControlKind.READY, ControlKind.HEARTBEAT):
            self._seen[msg.instance] = time.monotonic()
        elif msg.kind == ControlKind.CLAIM:
            self._seen[msg.instance] = time.monotonic()
            self._claims.setdefault(msg.session, msg.instance)

    def live(self) -> list[str]:
        now = time.monotonic()
        return sorted(i for i, seen in self._seen.items() if now - seen < DEAD_AFTER_S)

    def owner(self, session: str) -> str:
        live = self.live()
        claimed = self._claims.get(session)
        if claimed in live:
            return claimed
        return max(live, key=lambda instance: _score(instance, session))

    def owns(self, session: str) -> bool:
        return self.owner(session) == self.instance

    def claim(self, session: str) -> bool:
        """Record our claim; True when it is new (publish a ``claim`` control message then)."""
        if self._claims.get(session) == self.instance:
            return False
        self._claims[session] = self.instance
        return True

    def forget(self, session: str) -> None:
        self._claims.pop(session, None)
