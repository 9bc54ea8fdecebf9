"""extract_choice on replies the way models really write them."""

from __future__ import annotations

import pytest

from quantcheck.metrics.answers import extract_choice

CAPITALS = ["London", "Berlin", "Paris", "Madrid"]

PARSABLE = [
    ("[[B]]", "B"),
    ("B", "B"),
    ("B.", "B"),
    ("(B)", "B"),
    ("B)", "B"),
    ("Answer: B", "B"),
    ("The answer is B", "B"),
    ("The correct answer is (C) Paris.", "C"),
    ("**C**", "C"),
    ("answer: c", "C"),
    ("Paris", "C"),
    ("paris.", "C"),
    ("\n\n  D", "D"),
    ("  \nA. London is the capital of the United Kingdom.", "A"),
    ("C) Paris\n\nParis has been the capital of France since 987.", "C"),
    ("B\nBerlin is the capital of Germany.", "B"),
    ("The capital of France is Paris.", "C"),
    ("**Answer:** D", "D"),
    ("Final answer: [[A]]", "A"),
    ("Let me think step by step. France's capital is well known, so the answer is C.", "C"),
    ("I'd go with **B** here.", "B"),
    ("The answer is: a", "A"),
    ("Answer - (d)", "D"),
    ("Answer: B. The answer is B because Berlin is in Germany.", "B"),
    ("B. Options A and C are European capitals too, but not of Germany.", "B"),
    ("The answer is a. London", "A"),
    # an answer given first wins over later mentions
    ("B. Option A is incorrect because London is in England.", "B"),
    ("B\n\nExplanation: option C, Paris, is the capital of France, not of Germany.", "B"),
    ("(D) Madrid. The answer is not C.", "D"),
    # options listed back, then an answer
    ("A. London\nB. Berlin\nC. Paris\nD. Madrid\n\nThe answer is C.", "C"),
]

UNPARSABLE = [
    "",
    "   \n ",
    "I don't know.",
    "A or B",
    "The answer is A or B.",
    "Either (B) or (C) could be right.",
    "**A** or **D**",
    "Answer: B/C",
    "E",
    "The answer is E.",
    "As an AI language model, I cannot be certain about this.",
    "The answer is a bit unclear to me.",
    "a capital city in Europe",
    "Both London and Paris are capitals.",
    "Answer: A. Wait, no, the answer is D.",
    "Hmm, this is a tricky question about geography.",
]


@pytest.mark.parametrize(("reply", "expected"), PARSABLE)
def test_parses(reply: str, expected: str) -> None:
    assert extract_choice(reply, CAPITALS) == expected


@pytest.mark.parametrize("reply", UNPARSABLE)
def test_refuses(reply: str) -> None:
    assert extract_choice(reply, CAPITALS) is None


@pytest.mark.parametrize(
    ("reply", "choices"),
    [
        ("A. 100\nB. 1\nC. 10\nD. unknown", ["100", "1", "10", "unknown"]),
        ("A. USA\nB. Norway", ["USA", "Norway", "Sweden", "Denmark"]),
        ("**A.** London\n**B.** Berlin\n**C.** Paris\n**D.** Madrid", CAPITALS),
    ],
)
def test_options_listed_back_are_no_answer(reply: str, choices: list[str]) -> None:
    assert extract_choice(reply, choices) is None


def test_letter_range_follows_number_of_choices() -> None:
    five = CAPITALS + ["Rome"]
    assert extract_choice("E", five) == "E"
    assert extract_choice("E", CAPITALS) is None
    assert extract_choice("C", ["yes", "no"]) is None


def test_choice_text_must_be_unique_and_whole_word() -> None:
    numbers = ["1", "10", "100", "1000"]
    assert extract_choice("The result is 10.", numbers) == "B"
    assert extract_choice("10 or 100", numbers) is None


def test_too_many_choices_for_letters() -> None:
    with pytest.raises(ValueError):
        extract_choice("A", ["x", "y", "z"], letters="AB")
