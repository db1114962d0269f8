"""Cut a streamed reply into speakable sentences, as early as it is safe to.

Text-to-speech starts on a whole sentence, so the first one should be released the moment it is
complete, but not before: a period is not always a sentence end ("Mr. Smith", "3.14", "e.g.",
"example.com", a list's "1."), so a period waits for the next character, while "!", "?" or a
clause's comma right after a word, which no next character can make part of a word, go at once (the
model's next token is ~25 ms away on a small CPU). Markdown the model writes out of habit is
removed first, since a voice must not read asterisks, hashes, code or link targets. At the start of
a reply, while less than ``early_words`` have been released, a long sentence's first clause is
released on its own so that speech starts sooner and the voice never waits for a long sentence
after a short one: at a comma, semicolon, colon or spaced dash (a reply's opening "Yes," or "Of
course," goes alone at its comma), or, when there is none, before a
conjunction ("and", "but", "because"...) once enough words have come, and at the latest before a
preposition or relative word ("of", "with", "that", "depending"...) once the sentence has run to
``first_span_words``.

Two streaming stages: :class:`MarkdownStripper` (line-aware, holds back only unfinished markup)
feeds :class:`SentenceSplitter` (holds back only an undecided boundary). :class:`SpeechChunker`
chains them.
"""

from __future__ import annotations

import re

# ----------------------------------------------------------------------------- markdown

_FENCE = re.compile(r"^\s*(```|~~~)")
_RULE = re.compile(r"^\s*([-*_])(\s*\1){2,}\s*$")
# Bullets, headings and quotes lose their marker; numbered items keep it ("1. Flour" is spoken).
_LINE_MARKER = re.compile(r"^\s*(#{1,6}\s+|[-*+•]\s+|>\s?)")
_LINK = re.compile(r"!?\[([^\]\n]*)\]\([^)\n]*\)")
_AUTOLINK = re.compile(r"<((?:https?://|mailto:)[^>\s]+)>")
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*\s*/?>")
_UNDERSCORE_EMPHASIS = re.compile(r"(?<!\w)(_{1,2})(\S(?:.*?\S)?)\1(?!\w)")
_UNDERSCORE_OPEN = re.compile(r"(?<!\w)_{1,2}(?=[^\s_])")
_OPEN_TAG = re.compile(r"/?([A-Za-z][^\s<>]*)?$")
_UNRESOLVED_LINK_CHARS = 300  # an "[" left open longer than this is just a bracket


def _inline(text: str) -> str:
    """Remove inline markup from a span that holds no unfinished construct."""
    text = _LINK.sub(r"\1", text)
    text = _AUTOLINK.sub(r"\1", text)
    text = _TAG.sub(" ", text)
    text = _UNDERSCORE_EMPHASIS.sub(r"\2", text)
    text = text.replace("~~", "")
    for mark in ("*", "`", "[", "]"):
        text = text.replace(mark, "")
    return text.replace("|", ", ").replace("\t", " ")


def _safe_end(rest: str) -> int:
    """How much of an unfinished line can be cleaned now without cutting a construct in two."""
    end = len(rest)
    pos = 0
    while (start := rest.find("[", pos)) != -1:
        link = _LINK.match(rest, start - 1 if start and rest[start - 1] == "!" else start)
        if link is not None:
            pos = link.end()
            continue
        close = rest.find("]", start)
        if close != -1 and close + 1 < len(rest) and rest[close + 1] != "(":
            pos = close + 1  # plain brackets, no link target
            continue
        if len(rest) - start > _UNRESOLVED_LINK_CHARS:
            pos = start + 1
            continue
        end = start - 1 if start and rest[start - 1] == "!" else start
        break
    # An opening "_" or "__" waits for its partner (it is emphasis only if one follows).
    pos = 0
    while (opening := _UNDERSCORE_OPEN.search(rest, pos, end)) is not None:
        pair = _UNDERSCORE_EMPHASIS.match(rest, opening.start())
        if pair is not None and pair.end() < len(rest) and pair.end() <= end:
            pos = pair.end()
        elif end - opening.start() > _UNRESOLVED_LINK_CHARS:
            pos = opening.end()
        else:
            end = opening.start()
            break
    # A trailing run of markup characters may be half of "**", "__" or a tag: wait for more.
    stripped = rest[:end]
    held = len(stripped) - len(stripped.rstrip("*_`~<"))
    if held:
        end -= held
    lt = stripped.rfind("<")
    if lt != -1 and _OPEN_TAG.match(stripped, lt + 1) and len(stripped) - lt < 80:
        end = min(end, lt)  # maybe "<br>" or "<https://...>" in the making
    return end


class MarkdownStripper:
    """Streaming removal of markdown; lines are kept (a line break ends a sentence)."""

    def __init__(self) -> None:
        self._line = ""  # raw text of the current, unfinished line
        self._done = 0  # raw characters of it already cleaned and emitted
        self._marker_checked = False
        self._in_fence = False

    def feed(self, text: str) -> str:
        out: list[str] = []
        self._line += text
        while (nl := self._line.find("\n")) != -1:
            line, self._line = self._line[:nl], self._line[nl + 1:]
            out.append(self._finish_line(line))
        out.append(self._partial())
        return "".join(out)

    def flush(self) -> str:
        line, self._line = self._line, ""
        out = self._finish_line(line) if line else ""
        self._in_fence = False
        return out

    def _finish_line(self, line: str) -> str:
        fence = _FENCE.match(line) is not None
        if fence and not self._marker_checked:
            self._in_fence = not self._in_fence
            self._reset()
            return ""
        if self._in_fence:
            self._reset()
            return ""
        if not self._marker_checked:
            if _RULE.match(line):
                self._reset()
                return ""
            line = self._drop_marker(line)
        text = _inline(line[self._done:])
        self._reset()
        return text + "\n"

    def _partial(self) -> str:
        if self._in_fence:
            return ""
        if not self._marker_checked:
            if not self._marker_decidable(self._line):
                return ""
            if _FENCE.match(self._line):
                return ""  # a fence line: handled when it ends
            self._line = self._drop_marker(self._line)
        rest = self._line[self._done:]
        end = _safe_end(rest)
        self._done += end
        return _inline(rest[:end])

    def _drop_marker(self, line: str) -> str:
        self._marker_checked = True
        marker = _LINE_MARKER.match(line)
        return line[marker.end():] if marker else line.lstrip()

    def _reset(self) -> None:
        self._done = 0
        self._marker_checked = False

    @staticmethod
    def _marker_decidable(line: str) -> bool:
        """True once the start of ``line`` shows whether it is a fence, heading, item or rule."""
        s = line.lstrip()
        if not s:
            return False
        if s[0] == "`" or s[0] == "~":
            return len(s) >= 3 or s[:3].strip("`~") != ""
        if s[0] == "#":
            return s.lstrip("#") != ""
        if s[0] in "-*_+•":
            rest = s.lstrip(s[0] + " ")
            return rest != "" and (len(s) > 1)
        return True


# ----------------------------------------------------------------------------- sentences

_TERMINATORS = ".!?…。！？"
_CLOSERS = "\"')]}”’»"
_CLAUSE_BREAKS = ",;:—"
# Never a sentence end: a title before a name, or a Latin abbreviation inside a sentence.
_NEVER_END = frozenset({
    "mr", "mrs", "ms", "mx", "dr", "prof", "sr", "jr", "st", "mt", "vs", "e.g", "i.e", "cf",
    "viz", "approx", "fig", "no", "nos", "vol", "ch", "pp", "gen", "gov", "sen", "rep", "rev",
    "capt", "lt", "col", "sgt", "eg", "ie",
})
# A sentence end only when the next word starts with a capital: "etc. Then" but "etc. and".
_MAYBE_END = frozenset({"etc", "inc", "ltd", "co", "corp", "jan", "feb", "mar", "apr", "jun",
                        "jul", "aug", "sep", "sept", "oct", "nov", "dec", "a.m", "p.m", "u.s",
                        "u.k", "e.u", "u.n", "ph.d", "b.c", "a.d", "est", "dept", "min", "max"})
_EMOJI = re.compile(
    "[\U0001f000-\U0001faff\U00002600-\U000027bf\U0001f1e6-\U0001f1ff\ufe0f\u200d\u20e3"
    "\U0000231a-\U0000231b\U000023e9-\U000023fa\U00002b00-\U00002bff]+")
_SPACES = re.compile(r"\s+")
_SPEAKABLE = re.compile(r"\w")


def speakable(text: str) -> str:
    """``text`` as a voice should get it: no emoji, single spaces; empty if nothing to say."""
    text = _SPACES.sub(" ", _EMOJI.sub(" ", text)).strip()
    return text if _SPEAKABLE.search(text) else ""


# A clause may begin at these words; cutting before one keeps both halves natural to speak.
_CONJUNCTIONS = frozenset({"and", "but", "because", "so", "while", "which", "although", "though",
                           "whereas", "or", "until", "unless"})
# A phrase may begin at these: a long first sentence without a clause break is cut before one.
_OPENERS = _CONJUNCTIONS | frozenset({
    "about", "after", "as", "at", "before", "by", "depending", "during", "for", "from", "if",
    "in", "into", "like", "of", "on", "since", "than", "that", "to", "when", "where", "who",
    "whose", "with", "without"})
# Said alone before a comma at the start of a reply, these are a phrase of their own ("Yes, |
# a lemon is yellow."): spoken at once, with the pause a comma gets, while the rest is written.
_INTERJECTIONS = frozenset({
    "yes", "yeah", "yep", "no", "nope", "sure", "well", "oh", "ah", "okay", "ok", "alright",
    "all right", "of course", "hi", "hello", "hey", "absolutely", "certainly", "actually",
    "indeed", "great", "hmm", "wow", "sorry", "thanks", "right", "so", "honestly"})
_NEXT_WORD = re.compile(r"[A-Za-z']+")
CONJUNCTION_EXTRA_WORDS = 3  # a conjunction cut needs a longer first clause than a comma cut


class SentenceSplitter:
    """Streaming sentence boundaries over clean text (see the module docstring)."""

    def __init__(self, *, first_clause_words: int = 3, first_span_words: int = 7,
                 early_words: int = 16) -> None:
        self.first_clause_words = first_clause_words
        self.first_span_words = first_span_words
        self.early_words = early_words
        self._buf = ""
        self._released_words = 0  # of this reply, released already

    @property
    def _early(self) -> bool:
        """Still the start of the reply, where clauses are released on their own."""
        return self._released_words < self.early_words

    def feed(self, text: str) -> list[str]:
        self._buf += text
        return self._drain(final=False)

    def draft(self) -> str | None:
        """The sentence held back if the terminator it ends with does end it, which only the
        next character can tell ("Paris." then " It" or "example." then "org"): text-to-speech
        may start on it while the model computes that character. None when nothing is held
        back so, or when a space after it would still not end it ("Mr.", "e.g.")."""
        buf = self._buf
        if not buf.rstrip(_CLOSERS).endswith(tuple(_TERMINATORS)):
            return None
        cut = self._find_cut(buf + " ", final=False)
        return (speakable(buf) or None) if cut == len(buf) else None

    def flush(self) -> list[str]:
        out = self._drain(final=True)
        tail, self._buf = speakable(self._buf), ""
        if tail:
            out.append(tail)
            self._released_words += len(tail.split())
        return out

    def _drain(self, *, final: bool) -> list[str]:
        out: list[str] = []
        while (cut := self._find_cut(self._buf, final)) is not None:
            piece, self._buf = self._buf[:cut], self._buf[cut:]
            piece = speakable(piece)
            if piece:
                out.append(piece)
                self._released_words += len(piece.split())
        return out

    def _find_cut(self, buf: str, final: bool) -> int | None:
        start = len(buf) - len(buf.lstrip())  # where the pending sentence begins
        i = start
        while i < len(buf):
            c = buf[i]
            if c == "\n":
                return i + 1
            if c in _TERMINATORS:
                j = i
                while j < len(buf) and buf[j] in _TERMINATORS:
                    j += 1
                while j < len(buf) and buf[j] in _CLOSERS:
                    j += 1
                decision = self._is_end(buf, start, i, j, final)
                if decision is None:
                    return None
                if decision:
                    return j
                i = j
                continue
            if (self._early and (c in _CLAUSE_BREAKS or (c in "-–" and self._dash(buf, i)))
                    and self._clause_end(buf, start, i)):
                return i + 1
            if self._early and c == " " and self._before_conjunction(buf, start, i):
                return i
            i += 1
        return None

    def _before_conjunction(self, buf: str, start: int, i: int) -> bool:
        """``buf[i]`` is the space before a conjunction that opens a long early sentence's next
        clause ("The sky is blue | and the sea is too"), or a phrase after a very long start."""
        words = len(buf[start:i].split())
        if words < self.first_clause_words + CONJUNCTION_EXTRA_WORDS:
            return False
        match = _NEXT_WORD.match(buf, i + 1)
        if not match or match.end() >= len(buf):
            return False  # the next word is not complete yet
        word = match.group(0).lower()
        return word in _CONJUNCTIONS or (words >= self.first_span_words and word in _OPENERS)

    def _is_end(self, buf: str, start: int, i: int, j: int, final: bool) -> bool | None:
        """Whether the terminator run ``buf[i:j]`` ends a sentence; None: undecidable yet."""
        if j >= len(buf):  # nothing after it yet
            # "!" or "?" right after a word ends a sentence whatever comes next; a period may
            # be "3.14", "example.org" or "e.g.", so it waits for the next character.
            return True if final or (buf[i:j] in ("!", "?") and buf[i - 1:i].isalpha()) else None
        if not buf[j].isspace():
            return False  # "3.14", "example.com", "e.g.x", "?!" mid-word
        run = buf[i:j].rstrip(_CLOSERS)
        if any(t in run for t in "!?！？。"):
            return True
        nxt = _next_word_start(buf, j)
        if nxt is None and not final:
            if run == ".":
                word = _word_before(buf, i).lower()
                if word not in _MAYBE_END and not _is_initialism(word):
                    return self._period_ends(buf, start, i)
            return None
        capital = nxt is None or not nxt.islower()
        if run in ("...", "…") or len(run) > 1:
            return capital  # "Well... maybe" goes on; "I see... Now" ends
        word = _word_before(buf, i).lower()
        if word in _MAYBE_END or _is_initialism(word):
            return capital
        return self._period_ends(buf, start, i)

    @staticmethod
    def _period_ends(buf: str, start: int, i: int) -> bool:
        word = _word_before(buf, i)
        lower = word.lower()
        if lower in _NEVER_END:
            return False
        if len(word) == 1 and word.isupper():
            return False  # an initial: "J. Smith"
        if word.isdigit() and len(word) <= 3:
            # A list number: "1. Flour" at the start of a sentence, or after a colon.
            before = buf[start:i - len(word)].rstrip()
            if not before or before.endswith(":"):
                return False
        return True

    def _clause_end(self, buf: str, start: int, i: int) -> bool:
        """A clause break inside a long early sentence, with enough words before it."""
        if i + 1 >= len(buf):
            # nothing after it yet: a comma or semicolon right after a word is a break
            # whatever comes next ("1,000" is not)
            if buf[i] not in ",;" or not buf[i - 1:i].isalpha():
                return False
        elif not buf[i + 1].isspace():
            return False  # "1,000", "10:30"
        if buf[i] == ":" and not buf[i + 1:].strip():
            return False
        words = buf[start:i].split()
        opening = " ".join(words).lower().strip(_CLOSERS + "\"'“‘")
        if buf[i] == "," and not self._released_words and opening in _INTERJECTIONS:
            return True  # the reply's first word(s): "Yes," goes alone
        return len(words) >= self.first_clause_words

    @staticmethod
    def _dash(buf: str, i: int) -> bool:
        """A spaced hyphen or en dash (" - ") reads as a pause; "well-known" does not."""
        return i > 0 and buf[i - 1] == " " and i + 1 < len(buf) and buf[i + 1] == " "


def _word_before(buf: str, i: int) -> str:
    k = i
    while k > 0 and not buf[k - 1].isspace():
        k -= 1
    return buf[k:i].lstrip("\"'([{“‘«")


def _is_initialism(word: str) -> bool:
    """"u.s", "a.m", "e.g": single letters joined by periods."""
    parts = word.split(".")
    return len(parts) > 1 and all(len(p) == 1 and p.isalpha() for p in parts)


def _next_word_start(buf: str, j: int) -> str | None:
    for ch in buf[j:]:
        if not ch.isspace():
            return ch
    return None


class SpeechChunker:
    """Markdown stripping then sentence splitting: reply deltas in, speakable sentences out."""

    def __init__(self, *, first_clause_words: int = 3) -> None:
        self._markdown = MarkdownStripper()
        self._splitter = SentenceSplitter(first_clause_words=first_clause_words)

    def feed(self, delta: str) -> list[str]:
        return self._splitter.feed(self._markdown.feed(delta))

    def draft(self) -> str | None:
        """See :meth:`SentenceSplitter.draft`."""
        return self._splitter.draft()

    def flush(self) -> list[str]:
        out = self._splitter.feed(self._markdown.flush())
        return out + self._splitter.flush()


def split_text(text: str, *, first_clause_words: int = 3) -> list[str]:
    """All sentences of a whole reply (what the streaming path yields, in one call)."""
    chunker = SpeechChunker(first_clause_words=first_clause_words)
    return chunker.feed(text) + chunker.flush()
