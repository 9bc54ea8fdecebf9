"""The compact reference store on disk: its size per position, its rows, and refusing a file that is not its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from quantcheck.errors import ResultsFolderError
from quantcheck.metrics.next_token import kl_from_top_k, top_k_ids
from quantcheck.storage.store import CompactStore, FullStore, StoreSettings
from test_compact_kl import VOCAB, compact, rows

LLAMA_CPP_BYTES_PER_TOKEN = 2  # llama.cpp's --kl-divergence-base file: uint16 per vocabulary entry


def test_store_sizes_per_position():
    settings = StoreSettings()
    store = CompactStore(Path("."), settings.top_k, settings.tail_samples)
    assert store.bytes_per_row(49_152) == store.bytes_per_row(128_256) == 64 * (4 + 4) + 8 + 128 * (4 + 4) == 1544
    assert store.bytes_per_row(49_152) * 50 <= LLAMA_CPP_BYTES_PER_TOKEN * 49_152
    assert FullStore(Path(".")).bytes_per_row(49_152) == 4 * 49_152


def test_compact_rows_round_trip_through_the_file(tmp_path):
    from quantcheck.scoring.loglik import reference_rows

    reference, variant = rows(5, 3.0, 0.3)
    store = CompactStore(tmp_path, 64, 128)
    assert store.create(5, VOCAB) is True and store.create(5, VOCAB) is False
    store.write_rows([0, 1, 2, 3, 4], reference_rows(store, [0, 1, 2, 3, 4], reference))
    assert store.path.stat().st_size - 128 <= 5 * 1544 + 128  # the .npy header is at most 128 bytes more
    stored = store.read_rows([3, 1])
    assert stored["top_ids"].tolist() == top_k_ids(reference[[3, 1]], 64).tolist()
    field = lambda name: torch.from_numpy(stored[name])  # noqa: E731
    from_file = kl_from_top_k(
        field("top_ids").long(),
        field("top_logprobs"),
        field("log_tail_mass"),
        field("sample_ids").long(),
        field("sample_logprobs"),
        variant[[3, 1]],
    )
    in_memory = kl_from_top_k(*(part[[3, 1]] for part in compact(reference, 64, 128)), variant[[3, 1]])
    assert from_file.estimate.tolist() == in_memory.estimate.tolist()


def test_a_cut_short_or_foreign_store_is_refused_with_what_to_do(tmp_path):
    store = CompactStore(tmp_path, 64, 128)
    store.create(10, VOCAB)
    store.check(10)
    with store.path.open("r+b") as handle:
        handle.truncate(store.path.stat().st_size - 100)
    with pytest.raises(
        ResultsFolderError, match=r"cut short or unreadable\): delete the folder .* run the same command again"
    ):
        store.check(10)
    with pytest.raises(ResultsFolderError, match="cut short"):
        store.create(10, VOCAB)
    np.save(store.path, np.zeros((10, VOCAB), np.float32))  # a full store's rows where the compact one belongs
    with pytest.raises(
        ResultsFolderError,
        match=r"holds \(10, 4096\) rows of float32; this run needs 10 rows of top 64 \+ 128 tail samples",
    ):
        store.check(10)
    other = CompactStore(tmp_path / "other", 32, 128)
    other.create(10, VOCAB)
    with pytest.raises(ResultsFolderError, match="not this run's compact reference store"):
        CompactStore(tmp_path / "other", 64, 128).check(10)
    with pytest.raises(ResultsFolderError, match="this run needs 12 rows"):
        other.check(12)
