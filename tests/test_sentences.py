"""The speech-aware sentence splitter: tricky inputs, fed whole and one character at a time."""

from __future__ import annotations

import pytest

from engines.llm.sentences import SpeechChunker, speakable, split_text

TABLE: list[tuple[str, list[str]]] = [
    # plain sentences, every terminator
    ("Hello there. How are you? Great!", ["Hello there.", "How are you?", "Great!"]),
    # titles and initials are not sentence ends
    ("Mr. Smith met Dr. Jones today. They talked.", ["Mr. Smith met Dr. Jones today.",
                                                     "They talked."]),
    ("J. R. R. Tolkien wrote it. Nice.", ["J. R. R. Tolkien wrote it.", "Nice."]),
    # decimals, thousands, times
    ("Pi is about 3.14. That is all.", ["Pi is about 3.14.", "That is all."]),
    ("It costs $1,000. Cheap!", ["It costs $1,000.", "Cheap!"]),
    ("Meet at 10:30 a.m. Don't be late.", ["Meet at 10:30 a.m.", "Don't be late."]),
    # Latin abbreviations
    ("Bring fruit, e.g. apples. Then go.", ["Bring fruit, e.g. apples.", "Then go."]),
    ("Some, i.e. most of them. Yes.", ["Some, i.e. most of them.", "Yes."]),
    ("Apples, pears, etc. and more. Etc. Then.", ["Apples, pears, etc. and more.", "Etc.",
                                                 "Then."]),
    # URLs keep their dots
    ("See https://example.com/docs.html for more. Bye.",
     ["See https://example.com/docs.html for more.", "Bye."]),
    ("Visit example.org. It helps.", ["Visit example.org.", "It helps."]),
    # list numbers stay with their item
    ("Two tips: 1. Drink water. 2. Sleep well.", ["Two tips: 1. Drink water.", "2. Sleep well."]),
    ("1. Flour\n2. Eggs\n3. Milk", ["1. Flour", "2. Eggs", "3. Milk"]),
    # emoji are not spoken; a lone emoji is no sentence
    ("Great job! 🎉 Keep going 💪", ["Great job!", "Keep going"]),
    ("👍", []),
    # markdown the voice must not read
    ("**Great** question! The *answer* is `42`.", ["Great question!", "The answer is 42."]),
    ("# Summary\nParis is the capital.", ["Summary", "Paris is the capital."]),
    ("Code:\n```python\nprint('a. b')\nx = 1\n```\nThat prints it.", ["Code:", "That prints it."]),
    ("Read [the docs](https://x.y/z.html). Then ask.", ["Read the docs.", "Then ask."]),
    ("- apples\n- pears\n\n---\n> a quote", ["apples", "pears", "a quote"]),
    ("Use __bold__ and _it_ but keep snake_case.", ["Use bold and it but keep snake_case."]),
    # quotes and closing brackets stay with their sentence
    ('He said "stop." Then he left.', ['He said "stop."', "Then he left."]),
    ("It works (mostly.) Fine.", ["It works (mostly.)", "Fine."]),
    # ellipses
    ("Well... maybe. I see... Now we go.", ["Well... maybe.", "I see...", "Now we go."]),
    # no final punctuation: the rest comes out at the end
    ("no final punctuation here", ["no final punctuation here"]),
    ("", []),
    # early in a reply a long sentence lets its clauses go one by one
    ("The capital of France, which is a big city with many museums, is Paris. Later, it rains.",
     ["The capital of France,", "which is a big city with many museums,", "is Paris.",
      "Later, it rains."]),
    ("Sure, I can help. Yes.", ["Sure,", "I can help.", "Yes."]),
    ("The first thing you should know about this - it is easy to do.",
     ["The first thing you should know about this -", "it is easy to do."]),
    ("A well-known fact is that the number 1,000,000 is large.",
     ["A well-known fact is that the number 1,000,000 is large."]),
]


@pytest.mark.parametrize(("text", "expected"), TABLE)
def test_whole_text(text: str, expected: list[str]) -> None:
    assert split_text(text) == expected


@pytest.mark.parametrize(("text", "expected"), TABLE)
def test_streamed_one_character_at_a_time(text: str, expected: list[str]) -> None:
    chunker = SpeechChunker()
    out: list[str] = []
    for ch in text:
        out += chunker.feed(ch)
    assert out + chunker.flush() == expected


def test_a_sentence_is_released_before_the_reply_ends() -> None:
    chunker = SpeechChunker()
    assert chunker.feed("Hello there.") == []  # a period alone may be "3." of "3.14"
    assert chunker.feed(" How") == ["Hello there."]
    assert chunker.feed(" are you") == []
    assert chunker.flush() == ["How are you"]


def test_a_break_that_cannot_be_part_of_a_word_goes_without_waiting_for_the_next() -> None:
    chunker = SpeechChunker()
    assert chunker.feed("Great question!") == ["Great question!"]
    assert chunker.feed(" Bees make honey,") == ["Bees make honey,"]
    assert chunker.feed(" about 1,") == []  # maybe "1,000"
    assert chunker.feed("000 a year. Really?") == ["about 1,000 a year.", "Really?"]
    assert chunker.feed(" See example.") == []  # maybe "example.org"
    assert chunker.feed("org") == []
    assert chunker.flush() == ["See example.org"]


@pytest.mark.parametrize(("tokens", "drafts", "released"), [
    # (the draft after each token: the sentence held back if its terminator ends it)
    (["The sky", " is blue", ".", " It"], [None, None, "The sky is blue.", None],
     ["The sky is blue."]),
    (["Visit example", ".", "org", " now."], [None, "Visit example.", None,
                                             "Visit example.org now."], []),
    (["Pi is 3", ".", "14", "."], [None, "Pi is 3.", None, "Pi is 3.14."], []),
    (["I met Mr", ".", " Smith", "."], [None, None, None, "I met Mr. Smith."], []),
    (["He said \"hi", ".\""], [None, 'He said "hi."'], []),
    (["Yes", "."], [None, "Yes."], []),
])
def test_a_draft_is_the_sentence_a_space_would_end(tokens: list[str], drafts: list[str | None],
                                                     released: list[str]) -> None:
    chunker = SpeechChunker()
    out: list[str] = []
    seen: list[str | None] = []
    for token in tokens:
        out += chunker.feed(token)
        seen.append(chunker.draft())
    assert seen == drafts
    assert out == released
    # what the draft guessed is what the end of the reply releases
    if drafts[-1] is not None:
        assert chunker.flush() == [drafts[-1]]


def test_a_link_target_is_held_back_until_it_closes() -> None:
    chunker = SpeechChunker()
    assert chunker.feed("See [the guide](https://a.b/c. d") == []
    assert chunker.feed(") now. Next") == ["See the guide now."]
    assert chunker.flush() == ["Next"]


def test_speakable() -> None:
    assert speakable("  Hi \n there 🙂 ") == "Hi there"
    assert speakable(" ... ") == ""


def test_the_first_clause_goes_on_its_own_at_a_comma_after_three_words():
    assert split_text("Bees make honey, which they collect from flowers.") == [
        "Bees make honey,", "which they collect from flowers."]
    # fewer words before the comma: too short a phrase to say alone, but for an interjection
    # that opens the reply, a phrase of its own
    assert split_text("In fact, a lemon is yellow.") == ["In fact, a lemon is yellow."]
    assert split_text("Yes, a lemon is yellow.") == ["Yes,", "a lemon is yellow."]
    assert split_text("Of course, bees make honey.") == ["Of course,", "bees make honey."]
    assert split_text("Bees make honey. Yes, they do.") == ["Bees make honey.", "Yes, they do."]


def test_a_long_first_sentence_without_commas_is_cut_before_a_conjunction():
    assert split_text("The sky on a clear day is usually blue and the sky above us can be grey.") == [
        "The sky on a clear day is usually blue", "and the sky above us can be grey."]
    # too early in the sentence, or past the start of the reply: no cut
    assert split_text("Cats and dogs are pets.") == ["Cats and dogs are pets."]
    assert split_text("Yes. The sky on a clear day is usually blue and the sea is too.") == [
        "Yes.", "The sky on a clear day is usually blue", "and the sea is too."]
    assert split_text("Well, the sun is a big star, and it gives us light and warmth each day. "
                      "The sky on a clear day is usually blue and the sea is too.") == [
        "Well,", "the sun is a big star,", "and it gives us light and warmth each day.",
        "The sky on a clear day is usually blue and the sea is too."]
    # "andrew" is no conjunction
    assert split_text("My best friend from the old school is called andrew smith.") == [
        "My best friend from the old school is called andrew smith."]


def test_a_long_first_sentence_without_any_break_is_cut_before_a_phrase():
    assert split_text("There's no specific number for dogs but they have four legs.") == [
        "There's no specific number for dogs", "but they have four legs."]
    assert split_text("A clear day can have many different colors depending on the hour.") == [
        "A clear day can have many different colors", "depending on the hour."]
    assert split_text("A ripe lemon is a classic example of a fruit that is yellow.") == [
        "A ripe lemon is a classic example", "of a fruit that is yellow."]
    assert split_text("Yes, a lemon is a classic example of a fruit that is yellow.") == [
        "Yes,", "a lemon is a classic example of a fruit", "that is yellow."]
    # short enough to wait for its end; a short first sentence does not end the early cuts
    assert split_text("The capital of France is Paris.") == ["The capital of France is Paris."]
    assert split_text("Bees make honey. They make it from the nectar of flowers in spring.") == [
        "Bees make honey.", "They make it from the nectar of flowers", "in spring."]
