"""Which option a generated reply chose, or None when it cannot be told.

Generative accuracy is only as honest as this parser: a reply it misreads counts as a wrong answer
for that model, so it must accept the ordinary ways models state a letter and refuse to guess when
a reply names none, or several.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence


def _letter(allowed: str) -> str:
    """A single allowed letter as a regex group.

    Upper case stands alone anywhere; lower case only when punctuation or the end of the reply
    follows, so the English article in "the answer is a bit unclear" is never read as option A.
    """
    upper = re.escape(allowed.upper())
    lower = re.escape(allowed.lower())
    return rf"(?P<letter>[{upper}](?![A-Za-z])|[{lower}](?=\s*(?:$|[).:\]*,])))"


def _patterns(allowed: str) -> list[re.Pattern[str]]:
    """The letter patterns, most explicit first; the first that matches decides.

    1. `[[B]]`: the format the instruction asks for.
    2. A letter opening the reply, closed by punctuation or the line end: "B", "B.", "(B)",
       "B) Paris", "**C**", "B\\nbecause...". An answer given first wins over later mentions, so
       "B. Option A is wrong because..." reads B. A bare "A bird..." is not a letter answer.
    3. A cue word: "Answer: B", "The (correct) answer is (C) Paris", "option B", "**Answer:** b".
    4. A marked letter anywhere: "I would pick **B**", "... so (C)".

    Pattern 4 accepts mismatched marks such as "(B**"; replies do not write those in practice.
    """
    letter = _letter(allowed)
    return [
        re.compile(rf"\[\[\s*{letter}\s*\]\]"),
        re.compile(rf"^\s*[(\[]?(?:\*\*)?{letter}(?:\*\*)?(?:[)\].:]|\s*$|\s*\n)"),
        re.compile(
            rf"(?i:\b(?:answer|option|choice)\b)(?:\s+(?:is|would\s+be|should\s+be))?"
            rf"\s*(?:\*\*)?\s*[:\-]?\s*(?:\*\*)?\s*[(\[]?\s*{letter}"
        ),
        re.compile(rf"(?:\*\*|\()\s*{letter}\s*(?:\*\*|\))"),
    ]


def _option_lines(allowed: str) -> re.Pattern[str]:
    """A line that opens with an option label: "A. 100", "B) Norway", "(C) ...", "**D.** ..."."""
    upper = re.escape(allowed.upper())
    return re.compile(
        rf"^[ \t]*[(\[]?(?:\*\*)?(?P<label>[{upper}])(?:\*\*)?[)\].:](?:\*\*)?(?:[ \t].*)?$", re.MULTILINE
    )


def _without_option_list(text: str, allowed: str) -> str:
    """The reply less any list of the options: two or more lines opening with different labels.

    Such lines walk through the options ("A. 100\\nB. 1\\nC. 10"); their labels are not answers.
    One labelled line ("C) Paris") is an answer and stays.
    """
    lines = _option_lines(allowed)
    if len({match.group("label") for match in lines.finditer(text)}) < 2:
        return text
    return lines.sub("", text)


def _hedge(allowed: str) -> re.Pattern[str]:
    """What follows a letter that hedges towards a second one: " or B", " and (C)", "/D"."""
    upper = re.escape(allowed.upper())
    return re.compile(rf"[)\]*]*\s*(?:or|and|/)\s*[(\[*]*[{upper}](?![A-Za-z])")


def _choice_text(text: str, choices: Sequence[str], allowed: str) -> str | None:
    """The option whose text is the whole reply, else the only option whose text appears in it."""
    reply = text.strip().rstrip(".!").strip().casefold()
    for letter, choice in zip(allowed, choices):
        if reply == choice.strip().casefold():
            return letter
    found = {
        letter
        for letter, choice in zip(allowed, choices)
        if choice.strip() and re.search(rf"(?<!\w){re.escape(choice.strip().casefold())}(?!\w)", text.casefold())
    }
    return found.pop() if len(found) == 1 else None


def extract_choice(text: str, choices: Sequence[str], letters: str = string.ascii_uppercase) -> str | None:
    """The upper-case letter of the option `text` chose among `choices`, or None if unparsable.

    Letters run from A up to the number of choices; any other letter is not an answer. A list of
    the options written back is set aside first: it gives no answer. Letter patterns are tried
    in order (see `_patterns`); within the deciding pattern, two different
    letters, or one letter hedged with another ("A or B"), make the reply ambiguous and it is
    refused rather than guessed. Only when no letter pattern matches is the reply compared with
    the option texts.
    """
    if len(choices) > len(letters):
        raise ValueError(f"{len(choices)} choices but only {len(letters)} letters")
    allowed = letters[: len(choices)].upper()
    text = _without_option_list(text, allowed)
    if not text.strip():
        return None
    hedge = _hedge(allowed)
    for pattern in _patterns(allowed):
        matches = list(pattern.finditer(text))
        if not matches:
            continue
        if any(hedge.match(text, match.end("letter")) for match in matches):
            return None
        found = {match.group("letter").upper() for match in matches}
        return found.pop() if len(found) == 1 else None
    return _choice_text(text, choices, allowed)
