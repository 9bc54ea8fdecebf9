"""The prompt formats, recorded verbatim in every results file.

Log-likelihood scoring uses the standard MMLU zero-shot format (as lm-evaluation-harness): the model
is scored on " A".." D" right after "Answer:", so no text has to be parsed. Generative scoring
wraps the same question in the model's chat template with an explicit instruction.
"""

from __future__ import annotations

from quantcheck.data.items import LETTERS, Item

LOGLIK_FORMAT = (
    "The following are multiple choice questions (with answers) about {subject}.\n\n"
    "{question}\nA. {choice_A}\nB. {choice_B}\n...\nAnswer:"
)
GENERATION_INSTRUCTION = "Answer with the letter of the correct option only."


def _body(item: Item) -> str:
    subject = item.subject.replace("_", " ")
    options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(item.choices))
    return (
        f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        f"{item.question.strip()}\n{options}\n"
    )


def loglik_prompt(item: Item) -> str:
    return _body(item) + "Answer:"


def answer_continuations(n_choices: int) -> list[str]:
    return [f" {letter}" for letter in LETTERS[:n_choices]]


def generation_prompt(item: Item) -> str:
    """The user turn of the generative evaluation (the chat template is applied by the scorer)."""
    return _body(item) + GENERATION_INSTRUCTION
