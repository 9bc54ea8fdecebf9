"""Data sets: the packaged MMLU CSVs, user CSV/JSONL files, and their errors."""

import json

import pytest

from quantcheck.data.load import load_dataset
from quantcheck.data.prompts import loglik_prompt
from quantcheck.errors import DatasetError


def test_mmlu_virology_has_166_questions_from_the_offline_csvs():
    dataset = load_dataset("mmlu:virology")
    assert len(dataset.items) == 166
    assert dataset.subjects == ["virology"]
    first = dataset.items[0]
    assert first.question == "How many human polyomaviruses are known at present?"
    assert first.choices == ("100", "1", "10", "unknown") and first.answer_letter == "A"
    assert loglik_prompt(first) == (
        "The following are multiple choice questions (with answers) about virology.\n\n"
        "How many human polyomaviruses are known at present?\nA. 100\nB. 1\nC. 10\nD. unknown\nAnswer:"
    )


def test_subject_lists_and_reproducible_limit():
    both = load_dataset("mmlu:virology,anatomy")
    assert both.subjects == ["anatomy", "virology"]
    sample = load_dataset("mmlu:all", limit=40, seed=3)
    again = load_dataset("mmlu:all", limit=40, seed=3)
    other = load_dataset("mmlu:all", limit=40, seed=4)
    assert [i.item_id for i in sample.items] == [i.item_id for i in again.items]
    assert [i.item_id for i in sample.items] != [i.item_id for i in other.items]
    assert sample.content_hash() == again.content_hash() != other.content_hash()


def test_unknown_subject_lists_the_valid_ones():
    with pytest.raises(DatasetError, match="unknown MMLU subject 'virologyy'.*virology"):
        load_dataset("mmlu:virologyy")


def test_limit_must_be_positive():
    with pytest.raises(DatasetError, match="--limit must be a positive"):
        load_dataset("mmlu:virology", limit=0)


def test_csv_file_in_mmlu_layout(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text('question,A,B,C,D,answer\n"What is 2+2?",3,4,5,6,B\nCapital of France?,Paris,Rome,Oslo,Bern,A\n')
    dataset = load_dataset(str(path))
    assert [item.answer for item in dataset.items] == [1, 0]
    assert dataset.items[0].question == "What is 2+2?"


def test_jsonl_file_with_letters_and_indices(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [
        {"id": "q1", "question": "Pick two", "choices": ["one", "two", "three"], "answer": "B"},
        {"question": "Pick first", "choices": ["yes", "no"], "answer": 0, "subject": "logic"},
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    items = load_dataset(str(path)).items
    assert items[0].item_id == "q1" and items[0].answer == 1 and len(items[0].choices) == 3
    assert items[1].subject == "logic" and items[1].answer == 0


@pytest.mark.parametrize(
    "content, message",
    [
        (
            '{"question": "q", "choices": ["a", "b"], "answer": "B"}\n'
            '{"question": "q2", "choices": ["a"], "answer": 0}\n',
            r"mine.jsonl:2: needs 2 to 10 choices",
        ),
        ('{"question": "q", "choices": ["a", "b"]}\n', r"mine.jsonl:1: missing answer"),
        ("not json\n", r"mine.jsonl:1: not valid JSON"),
        (
            '{"question": "q", "choices": ["a", "b"], "answer": "E"}\n',
            r"mine.jsonl:1: answer 'E' is out of range for 2 choices",
        ),
        ('{"question": "q", "choices": ["a", "b"], "answer": 5}\n', r"mine.jsonl:1: answer 5 is out of range"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "mine.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_dataset(str(path))


def test_malformed_csv_names_file_and_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("Q1,a,b,c,d,A\nQ2,a,b,c,d,Z\n")
    with pytest.raises(DatasetError, match=r"bad.csv:2: answer must be a letter"):
        load_dataset(str(path))


def test_empty_dataset_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DatasetError, match="has no questions"):
        load_dataset(str(path))


def test_missing_file_is_an_error():
    with pytest.raises(DatasetError, match="neither an existing file"):
        load_dataset("/nonexistent/questions.csv")
