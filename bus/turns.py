"""Which turn of each session is current, so that messages of older turns can be dropped.

A session's turn only moves forward: a new ``utterance`` or an ``interrupt`` control message
carries the new turn number, and from then on anything older is stale everywhere.
"""

from __future__ import annotations

from bus.schema import Message


class TurnTracker:
    """Latest turn per session, fed by every message an actor sees."""

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def current(self, session: str) -> int:
        return self._current.get(session, 0)

    def advance(self, session: str, turn: int) -> bool:
        """Make ``turn`` current if newer; True when it moved forward."""
        if turn > self._current.get(session, 0):
            self._current[session] = turn
            return True
        return False

    def is_stale(self, msg: Message) -> bool:
        """True for a message of a turn older than the session's current one."""
        return msg.turn < self._current.get(msg.session, 0)

    def forget(self, session: str) -> None:
        self._current.pop(session, None)

    def __contains__(self, session: str) -> bool:
        return session in self._current
