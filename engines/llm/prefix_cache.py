"""Key/value caches kept between turns, so a turn only computes the tokens that are new.

Each session keeps the cache of its latest prompt and reply. The next prompt of a call repeats
the previous one (system prompt, history) and adds the reply and the new user message, so its
longest common token prefix with the cache is reused and only the rest is prefilled. A session
seen for the first time starts from a copy of the shared prefix (the system prompt's, computed
once). At most ``max_sessions`` sessions are kept (the least recently used is dropped first), and
a session's cache is dropped when its call ends.

The worker thread that generates is the only one that reads or writes cache contents; the lock
only guards the table, so :meth:`PrefixCaches.forget` may be called from the event loop while a
generation runs (that generation finishes with the cache it holds, which is then freed).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

from engines.llm.decoding import PromptCache


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading items ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCaches:
    """Per-session caches (bounded, least recently used dropped first) and one shared prefix."""

    def __init__(self, max_sessions: int) -> None:
        self.max_sessions = max(0, max_sessions)
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, PromptCache] = OrderedDict()
        self._shared: PromptCache | None = None

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session: str) -> bool:
        return session in self._sessions

    @property
    def nbytes(self) -> int:
        with self._lock:
            caches = [*self._sessions.values(), *([self._shared] if self._shared else [])]
        return sum(c.nbytes for c in caches)

    def checkout(self, session: str | None, prompt: Sequence[int],
                 new_cache: Callable[[], PromptCache]) -> PromptCache:
        """The cache to run ``prompt`` into, already holding its longest known prefix.

        A session's own cache is cut back to what it shares with ``prompt``; a new session's
        starts as a copy of the shared prefix and is kept (``session`` None: not kept).
        """
        with self._lock:
            own = self._sessions.get(session) if session is not None else None
            if own is not None:
                self._sessions.move_to_end(session)
            shared = self._shared
        from_shared = common_prefix(shared.ids, prompt) if shared is not None else 0
        if own is not None:
            own.truncate(common_prefix(own.ids, prompt))
            if shared is not None and from_shared > len(own.ids):
                own.load_prefix(shared, from_shared)  # (the prompt changed before its history)
            return own
        cache = shared.copy_prefix(from_shared) if shared is not None else new_cache()
        if session is not None and self.max_sessions:
            with self._lock:
                self._sessions[session] = cache
                while len(self._sessions) > self.max_sessions:
                    self._sessions.popitem(last=False)
        return cache

    def get(self, session: str) -> PromptCache | None:
        """The cache kept for ``session`` (its order among the kept ones unchanged)."""
        with self._lock:
            return self._sessions.get(session)

    def share(self, prefix: Sequence[int], cache: PromptCache) -> None:
        """Keep the first ``len(prefix)`` positions of ``cache`` (which must match) for new
        sessions, unless that prefix is already kept."""
        n = len(prefix)
        if not n or common_prefix(cache.ids, prefix) < n:
            return
        with self._lock:
            if self._shared is not None and self._shared.ids == list(prefix):
                return
        copy = cache.copy_prefix(n)
        with self._lock:
            self._shared = copy

    def forget(self, session: str) -> None:
        """Drop the cache of ``session`` (its call ended)."""
        with self._lock:
            self._sessions.pop(session, None)

    def clear(self) -> None:
        with self._lock:
            self._sessions.clear()
            self._shared = None
