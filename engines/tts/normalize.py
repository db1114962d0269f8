"""Text as a voice should read it: numbers, money and symbols in words, no emoji, no markup.

A language model writes for the eye ("$4.50", "50%", "**bold**", "https://..."); a TTS voice
stumbles on that or spells it out. :func:`for_speech` rewrites it for English speech and
:func:`pieces` cuts the result into short spans, so the first audio leaves early and no single
synthesis call is ever huge, however long the input.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import urlsplit

_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
         "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"))
_ORDINAL_WORDS = {"one": "first", "two": "second", "three": "third", "five": "fifth",
                  "eight": "eighth", "nine": "ninth", "twelve": "twelfth"}
MAX_DIGITS = 15  # longer numbers are read digit by digit
MAX_SPOKEN_DIGITS = 30  # longer still: "a long number"

_CURRENCIES = {"$": ("dollar", "dollars", "cent", "cents"), "€": ("euro", "euros", "cent", "cents"),
               "£": ("pound", "pounds", "penny", "pence"), "¥": ("yen", "yen", "", "")}
_SYMBOLS = {"&": " and ", "%": " percent ", "+": " plus ", "=": " equals ", "@": " at ",
            "°": " degrees ", "×": " times ", "÷": " divided by ", "<": " less than ",
            ">": " greater than ", "~": " about ", "/": " slash ", "\\": " ", "|": " ",
            "^": " ", "_": " ", "*": " ", "#": " ", "`": " ", "[": " ", "]": " ", "{": " ",
            "}": " ", "<<": " ", "•": " ", "→": " to ", "←": " ", "…": "... "}

_URL = re.compile(r"\b(?:https?://|www\.)[^\s<>\"']+", re.IGNORECASE)
_EMAIL = re.compile(r"(?<![\w.+-])([\w.+-]+)@([\w-]+(?:\.[\w-]+)+)\b")
_MONEY = re.compile(r"([$€£¥])\s?(\d[\d,]*)(?:\.(\d{1,2}))?(?:\s?(k|m|bn|million|billion)\b)?",
                    re.IGNORECASE)
_PERCENT = re.compile(r"(?<![\d,.])(\d[\d,]*(?:\.\d+)?)\s?%")
_ORDINAL = re.compile(r"\b(\d+)(st|nd|rd|th)\b", re.IGNORECASE)
_TIME = re.compile(r"\b([01]?\d|2[0-3]):([0-5]\d)\b")
_YEAR = re.compile(r"(?<![\d,.])(1[1-9]\d\d|20[1-9]\d)(?![\d,.]\d)(s?)\b")
_NUMBER = re.compile(r"(?<![\w.,])(-)?(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(?!\w)")
_RANGE = re.compile(r"(\d)\s?[-–]\s?(\d)")
_MARKUP = re.compile(r"(\*\*|__|~~|```[a-z]*|^#{1,6}\s|^\s*[-*+]\s|^\s*>\s?)", re.MULTILINE)
_SPACES = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_CLAUSE_END = re.compile(r"(?<=[,;:])\s+|\s+(?=[—–-]\s)")


def number_words(n: int) -> str:
    """Cardinal number in English words ("one hundred twenty-three")."""
    if n < 0:
        return "minus " + number_words(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{_ONES[hundreds]} hundred" + (f" {number_words(rest)}" if rest else "")
    for scale, name in _SCALES:
        if n >= scale:
            high, rest = divmod(n, scale)
            return f"{number_words(high)} {name}" + (f" {number_words(rest)}" if rest else "")
    raise AssertionError("unreachable")


def ordinal_words(n: int) -> str:
    """Ordinal in words ("twenty-first")."""
    words = number_words(n)
    head, sep, last = words.rpartition("-") if "-" in words.split()[-1] else words.rpartition(" ")
    if last in _ORDINAL_WORDS:
        last = _ORDINAL_WORDS[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return head + sep + last


def _digits(text: str) -> str:
    if len(text) > MAX_SPOKEN_DIGITS:
        return "a long number"
    return " ".join(_ONES[int(d)] for d in text)


def _integer(text: str) -> str:
    digits = text.replace(",", "")
    if len(digits) > MAX_DIGITS:
        return _digits(digits)
    return number_words(int(digits))


def _year(year: int, *, plural: bool = False) -> str:
    high, low = divmod(year, 100)
    words = (f"{number_words(high)} hundred" if low == 0 else
             f"{number_words(high)} {'oh ' if low < 10 else ''}{number_words(low)}")
    if plural:
        words = words[:-1] + "ies" if words.endswith("y") else words + "s"
    return words


def _money(m: re.Match[str]) -> str:
    one, many, cent, cents = _CURRENCIES[m.group(1)]
    whole, frac, scale = m.group(2), m.group(3), m.group(4)
    if scale:
        scale_word = {"k": "thousand", "m": "million", "bn": "billion"}.get(scale.lower(), scale)
        amount = _integer(whole) + (f" point {_digits(frac)}" if frac else "")
        return f" {amount} {scale_word} {many} "
    units = int(whole.replace(",", "")) if len(whole.replace(",", "")) <= MAX_DIGITS else 2
    words = f"{_integer(whole)} {one if units == 1 else many}"
    if frac and cent:
        value = int(frac.ljust(2, "0"))
        if value:
            words += f" and {number_words(value)} {cent if value == 1 else cents}"
    return f" {words} "


def _number(m: re.Match[str]) -> str:
    sign, whole, frac = m.groups()
    words = ("minus " if sign else "") + _integer(whole)
    if frac:
        words += " point " + _digits(frac)
    return words


def _url(m: re.Match[str]) -> str:
    url = m.group(0).rstrip(".,;:!?)")
    host = urlsplit(url if "://" in url else f"http://{url}").hostname or ""
    host = host.removeprefix("www.")
    return " " + " dot ".join(part for part in host.split(".") if part) + " "


def _keep(ch: str) -> bool:
    """Letters, digits, punctuation and spaces stay; emoji, symbols and control codes go."""
    cat = unicodedata.category(ch)
    return cat[0] in "LNPZ" or ch in _SYMBOLS or ch in _CURRENCIES or cat == "Mn"


def for_speech(text: str) -> str:
    """``text`` rewritten to be read aloud by an English voice; may return an empty string."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch if _keep(ch) else "" if unicodedata.category(ch) == "Cf" else " "
                   for ch in text)
    text = _MARKUP.sub(" ", text)
    text = _URL.sub(_url, text)
    text = _EMAIL.sub(lambda m: f" {m.group(1)} at {_url_host(m.group(2))} ", text)
    text = _MONEY.sub(_money, text)
    text = _PERCENT.sub(lambda m: f"{_number(_NUMBER.match(m.group(1)))} percent", text)  # type: ignore[arg-type]
    text = _TIME.sub(lambda m: _time(int(m.group(1)), int(m.group(2))), text)
    text = _ORDINAL.sub(lambda m: ordinal_words(int(m.group(1))) if len(m.group(1)) <= MAX_DIGITS
                        else m.group(0), text)
    text = _YEAR.sub(lambda m: _year(int(m.group(1)), plural=bool(m.group(2))), text)
    text = _RANGE.sub(r"\1 to \2", text)
    text = _NUMBER.sub(_number, text)
    text = "".join(_SYMBOLS.get(ch, ch) for ch in text)
    text = _SPACES.sub(" ", text)
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text).strip()


def _url_host(host: str) -> str:
    return " dot ".join(host.split("."))


def _time(hour: int, minute: int) -> str:
    if minute == 0:
        return f"{number_words(hour)} o'clock" if 0 < hour <= 12 else f"{number_words(hour)} hundred"
    return f"{number_words(hour)} {'oh ' if minute < 10 else ''}{number_words(minute)}"


MIN_PIECE_CHARS = 12  # a clause shorter than this ("Well,") is never a span of its own


def pieces(text: str, *, first_chars: int = 32, max_chars: int = 240) -> list[str]:
    """Cut normalised ``text`` into spans to synthesise one at a time.

    Sentences stay whole up to ``max_chars``; longer ones are cut at clause punctuation, then at
    spaces, then anywhere. The first span is cut earlier (after ``first_chars``) at a clause
    boundary, so that the first audio of a sentence is ready sooner: Piper's time to the first
    sound grows with the span ("Bees make honey," then "which they collect...").
    """
    out: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        sentence = sentence.strip()
        if not sentence:
            continue
        limit = first_chars if not out else max_chars
        out.extend(_cut(sentence, limit, max_chars))
    return out


def _cut(sentence: str, first_limit: int, max_chars: int) -> list[str]:
    """Split one sentence at clause ends into spans no longer than ``max_chars``."""
    out: list[str] = []
    current = ""
    limit = first_limit
    for clause in _CLAUSE_END.split(sentence):
        if not clause:
            continue
        candidate = f"{current} {clause}" if current else clause
        if current and len(candidate) > limit and len(current) >= min(limit, MIN_PIECE_CHARS):
            out.append(current)
            limit = max_chars
            candidate = clause
        current = candidate
        while len(current) > max_chars:
            head, tail = _split_words(current, max_chars)
            out.append(head)
            limit = max_chars
            current = tail
    if current:
        out.append(current)
    return out


def _split_words(text: str, max_chars: int) -> tuple[str, str]:
    cut = text.rfind(" ", 0, max_chars + 1)
    if cut <= 0:
        cut = max_chars
    return text[:cut].strip(), text[cut:].strip()
