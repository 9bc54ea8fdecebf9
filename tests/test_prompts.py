"""Users' own prompts (--dataset prompts:FILE.jsonl) on the built-in model: the reference answers once, every
variant is scored on those answer tokens; real runs, real values, and the one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import lowercase_tokenizer_copy, quantcheck, read_results
from quantcheck.analysis.free_answers import first_divergence

CHATS = [
    {
        "id": "capital",
        "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    },
    {
        "id": "haiku",
        "messages": [
            {"role": "system", "content": "You are a poet."},
            {"role": "user", "content": "Write a haiku about the sea."},
        ],
    },
    [{"role": "user", "content": "List three primary colors."}],
    {
        "id": "math",
        "messages": [
            {"role": "user", "content": "What is 12 times 7?"},
            {"role": "assistant", "content": "84."},
            {"role": "user", "content": "And 84 divided by 4?"},
        ],
    },
]
MAX_NEW_TOKENS = 24
QUANTS = ("none", "bf16", "quanto-int4")  # quanto-int4: a variant known to answer differently on its own


def write_prompts(path: Path, chats: list) -> Path:
    path.write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    return path


def prompts_run(out: Path, prompts: Path, *quants: str) -> object:
    return quantcheck(
        "run",
        "--dataset",
        f"prompts:{prompts}",
        "--max-new-tokens",
        str(MAX_NEW_TOKENS),
        "--skip-cost",
        "--out",
        str(out),
        *(part for name in quants for part in ("--quant", name)),
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prompts")
    out = root / "run"
    result = prompts_run(out, write_prompts(root / "prompts.jsonl", CHATS), *QUANTS)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def model(results: dict, name: str) -> dict:
    return next(entry for entry in results["models"] if entry["name"] == name)


def test_the_reference_answers_once_and_every_answer_token_is_scored(run):
    results = read_results(run)
    assert results["dataset"]["kind"] == "prompts" and results["dataset"]["n_items"] == len(CHATS)
    answers = json.loads((run / "reference" / "answers.json").read_text())["answers"]
    assert len(answers) == len(CHATS) and all(0 < len(answer) <= MAX_NEW_TOKENS for answer in answers)
    records = [json.loads(line) for line in (run / "models" / "bf16" / "corpus.jsonl").read_text().splitlines()]
    assert sorted(len(record["nll"]) for record in records) == sorted(len(answer) for answer in answers)
    assert model(results, "bf16")["corpus"]["tokens"] == sum(len(answer) for answer in answers)


def test_the_reference_is_greedy_on_its_own_answers(run):
    """Teacher forcing replays the reference's greedy picks: its most likely token is the answer's next token
    (a near-tie may flip between the cached generation and the full forward, hence not all)."""
    tokens = json.loads((run / "reference" / "tokens.json").read_text())
    firsts = json.loads((run / "reference" / "scored.json").read_text())["first"]
    stored = np.load(run / "reference" / "compact.npy")
    targets = [token for sequence, first in zip(tokens, firsts) for token in sequence[first + 1 :]]
    assert len(targets) == len(stored)
    assert np.mean(stored["top_ids"][:, 0] == np.array(targets)) >= 0.95


def test_identity_variant_is_exact_and_bf16_departs(run):
    results = read_results(run)
    identity, bf16 = model(results, "none")["corpus"], model(results, "bf16")["corpus"]
    assert identity["perplexity_ratio"]["value"] == 1.0 and identity["kl"]["mean"]["value"] == 0.0
    assert identity["same_top1"]["value"] == 1.0 and all(
        estimate["value"] == 0.0 for estimate in identity["delta_p"].values()
    )
    assert 0 < bf16["kl"]["mean"]["value"] < 0.05
    records = [json.loads(line) for line in (run / "models" / "bf16" / "corpus.jsonl").read_text().splitlines()]
    per_prompt = [np.mean(record["kl"]) for record in records]
    assert bf16["kl"]["mean"]["value"] == pytest.approx(np.mean(per_prompt), rel=1e-9)  # each prompt counts once
    names = ["capital", "haiku", "prompt-0002", "math"]
    worst = bf16["worst"]
    assert [span["name"] for span in worst] == [names[index] for index in np.argsort(per_prompt)[::-1]]
    assert worst[0]["worst_kl"] == pytest.approx(max(records[worst[0]["sequence"]]["kl"]))
    assert set(model(results, "bf16")["verdict"]["checks"]) == {"memory", "mean KL", "top-1 agreement"}


def test_a_rerun_keeps_the_answers_and_every_record(run, tmp_path):
    import shutil

    copy = shutil.copytree(run, tmp_path / "run")
    answers = (copy / "reference" / "answers.json").read_text()
    own = copy / "models" / "quanto-int4" / "answers.jsonl"
    kept = own.read_text()
    own.write_text(kept.splitlines(keepends=True)[0])  # as if stopped after its first answer
    again = prompts_run(copy, Path(read_results(run)["dataset"]["spec"].removeprefix("prompts:")), *QUANTS)
    assert again.returncode == 0 and (again.stdout + again.stderr).count("already finished") == 3
    assert (copy / "reference" / "answers.json").read_text() == answers
    latest = {json.loads(line)["prompt"]: line for line in own.read_text().splitlines()}  # a batch is redone whole
    assert sorted(latest.values()) == sorted(kept.splitlines())  # answered again, the same
    assert read_results(copy)["models"][3]["free_answers"] == read_results(run)["models"][3]["free_answers"]


def test_each_variant_answers_on_its_own_the_identity_exactly_and_int4_apart(run):
    """The identity variant answers every prompt token for token as the reference; quanto-int4's own answers part
    from the reference's, measured against the answers both wrote."""
    results = read_results(run)
    reference = json.loads((run / "reference" / "answers.json").read_text())["answers"]
    identity = model(results, "none")["free_answers"]
    assert identity["diverged"] == 0 and identity["identical"]["value"] == 1.0 and identity["first_divergence"] == {}
    assert identity["length_ratio"] == 1.0 and identity["no_stop"] == identity["reference_no_stop"]
    own = [json.loads(line) for line in (run / "models" / "quanto-int4" / "answers.jsonl").read_text().splitlines()]
    own = [record["ids"] for record in sorted(own, key=lambda record: record["prompt"])]
    parts = [first_divergence(ours, theirs) for ours, theirs in zip(reference, own)]
    bad = model(results, "quanto-int4")["free_answers"]
    assert bad["diverged"] == sum(point is not None for point in parts) >= 3
    assert bad["first_divergence"]["median"] == np.median([point for point in parts if point is not None])
    assert bad["length_ratio"] == pytest.approx(sum(map(len, own)) / sum(map(len, reference)))
    assert bad["no_stop"] == sum(len(answer) >= MAX_NEW_TOKENS for answer in own)
    earliest = bad["most_divergent"][0]
    assert earliest["diverges_at"] == min(point for point in parts if point is not None)
    assert any(
        "own greedy answers equal the reference's on" in reason
        for reason in model(results, "none")["verdict"]["reasons"]
    )
    report = (run / "report.md").read_text()
    assert (
        "What each variant answers on its own" in report
        and f"{earliest['name']}, parts at answer token {earliest['diverges_at']}:" in report
    )
    assert "What each variant answers on its own" in (run / "report.html").read_text()


def test_first_divergence_counts_a_longer_answer_as_parting_where_the_shorter_ends():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 7]) == 2 and first_divergence([1, 2, 7], [1, 2]) == 2
    assert first_divergence([], [4]) == 0


def test_a_variant_with_another_tokenizer_fails_alone_in_one_line(run, tmp_path):
    other = lowercase_tokenizer_copy(tmp_path / "lowercase")
    prompts = Path(read_results(run)["dataset"]["spec"].removeprefix("prompts:"))
    result = prompts_run(tmp_path / "out", prompts, "none", f"pretrained:{other}")
    assert result.returncode == 0, result.stderr[-2000:]
    results = read_results(tmp_path / "out")
    failed = next(entry for entry in results["models"] if entry["name"].startswith("pretrained"))
    assert failed["status"] == "failed" and "tokenizes the prompts differently" in failed["errors"][0]
    assert model(results, "none")["corpus"]["kl"]["mean"]["value"] == 0.0


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            ['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'],
            ":1: the last message must be the user's",
        ),
        (['{"messages": [{"role": "robot", "content": "hi"}]}'], ":1: every message needs a role"),
        (['{"messages": [{"role": "user", "content": "hi"}]}', "{oops"], ":2: not valid JSON"),
        (['{"id": "a", "messages": [{"role": "user", "content": "hi"}]}'] * 2, "prompt ids must be unique"),
        ([""], "no prompts"),
    ],
)
def test_bad_prompt_files_are_one_line_errors(tmp_path, lines, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = quantcheck("run", "--dataset", f"prompts:{path}", "--quant", "none", "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
