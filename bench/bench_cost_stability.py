"""Is the cost measurement stable? Measure the same model as reference and as variant, each round in a fresh process.

The "none" variant loads exactly the reference's weights, so every latency ratio should be 1 up to
measurement noise. The two are timed in rounds in turn (reference, none, reference, none)
and merged as a run merges them (each point from its fastest round), so an order effect
cancels. Acceptance: the variant's median within 0.8-1.25x of the reference at every batch size.
Each child runs the full default cost measurement (`CostSettings.for_device`), so this also prints
how long one model's cost takes.

    .venv/bin/python bench/bench_cost_stability.py [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

LOW, HIGH = 0.8, 1.25


def child(method: str, device: str, threads: int | None) -> None:
    """Measure one model in this (fresh) process and print its ModelCost as JSON on the last line."""
    from quantcheck.backends.hf import HFBackend
    from quantcheck.cost.scenario import CostSettings, measure_cost
    from quantcheck.data.load import load_dataset
    from quantcheck.models.builtin import builtin_model_dir
    from quantcheck.models.loading import default_dtype
    from quantcheck.schema.jobs import JobSpec
    from quantcheck.schema.models import ModelSpec

    texts = [item.question for item in load_dataset().items]
    settings = CostSettings.for_device(device)
    if threads is not None:
        settings = settings.model_copy(update={"threads": threads})
    spec = ModelSpec(name=method, role="variant", backend="hf", method=method, weights=str(builtin_model_dir()))
    job = JobSpec(
        kind="cost",
        run_dir="unused",
        model=spec,
        device=device,
        dtype=default_dtype(device),
        threads=settings.threads,
        seed=0,
        batch_size=1,
    )
    begin = time.perf_counter()
    cost = measure_cost(HFBackend(job), texts, settings)
    print(json.dumps({"seconds": time.perf_counter() - begin, "cost": cost.model_dump()}))


def run_child(method: str, device: str, threads: int | None) -> dict:
    command = [sys.executable, __file__, "--child", method, "--device", device]
    if threads is not None:
        command += ["--threads", str(threads)]
    from quantcheck.orchestration.launcher import worker_environment

    done = subprocess.run(command, capture_output=True, text=True, check=False, env=worker_environment())
    if done.returncode != 0:
        sys.exit(f"{method} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _loads(runs: list[dict], point: dict) -> str:
    """Each round's median at this point's batch size and the CPU others took meanwhile (a star: disturbed)."""
    rounds = [p for run in runs for p in run["cost"]["latency"] if p["batch_size"] == point["batch_size"]]
    return ", ".join(
        f"{p['median_s'] * 1000:.0f} ({p['other_cpu_load']:.2f}{'*' if p['disturbed'] else ''})" for p in rounds
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="default: the settings' default")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        child(args.child, args.device, args.threads)
        return
    from quantcheck.analysis.summarize import merge_cost_rounds
    from quantcheck.schema.results import ModelCost

    rounds: dict[str, list[dict]] = {"reference": [], "none": []}
    for name in ("reference", "none", "reference", "none"):  # ABAB, as a run times its models
        rounds[name].append(run_child("none", args.device, args.threads))  # the reference recipe is what "none" runs
    ref_cost, var_cost = (
        merge_cost_rounds([ModelCost.model_validate(r["cost"]) for r in rounds[name]]).model_dump()
        for name in ("reference", "none")
    )
    seconds = {name: ", ".join(f"{r['seconds']:.1f}" for r in runs) for name, runs in rounds.items()}
    print(
        f"device {args.device}, threads {ref_cost['threads']}, memory {ref_cost['memory_method']}, 2 rounds each (ABAB)"
    )
    print(f"whole cost measurement per model and round: reference {seconds['reference']} s, none {seconds['none']} s")
    print(
        f"{'batch':>5} {'seq':>4} {'ref median s':>12} {'none median s':>13} "
        f"{'ratio':>6} {'ref cv':>6} {'none cv':>7}  within"
        "  per round: median ms (others' CPU in cores), ref / none"
    )
    accepted = True
    for ref, var in zip(ref_cost["latency"], var_cost["latency"]):
        if ref["status"] != "ok" or var["status"] != "ok":
            print(f"{ref['batch_size']:>5} status {ref['status']} / {var['status']}")
            accepted = False
            continue
        ratio = var["median_s"] / ref["median_s"]
        within = LOW <= ratio <= HIGH
        accepted &= within
        print(
            f"{ref['batch_size']:>5} {ref['seq_len']:>4} {ref['median_s']:>12.4f} {var['median_s']:>13.4f} "
            f"{ratio:>6.3f} {ref['cv']:>6.3f} {var['cv']:>7.3f}  {'yes' if within else 'NO ':<6}  "
            f"{_loads(rounds['reference'], ref)} / "
            f"{_loads(rounds['none'], var)}"
        )
    for name, cost in (("reference", ref_cost), ("none", var_cost)):
        generation = cost["generation"] or {}
        print(
            f"{name}: load {cost['load_time_s']:.2f} s, load peak {cost['load_peak_memory_bytes'] / 2**20:.0f} MiB, "
            f"weights {cost['weights']['counted_bytes'] / 2**20:.1f} MiB, "
            f"decode {generation.get('decode_tokens_per_s', float('nan')):.1f} tok/s"
        )
    print(f"acceptance (every ratio in {LOW}-{HIGH}x): {'PASS' if accepted else 'FAIL'}")
    sys.exit(0 if accepted else 1)


if __name__ == "__main__":
    main()
