"""Real runs with both reference stores on the same variants: the compact store's KL against the
full store's, item by item; its size on disk; a changed store recomputes; a damaged one is refused."""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest

from conftest import quantcheck, read_items, read_results

VARIANTS = ("bnb-nf4", "torchao-int8wo")
N_ITEMS = 40
VOCAB = 49_152
COMPACT_ROW_BYTES = 64 * (4 + 4) + 8 + 128 * (4 + 4)


def run_args(out: Path, *extra: str) -> list[str]:
    quants = [arg for quant in VARIANTS for arg in ("--quant", quant)]
    return [
        "run",
        *quants,
        "--limit",
        str(N_ITEMS),
        "--out",
        str(out),
        "--skip-generation",
        "--skip-cost",
        "--no-floors",
        *extra,
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, str]:
    """The compact run (the default), then the same folder with --store full: everything is scored again."""
    root = tmp_path_factory.mktemp("stores")
    compact, full = root / "compact", root / "full"
    result = quantcheck(*run_args(compact))
    assert result.returncode == 0, result.stderr[-3000:]
    shutil.copytree(compact, full)
    result = quantcheck(*run_args(full, "--store", "full"))
    assert result.returncode == 0, result.stderr[-3000:]
    return compact, full, result.stderr


def by_model(run: Path) -> dict[str, dict[str, dict]]:
    items: dict[str, dict[str, dict]] = {}
    for item in read_items(run):
        items.setdefault(item["model"], {})[item["item_id"]] = item
    return items


@pytest.mark.parametrize("variant", VARIANTS)
def test_compact_kl_matches_the_full_store_item_by_item_and_its_bounds_hold(runs, variant):
    compact, full, _ = runs
    estimated, exact = by_model(compact)[variant], by_model(full)[variant]
    assert estimated.keys() == exact.keys() and len(exact) == N_ITEMS
    for item_id, record in estimated.items():
        truth = exact[item_id]["kl"]
        assert exact[item_id]["kl_lower"] is None and exact[item_id]["kl_upper"] is None
        assert record["kl_lower"] <= truth + 1e-9 <= record["kl_upper"] + 2e-9, item_id
        assert record["kl_lower"] <= record["kl"] <= record["kl_upper"]
        # Jaccard@k, top-1 and the answers come from the stored top K: identical to the full store's.
        assert (record["jaccard"], record["top1_agree"], record["loglik"]) == (
            exact[item_id]["jaccard"],
            exact[item_id]["top1_agree"],
            exact[item_id]["loglik"],
        )
    relative = [(record["kl"] - exact[item_id]["kl"]) / exact[item_id]["kl"] for item_id, record in estimated.items()]
    assert abs(statistics.fmean(relative)) < 0.01  # within 1 % item by item on average
    assert statistics.fmean(abs(error) for error in relative) < 0.03
    lower_only = [
        (record["kl_lower"] - exact[item_id]["kl"]) / exact[item_id]["kl"] for item_id, record in estimated.items()
    ]
    assert statistics.fmean(lower_only) < -0.05  # the tail seen as one token alone understates KL on this model

    summary = {model["name"]: model for model in read_results(compact)["models"]}[variant]["agreement"]["kl"]
    exact_summary = {model["name"]: model for model in read_results(full)["models"]}[variant]["agreement"]["kl"]
    assert summary["store"] == "compact" and exact_summary["store"] == "full" and exact_summary["lower"] is None
    assert summary["mean"]["value"] == pytest.approx(exact_summary["mean"]["value"], rel=0.01)
    assert summary["lower"]["value"] <= exact_summary["mean"]["value"] <= summary["upper_mean"]


def test_store_sizes_on_disk(runs):
    compact, full, _ = runs

    def data_bytes(path: Path) -> int:
        return path.stat().st_size - np.load(path, mmap_mode="r").offset  # less the .npy header

    compact_bytes = data_bytes(compact / "reference" / "compact.npy")
    full_bytes = data_bytes(full / "reference" / "logprobs.npy")
    assert compact_bytes == N_ITEMS * COMPACT_ROW_BYTES == N_ITEMS * 1544
    assert full_bytes == N_ITEMS * VOCAB * 4
    assert COMPACT_ROW_BYTES * 50 <= 2 * VOCAB  # at most 1/50 of llama.cpp's uint16 row for the same position
    assert not (full / "reference" / "compact.npy").exists()


def test_changing_the_store_recomputes_and_says_why(runs):
    _, _, stderr = runs
    assert (
        "stored outputs were computed under another setting "
        "(reference_store {'kind': 'compact', 'top_k': 64, 'tail_samples': 128} "
        "-> {'kind': 'full'}): recomputing"
    ) in stderr.replace("\n", "")  # the terminal wraps long lines
    assert "reference (quality): loaded" in stderr


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_a_damaged_store_is_refused_in_one_line_before_any_model_loads(runs, tmp_path, damage):
    compact, _, _ = runs
    out = tmp_path / "run"
    shutil.copytree(compact, out)
    store = out / "reference" / "compact.npy"
    if damage == "truncated":
        with store.open("r+b") as handle:
            handle.truncate(store.stat().st_size // 2)
    else:
        np.save(store, np.zeros((N_ITEMS, VOCAB), np.float32))
    refused = quantcheck(*run_args(out))
    assert refused.returncode == 2, refused.stderr[-2000:]
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in refused.stderr and "loaded" not in refused.stderr
    expected = "cut short or unreadable" if damage == "truncated" else f"holds ({N_ITEMS}, {VOCAB}) rows of float32"
    assert expected in errors[
        0
    ] and f"delete the folder {out / 'reference'} and run the same command again" in refused.stderr.replace("\n", "")
