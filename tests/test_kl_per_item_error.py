"""Defect 7 of issue #24: compact-store KL is unbiased on average, but one item's value can be far off, and
items.jsonl and the report's worst list showed it as if exact. Each item's estimate now carries its own standard
error (`kl_se`) next to its bounds, and the worst list says that its values and its order are estimated."""

from __future__ import annotations

import json

import numpy as np
import torch

from quantcheck.analysis import format as fmt
from quantcheck.analysis.corpus import SpanText, worst_spans
from quantcheck.data.items import Item
from quantcheck.metrics.next_token import kl_divergence, kl_from_top_k
from quantcheck.report import table
from quantcheck.schema.results import CorpusStatistics, Estimate, ItemRecord, WindowRecord
from quantcheck.scoring.loglik import EncodedItems, score_items
from quantcheck.storage.store import CompactStore, FullStore
from report_fixture import build_results
from test_compact_kl import VOCAB, compact, rows

N = 64


def score(store, reference: torch.Tensor, variant: torch.Tensor) -> list[ItemRecord]:
    """The reference then the variant through `score_items`, one constructed row per question (no model)."""
    items = tuple(
        Item(item_id=f"q{row}", subject="s", question="?", choices=("a", "b", "c", "d"), answer=0) for row in range(N)
    )
    encoded = EncodedItems(prompt_ids=[[row] for row in range(N)], continuation_ids=[0, 1, 2, 3])
    store.create(N, VOCAB)
    records: list[ItemRecord] = []
    for rows_of, is_reference in ((reference, True), (variant, False)):
        score_items(
            lambda prompts, rows_of=rows_of: rows_of[[prompt[0] for prompt in prompts]].numpy(),
            "m",
            items,
            encoded,
            batch_size=16,
            reference=store,
            is_reference=is_reference,
            compare_tokens=True,
            done=set(),
            on_batch=records.extend if not is_reference else lambda batch: None,
        )
    return sorted(records, key=lambda record: int(record.item_id[1:]))


def test_each_item_in_items_jsonl_carries_the_standard_error_of_its_estimate(tmp_path):
    reference, variant = rows(N, 1.0, 0.3, seed=4)  # flat rows: the lower bound is about 12 % of the exact KL
    exact = kl_divergence(reference, variant).numpy()
    records = score(CompactStore(tmp_path / "compact", 64, 128), reference, variant)
    lines = [json.loads(record.model_dump_json()) for record in records]  # as items.jsonl holds them
    se = np.array([line["kl_se"] for line in lines], dtype=float)
    kl = np.array([line["kl"] for line in lines])
    assert (se > 0).all()
    assert np.mean(np.abs(kl - exact) <= 3 * se) >= 0.95
    assert np.median(se / exact) < 0.2
    assert all(line["kl_lower"] <= line["kl"] <= line["kl_upper"] for line in lines)
    full = score(FullStore(tmp_path / "full"), reference, variant)
    assert all(record.kl_se is None for record in full)  # exact: no sampling error to state


def windows(count: int, tokens: int) -> list[WindowRecord]:
    """Per-token KL of `count` sequences from the compact store, as the corpus path records it."""
    records = []
    for window in range(count):
        reference, variant = rows(tokens, 1.0, 0.2 + 0.05 * window, seed=window)
        bounds = kl_from_top_k(*compact(reference, 64, 128), variant)
        records.append(
            WindowRecord(
                window=window,
                model="v",
                nll=[1.0] * tokens,
                kl=bounds.estimate.tolist(),
                kl_lower=bounds.lower.tolist(),
                kl_upper=bounds.upper.tolist(),
                kl_se=bounds.se.tolist(),
                top1_agree=[True] * tokens,
                jaccard={1: 1.0},
            )
        )
    return records


def test_the_worst_spans_carry_the_standard_errors_of_their_values_and_the_worst_tokens_bounds():
    records = windows(3, 16)
    spans = worst_spans(
        records, SpanText(names=[f"window {i}" for i in range(3)], token_texts=[[f"t{j}" for j in range(16)]] * 3)
    )
    for span in spans:
        record = records[span.sequence]
        assert (
            span.mean_kl_se == np.sqrt(np.sum(np.square(record.kl_se))) / 16
        )  # the tokens' own draws: independent errors
        assert span.worst_kl_se == record.kl_se[span.worst_position] > 0
        assert span.worst_kl_lower <= span.worst_kl <= span.worst_kl_upper


def test_the_reports_worst_list_says_its_values_and_order_are_estimated():
    results, _ = build_results()
    variant = next(m for m in results.models if m.agreement is not None)
    records = windows(3, 16)
    spans = worst_spans(
        records, SpanText(names=[f"window {i}" for i in range(3)], token_texts=[[f"t{j}" for j in range(16)]] * 3)
    )
    variant.corpus = CorpusStatistics(windows=3, context=32, tokens=48, perplexity=Estimate(value=10.0), worst=spans)
    columns, worst, notes = table.worst_columns(results), table.worst_rows(results), table.worst_notes(results)
    assert "Mean KL (estimated \u00b1 s.e.)" in columns
    mean_cell = worst[0].cells[columns.index("Mean KL (estimated \u00b1 s.e.)") - 2]
    assert mean_cell == f"{fmt.nats(spans[0].mean_kl)} \u00b1 {fmt.nats(spans[0].mean_kl_se)}"
    assert all("\u00b1" in row.cells[3] and "[" in row.cells[3] for row in worst)
    assert any("estimated" in note and "--store full" in note for note in notes)
    for span in spans:  # the full store: exact values, labelled as before
        span.mean_kl_se = span.worst_kl_se = span.worst_kl_lower = span.worst_kl_upper = None
    assert "Mean KL" in table.worst_columns(results) and not any(
        "estimated" in note for note in table.worst_notes(results)
    )
