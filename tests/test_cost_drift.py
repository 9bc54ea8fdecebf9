"""Load on the machine during the cost phase must not make the identity variant look faster or slower."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import SMALL_COST, read_results
from test_resume import start

BUSY_SECONDS_AT_MOST = 300
BUSY = f"import time\nend = time.monotonic() + {BUSY_SECONDS_AT_MOST}\nwhile time.monotonic() < end: pass"


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def test_load_spanning_both_of_the_variants_cost_rounds_makes_every_batch_size_unstable_in_abab_order(tmp_path):
    """The load starts with the variant's first cost round and ends with its second, the case that once made an
    identical variant look 1.4x slower: the rounds must put the reference between them, and the drift check see it."""
    out = tmp_path / "run"
    cost = [arg if arg != "1,2" else "1,4" for arg in SMALL_COST]
    run = start(["run", "--quant", "none", "--limit", "4", "--skip-quality", "--out", str(out), *cost])
    variant = out / "models" / "none"
    wait_for(variant / "cost.log", run)  # the variant's first cost round has started
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(os.cpu_count() or 2)]
    try:
        wait_for(variant / "cost-round2.json", run)  # ... and its second one finished, all under load
    finally:
        for process in busy:
            process.send_signal(signal.SIGTERM)
            process.wait()
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr[-3000:]
    results = read_results(out)
    none = next(model for model in results["models"] if model["name"] == "none")
    rounds = {point["batch_size"]: point["round_medians_s"] for point in none["cost"]["latency"]}
    assert all(len(medians) == 2 for medians in rounds.values())
    # The busy processes took measurable CPU in both of the variant's rounds, at every batch size.
    assert all(point["round_disturbed"] == [True, True] for point in none["cost"]["latency"]), none["cost"]["latency"]
    comparison = none["cost_vs_reference"]
    assert set(comparison["latency_ratio"]) == {"1", "4"}
    # Disturbed in every round, so every batch size is unstable: never called faster or slower, whatever its ratio.
    assert comparison["unstable_batch_sizes"] == [1, 4], (comparison, rounds)
    # ABAB: the reference's second round runs after the variant's first, so load that spans the variant's rounds
    # reaches the reference's second round too (a broken order would run a model's two rounds back to back).
    finished = [
        out / "models" / model / name for name in ("cost.json", "cost-round2.json") for model in ("reference", "none")
    ]
    times = [path.stat().st_mtime for path in finished]
    assert times == sorted(times), dict(zip(map(str, finished), times))
    notes = " ".join(none["verdict"]["reasons"])
    assert "not called faster or slower there" in notes, notes
    # Generation was timed under the same load in both rounds: its rate is flagged, not called faster or slower.
    assert none["cost"]["generation"]["round_disturbed"] == [True, True]
    assert comparison["decode_unstable"] and "decode rate was disturbed by other load" in notes, notes
