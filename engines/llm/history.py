"""One call's conversation so far, bounded, and the prompt it starts from.

When the history outgrows its bounds it is cut to half of them at once, not one exchange per
turn: a local model keeps the computed prompt of a call (engines/llm/prefix_cache.py), which every
cut invalidates from the system prompt on, so cutting in halves recomputes the history once every
few turns instead of at every turn.

Only text is kept: a picture belongs to the turn it was taken in and is never sent again. An
interrupted reply is kept as far as it was produced (the user heard its start, and the model
should know what it already said); an exchange where nothing was produced is dropped, so roles
always alternate (some chat templates insist).
"""

from __future__ import annotations

from collections import deque

from engines.llm.base import ChatMessage

SEEING_PROMPT = (
    "You are Parley, a friendly assistant on a live voice call. You can see the user through "
    "their camera: when a picture comes with a message, it is what the camera shows right now; "
    "mention what you see only when it helps. Your replies are spoken aloud, so keep them short: "
    "one to three sentences of plain conversational text, with no lists, markdown, code or "
    "emoji. If you did not understand something, ask."
)
# Plain and close to how small instruct models were tuned: SmolLM2-135M wanders off under a
# longer persona prompt, but answers well under this one.
BLIND_PROMPT = (
    "You are a helpful AI assistant named Parley, talking with the user by voice. Give short, "
    "friendly answers in plain sentences. You cannot see the user."
)


def default_prompt(can_see: bool) -> str:
    """The built-in system prompt; a model that gets no pictures is not told it can see."""
    return SEEING_PROMPT if can_see else BLIND_PROMPT


class History:
    """At most ``max_turns`` recent exchanges of a session, within ``max_chars`` of text; past
    either bound, the oldest go until half of it is left (the newest exchange always stays)."""

    def __init__(self, max_turns: int = 8, max_chars: int = 8_000) -> None:
        self.max_turns = max(0, max_turns)
        self.max_chars = max_chars
        self._turns: deque[tuple[str, str]] = deque()

    def __len__(self) -> int:
        return len(self._turns)

    def add(self, user: str, assistant: str) -> bool:
        """Record one exchange (whether it was: one without a reply is dropped)."""
        if not self.max_turns or not user.strip() or not assistant.strip():
            return False
        self._turns.append((user.strip(), assistant.strip()))
        if len(self._turns) > self.max_turns:
            while len(self._turns) > max(1, self.max_turns // 2):
                self._turns.popleft()
        if self._chars() > self.max_chars:
            while len(self._turns) > 1 and self._chars() > self.max_chars // 2:
                self._turns.popleft()
        return True

    def _chars(self) -> int:
        return sum(len(u) + len(a) for u, a in self._turns)

    def drop_last(self) -> None:
        if self._turns:
            self._turns.pop()

    def clear(self) -> None:
        self._turns.clear()

    def messages(self, system: str, user: str) -> list[ChatMessage]:
        """The chat to send for a new ``user`` message."""
        return [*self.prefix(system), ChatMessage(role="user", content=user)]

    def prefix(self, system: str) -> list[ChatMessage]:
        """What the chat for the next user message will start with."""
        out: list[ChatMessage] = [ChatMessage(role="system", content=system)] if system else []
        for past_user, past_reply in self._turns:
            out.append(ChatMessage(role="user", content=past_user))
            out.append(ChatMessage(role="assistant", content=past_reply))
        return out
