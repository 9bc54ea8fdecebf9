"""`orchestration/worker` in-process, on the built-in model and four virology questions: what one quality job records
(a wrong row order or a rescored resume would show only as a wrong KL or accuracy far away), and its exit codes.

Every expected number comes from a plain transformers forward of each prompt alone, written out here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantcheck.backends.variants import reference_spec
from quantcheck.data.load import load_dataset
from quantcheck.models.builtin import builtin_model_dir
from quantcheck.orchestration import worker
from quantcheck.schema.jobs import EVENT_PREFIX, JobSpec
from quantcheck.schema.models import ModelSpec
from quantcheck.schema.results import ItemRecord
from quantcheck.storage.folder import RunFolder
from quantcheck.storage.store import StoreSettings
from quantcheck.tasks.multiple_choice import finished_count
from quantcheck.tasks.prompts import answer_batches

N_QUESTIONS = 4
BATCH_SIZE = 2
TOLERANCE = 2e-4  # a left-padded batch against each prompt alone, in float32
ITEMS = load_dataset("mmlu:virology", N_QUESTIONS).items  # a seeded sample of the 166, in dataset order


def prepare_folder(root: Path) -> RunFolder:
    """The folder as the runner leaves it before the first job: run.json, the reference key (full store), the data."""
    dataset = load_dataset("mmlu:virology", N_QUESTIONS)
    folder = RunFolder(root)
    folder.prepare({"model": "builtin", "dataset": dataset.spec, "dataset_hash": dataset.content_hash()}, force=False)
    folder.check_reference_key({"reference_store": StoreSettings(kind="full").key()})
    folder.write_dataset(dataset)
    assert [item.item_id for item in folder.read_items()] == [item.item_id for item in ITEMS]
    return folder


def quality_job(folder: RunFolder, model: ModelSpec, **fields) -> JobSpec:
    return JobSpec(
        **{
            "kind": "quality",
            "run_dir": str(folder.root),
            "model": model,
            "device": "cpu",
            "dtype": "float32",
            "threads": 2,
            "seed": 0,
            "batch_size": BATCH_SIZE,
            "loglik": True,
            **fields,
        }
    )


def records(path: Path) -> list[ItemRecord]:
    return [ItemRecord.model_validate_json(line) for line in path.read_text().splitlines()]


def events(captured: str) -> list[dict]:
    return [json.loads(line[len(EVENT_PREFIX) :]) for line in captured.splitlines() if line.startswith(EVENT_PREFIX)]


def mmlu_prompt(item) -> str:
    """The zero-shot MMLU prompt, as lm-evaluation-harness writes it."""
    options = "".join(f"{letter}. {choice}\n" for letter, choice in zip("ABCD", item.choices))
    subject = item.subject.replace("_", " ")
    intro = f"The following are multiple choice questions (with answers) about {subject}."
    return f"{intro}\n\n{item.question.strip()}\n{options}Answer:"


def next_token_rows(weights: Path) -> np.ndarray:
    """Each prompt through transformers on its own (no padding): the log-softmax after "Answer:", float32."""
    tokenizer = AutoTokenizer.from_pretrained(weights)
    model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32).eval()
    rows = []
    with torch.no_grad():
        for item in ITEMS:
            ids = tokenizer(mmlu_prompt(item), return_tensors="pt").input_ids
            rows.append(torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1).numpy())
    return np.stack(rows)


def letter_ids() -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir())
    return [tokenizer.encode(f" {letter}", add_special_tokens=False)[0] for letter in "ABCD"]


@pytest.fixture(scope="module")
def reference_rows() -> np.ndarray:
    return next_token_rows(builtin_model_dir())


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> RunFolder:
    """The reference's quality job (log-likelihood only) run once in this process."""
    folder = prepare_folder(tmp_path_factory.mktemp("worker") / "run")
    worker.run_quality(quality_job(folder, reference_spec("hf", str(builtin_model_dir()))), folder)
    return folder


@pytest.fixture(scope="module")
def perturbed_weights(tmp_path_factory) -> Path:
    """The built-in model with its final norm scaled and one layer's MLP output jittered: a variant of known logits."""
    folder = tmp_path_factory.mktemp("perturbed")
    for path in builtin_model_dir().iterdir():
        if path.name != "model.safetensors":
            shutil.copy(path, folder / path.name)
    tensors = load_file(builtin_model_dir() / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 0.6
    down = tensors["model.layers.20.mlp.down_proj.weight"]
    noise = torch.randn(down.shape, generator=torch.Generator().manual_seed(0), dtype=down.dtype)
    tensors["model.layers.20.mlp.down_proj.weight"] = down + 0.02 * noise
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def copy_run(reference_run: RunFolder, root: Path) -> RunFolder:
    shutil.copytree(reference_run.root, root)
    return RunFolder(root)


def test_reference_records_the_choice_logprobs_of_an_independent_forward(reference_run, reference_rows):
    """Each item's record holds log p(" A".." D") after "Answer:", its argmax as the answer, and the top-20 ids."""
    letters = letter_ids()
    by_id = {record.item_id: record for record in records(reference_run.model_file("reference", "quality.jsonl"))}
    assert sorted(by_id) == sorted(item.item_id for item in ITEMS)
    for item, row in zip(ITEMS, reference_rows, strict=True):
        record = by_id[item.item_id]
        expected = row[letters]
        np.testing.assert_allclose(record.loglik.choice_logprobs, expected, atol=TOLERANCE)
        assert record.loglik.pred == "ABCD"[int(np.argmax(expected))]
        assert record.loglik.correct == (int(np.argmax(expected)) == item.answer)
        assert record.answer == "ABCD"[item.answer] and record.model == "reference"
        assert record.topk_ids[0] == int(np.argmax(row))
        np.testing.assert_allclose(record.topk_logprobs, np.sort(row)[::-1][: len(record.topk_ids)], atol=TOLERANCE)
        assert record.kl is None and record.top1_agree is None  # the reference is not compared with itself


def test_reference_store_row_i_is_dataset_item_i(reference_run, reference_rows):
    """The full store holds each item's whole next-token row at the item's dataset index, not in batch order."""
    stored = np.load(reference_run.reference_dir / "logprobs.npy")
    assert stored.shape == reference_rows.shape
    np.testing.assert_allclose(stored, reference_rows, atol=TOLERANCE)
    tokens = json.loads((reference_run.reference_dir / "tokens.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir())
    assert tokens == [tokenizer(mmlu_prompt(item)).input_ids for item in ITEMS]


def test_variant_kl_and_agreement_are_against_the_stored_reference_row(
    reference_run, reference_rows, perturbed_weights, tmp_path, capsys
):
    """A variant's KL(reference || variant), top-1 agreement and Jaccard@1 equal those of two independent forwards."""
    folder = copy_run(reference_run, tmp_path / "run")
    variant = ModelSpec(name="perturbed", role="variant", backend="hf", method="none", weights=str(perturbed_weights))
    worker.run_quality(quality_job(folder, variant), folder)
    assert not [event for event in events(capsys.readouterr().out) if event["event"] == "warning"]
    variant_rows = next_token_rows(perturbed_weights)
    p_reference = np.exp(reference_rows.astype(np.float64))
    expected_kl = (p_reference * (reference_rows.astype(np.float64) - variant_rows)).sum(axis=-1)
    by_id = {record.item_id: record for record in records(folder.model_file("perturbed", "quality.jsonl"))}
    assert sorted(by_id) == sorted(item.item_id for item in ITEMS)
    assert min(expected_kl) > 0.01  # the perturbation is visible: KL of zero would pass anything
    for item, ref_row, var_row, kl in zip(ITEMS, reference_rows, variant_rows, expected_kl, strict=True):
        record = by_id[item.item_id]
        assert record.kl == pytest.approx(kl, rel=1e-3, abs=1e-5), item.item_id
        assert record.kl_bound is None and record.kl_lower is None  # exact, from full rows
        same_top = int(np.argmax(ref_row)) == int(np.argmax(var_row))
        assert record.top1_agree == same_top
        assert record.jaccard[1] == (1.0 if same_top else 0.0)
        np.testing.assert_allclose(record.loglik.choice_logprobs, var_row[letter_ids()], atol=TOLERANCE)


def test_resumed_job_keeps_recorded_items_byte_identical_and_scores_only_the_rest(reference_run, tmp_path, capsys):
    """Items already in quality.jsonl are not scored again: their lines stay as they were, no item is written twice."""
    folder = copy_run(reference_run, tmp_path / "run")
    path = folder.model_file("reference", "quality.jsonl")
    first_batch = records(path)[:BATCH_SIZE]
    for record in first_batch:  # a marker no scoring would write: rescoring them would overwrite it
        record.loglik.choice_logprobs = [-1.0, -2.0, -3.0, -4.0]
    kept = "".join(record.model_dump_json() + "\n" for record in first_batch)
    path.write_text(kept)
    capsys.readouterr()
    worker.run_quality(quality_job(folder, reference_spec("hf", str(builtin_model_dir()))), folder)
    text = path.read_text()
    assert text.startswith(kept)
    ids = [record.item_id for record in records(path)]
    assert sorted(ids) == sorted(item.item_id for item in ITEMS)  # each once
    progress = [event for event in events(capsys.readouterr().out) if event.get("phase") == "loglik"]
    assert progress[0] == {"event": "phase", "phase": "loglik", "total": N_QUESTIONS, "done": BATCH_SIZE}
    assert sum(event["count"] for event in progress[1:]) == N_QUESTIONS - BATCH_SIZE


def test_reference_records_without_their_stored_rows_are_scored_again(reference_run, reference_rows, tmp_path):
    """Reference records whose store is gone are dropped and every item rescored: no variant may read empty rows."""
    folder = copy_run(reference_run, tmp_path / "run")
    path = folder.model_file("reference", "quality.jsonl")
    stale = records(path)
    for record in stale:
        record.loglik.choice_logprobs = [-1.0, -2.0, -3.0, -4.0]
    path.write_text("".join(record.model_dump_json() + "\n" for record in stale))
    (folder.reference_dir / "logprobs.npy").unlink()
    worker.run_quality(quality_job(folder, reference_spec("hf", str(builtin_model_dir()))), folder)
    fresh = records(path)
    assert sorted(record.item_id for record in fresh) == sorted(item.item_id for item in ITEMS)
    letters = letter_ids()
    by_id = {record.item_id: record for record in fresh}
    for item, row in zip(ITEMS, reference_rows, strict=True):
        np.testing.assert_allclose(by_id[item.item_id].loglik.choice_logprobs, row[letters], atol=TOLERANCE)
    np.testing.assert_allclose(np.load(folder.reference_dir / "logprobs.npy"), reference_rows, atol=TOLERANCE)


@pytest.mark.parametrize(("count", "batch_size"), [(0, 3), (1, 3), (6, 3), (7, 3), (5, 1), (4, 8)])
def test_answer_batches_are_consecutive_and_cover_every_prompt_once(count, batch_size):
    """The reference's answers and each variant's own are made in the same consecutive batches of at most batch_size."""
    batches = answer_batches(count, batch_size)
    assert [index for batch in batches for index in batch] == list(range(count))
    assert all(0 < len(batch) <= batch_size for batch in batches)
    assert [len(batch) for batch in batches[:-1]] == [batch_size] * (len(batches) - 1)


def test_finished_counts_only_recorded_items_of_this_data_set():
    """The progress 'done' count ignores recorded ids that are not among the items being scored."""
    done = {ITEMS[0].item_id, ITEMS[2].item_id, "mmlu-virology-from-another-run"}
    assert finished_count(ITEMS, done) == 2
    assert finished_count(ITEMS[:1], done) == 1
    assert finished_count(ITEMS, set()) == 0


def run_main(folder: RunFolder, job: JobSpec, tmp_path: Path) -> tuple[int, Path]:
    """`worker.main` as the launcher starts it, with a stale error file from an earlier attempt in place."""
    job_file = tmp_path / "job.json"
    job_file.write_text(job.model_dump_json())
    error_file = folder.model_file(job.model.folder, f"{job.kind}.error.json")
    error_file.parent.mkdir(parents=True, exist_ok=True)
    error_file.write_text(json.dumps({"message": "from an earlier attempt"}))
    return worker.main(["worker", str(job_file)]), error_file


def test_main_exits_2_with_the_message_for_a_problem_the_user_can_fix(tmp_path, monkeypatch):
    """An unknown backend is the user's to fix: exit 2, its one-line message in quality.error.json."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = prepare_folder(tmp_path / "run")
    spec = ModelSpec(name="odd", role="variant", backend="no-such-engine", method="none", weights="x")
    code, error_file = run_main(folder, quality_job(folder, spec), tmp_path)
    assert code == 2
    message = json.loads(error_file.read_text())["message"]
    assert "unknown backend 'no-such-engine'" in message and "\n" not in message


def test_main_exits_1_naming_the_error_type_for_anything_else(tmp_path, monkeypatch):
    """A missing model folder is not a QuantcheckError: exit 1, the message led by the exception's type."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = prepare_folder(tmp_path / "run")
    spec = ModelSpec(name="gone", role="variant", backend="hf", method="none", weights=str(tmp_path / "no-model"))
    code, error_file = run_main(folder, quality_job(folder, spec), tmp_path)
    assert code == 1
    message = json.loads(error_file.read_text())["message"]
    assert message.startswith("OSError: ") and "from an earlier attempt" not in message


def test_main_exits_0_and_removes_a_stale_error_file(tmp_path, monkeypatch):
    """A job that succeeds exits 0 and leaves no error file from an earlier attempt (the launcher would report it)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = prepare_folder(tmp_path / "run")
    job = quality_job(folder, reference_spec("hf", str(builtin_model_dir())), loglik=False)
    code, error_file = run_main(folder, job, tmp_path)
    assert code == 0
    assert not error_file.exists()
    engine = json.loads(folder.model_file("reference", "engine.json").read_text())
    assert engine["engine"] == "transformers" and engine["compute_dtype"] == "float32"
    assert not folder.model_file("reference", "quality.jsonl").exists()  # loglik=False: nothing scored
