"""Cost rounds merged and compared, on constructed round timings where the right answer is known, and the CPU that
others take, read from real processes (the merging code and `cost/contention.py` directly, not through a whole run,
whose timings the suite's own second worker disturbs)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from quantcheck.analysis.summarize import cost_comparison, merge_cost_rounds
from quantcheck.cost import contention
from quantcheck.schema.results import DRIFT_TOLERANCE, GenerationCost, LatencyPoint, ModelCost, WeightMemory

WEIGHTS = WeightMemory(
    counted_bytes=1000, footprint_bytes=None, parameters=500, bits_per_parameter=16.0, footprint_agrees=False
)


def point(batch_size: int, median: float, disturbed: bool) -> LatencyPoint:
    times = [median * factor for factor in (0.98, 1.0, 1.02)]
    return LatencyPoint(
        batch_size=batch_size,
        seq_len=16,
        status="ok",
        iterations=3,
        median_s=median,
        times_s=times,
        disturbed=disturbed,
        other_cpu_load=1.0 if disturbed else 0.0,
    )


def generation(rate: float, disturbed: bool) -> GenerationCost:
    return GenerationCost(
        prompts=2,
        new_tokens=16,
        prefill_s=0.1,
        time_to_first_token_s=0.1,
        decode_tokens_per_s=rate,
        tokens_per_s=rate,
        decode_times_s=[15 / rate, 15 / rate],
        decode_tokens=[15, 15],
        disturbed=disturbed,
    )


def cost_round(medians: dict[int, tuple[float, bool]], rate: tuple[float, bool], weights: int = 1000) -> ModelCost:
    return ModelCost(
        memory_method="test",
        threads=2,
        load_time_s=1.0,
        load_peak_memory_bytes=None,
        weights=WEIGHTS.model_copy(update={"counted_bytes": weights}),
        latency=[point(size, median, hit) for size, (median, hit) in medians.items()],
        generation=generation(*rate),
    )


def test_a_round_that_others_disturbed_is_left_out_of_the_ratio():
    """The load hit only the variant's first round (twice as slow there): the ratio comes from its second round and
    is 1.0; taking the slower or the disturbed round would say 2x slower."""
    reference = merge_cost_rounds(
        [cost_round({1: (1.0, False)}, (10.0, False)), cost_round({1: (1.02, False)}, (9.9, False))]
    )
    variant = merge_cost_rounds(
        [
            cost_round({1: (2.0, True)}, (5.0, True), weights=500),
            cost_round({1: (1.0, False)}, (10.0, False), weights=500),
        ]
    )
    merged = variant.latency[0]
    assert (merged.median_s, merged.disturbed) == (1.0, False)
    assert merged.round_medians_s == [2.0, 1.0] and merged.round_disturbed == [
        True,
        False,
    ]  # every round kept, in order
    comparison = cost_comparison(reference, variant)
    assert comparison.latency_ratio == {1: pytest.approx(1.0)}
    assert comparison.decode_speedup == pytest.approx(1.0)
    assert comparison.unstable_batch_sizes == [] and not comparison.decode_unstable
    assert comparison.memory_saving == pytest.approx(0.5)
    assert comparison.latency_ratio_ci[1].low <= 1.0 <= comparison.latency_ratio_ci[1].high


def test_undisturbed_rounds_that_moved_beyond_the_tolerance_are_unstable_and_the_fastest_counts():
    """Nothing measured others' load, yet the reference's two rounds differ by 1.5x: that batch size is not called
    faster or slower; the steady one is, with the fastest round's median."""
    reference = merge_cost_rounds(
        [
            cost_round({1: (1.0, False), 4: (2.0, False)}, (10.0, False)),
            cost_round({1: (1.5, False), 4: (2.02, False)}, (10.0, False)),
        ]
    )
    variant = merge_cost_rounds(
        [
            cost_round({1: (0.5, False), 4: (1.0, False)}, (20.0, False)),
            cost_round({1: (0.51, False), 4: (1.01, False)}, (20.2, False)),
        ]
    )
    comparison = cost_comparison(reference, variant)
    assert 1.5 > DRIFT_TOLERANCE
    assert comparison.unstable_batch_sizes == [1]
    assert comparison.latency_ratio == {1: pytest.approx(0.5), 4: pytest.approx(0.5)}
    assert comparison.decode_speedup == pytest.approx(20.2 / 10.0)
    assert comparison.latency_round_spread[1] == pytest.approx(1.5)


def test_disturbed_in_every_round_is_unstable_whatever_the_ratio():
    reference = merge_cost_rounds(
        [cost_round({1: (1.0, False)}, (10.0, False)), cost_round({1: (1.0, False)}, (10.0, False))]
    )
    variant = merge_cost_rounds([cost_round({1: (1.3, True)}, (8.0, True)), cost_round({1: (1.2, True)}, (7.0, True))])
    assert variant.latency[0].disturbed and variant.latency[0].median_s == 1.2  # the fastest of the disturbed
    assert variant.generation.decode_tokens_per_s == 8.0 and variant.generation.disturbed
    comparison = cost_comparison(reference, variant)
    assert comparison.unstable_batch_sizes == [1] and comparison.decode_unstable


BUSY = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass"


def test_a_process_outside_the_run_counts_as_others_and_a_child_of_the_run_does_not():
    """A busy process that is not this process's descendant (started through a shell that exits at once) is what
    others take; a busy child is this run's own CPU, counted in the process tree."""
    seconds = 1.5
    with contention.other_load() as outside:
        subprocess.run(["sh", "-c", f"{sys.executable} -c '{BUSY.format(seconds=seconds)}' &"], check=True)
        time.sleep(seconds)
    assert outside.cores is not None and outside.cores > 0.3, outside.cores

    before = contention._tree_cpu_seconds()
    child = subprocess.Popen([sys.executable, "-c", BUSY.format(seconds=seconds)])
    time.sleep(seconds - 0.3)
    during = contention._tree_cpu_seconds()
    child.wait()
    assert child.pid in during and child.pid not in before
    assert during[child.pid] > 0.3 * (seconds - 0.3), during[child.pid]
