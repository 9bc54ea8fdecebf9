"""Two run folders of the same command, made by two versions of quantcheck: equal on every quality field?

    python bench/compare_run_folders.py RUN_BEFORE RUN_AFTER

Compares, exactly (CPU runs are bit-reproducible): results.json (every model's answers, accuracies, log-likelihoods,
KL, Jaccard, top-1, item metrics, intervals, paired statistics, floors, engine floors, verdict decisions and checks),
every model's quality.jsonl, generation.jsonl, corpus.jsonl and answers.jsonl (a prompts run's own answers) record
by record, items.jsonl, and every file of the reference folder (its store, token ids, scored spans and answers).
What moves from run to run is listed in VOLATILE and left out; the script prints what it left out and every
difference it found, and exits 1 when there is one.
"""

from __future__ import annotations

import fnmatch
import json
import re
import sys
from pathlib import Path

VOLATILE = (
    "created_at",
    "tool_version",
    "environment",
    "config.out",
    "models.*.cost",
    "models.*.cost_vs_reference",
    "models.*.generative.words_per_minute",
    "models.*.generative.tokens_per_second",
    "models.*.generative.decode_words_per_minute",
    "models.*.verdict.summary",
    "recommendation.standings.*.speed",
    "*.seconds",
)
"""Paths (dots, `*` for any one key or index) whose values are timings, memory peaks, disturbance flags, or sentences
made from them."""
TIMING_WORDS = re.compile(r"latenc|timing|speed|faster|slower|tok/s|words/min|decode|disturb|busy|CPU load|peak", re.I)
"""A verdict reason or a warning that says one of these is made from a timing or a memory peak (a peak, unlike the
weight bytes, moves with the allocator)."""
RECORD_FILES = ("quality.jsonl", "generation.jsonl", "corpus.jsonl", "answers.jsonl")


def _volatile(path: str) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, f"{pattern}.*") for pattern in VOLATILE)


def _steady(items: list[object], path: str) -> list[object]:
    """Reasons and warnings without the ones made from timings."""
    if path.endswith("verdict.reasons"):
        return [reason for reason in items if not TIMING_WORDS.search(str(reason))]
    if path == "warnings":
        return [warning for warning in items if not TIMING_WORDS.search(json.dumps(warning))]
    return items


def differences(before: object, after: object, path: str = "") -> list[str]:
    if _volatile(path):
        return []
    if isinstance(before, dict) and isinstance(after, dict):
        found = []
        for key in sorted(set(before) | set(after), key=str):
            child = f"{path}.{key}" if path else str(key)
            if key not in before or key not in after:
                if not _volatile(child):
                    found.append(f"{child}: only in {'after' if key not in before else 'before'}")
                continue
            found += differences(before[key], after[key], child)
        return found
    if isinstance(before, list) and isinstance(after, list):
        before, after = _steady(before, path), _steady(after, path)
        if len(before) != len(after):
            return [f"{path}: {len(before)} entries before, {len(after)} after"]
        return [
            line
            for index, (one, two) in enumerate(zip(before, after))
            for line in differences(one, two, f"{path}.{index}")
        ]
    return [] if before == after else [f"{path}: {before!r} before, {after!r} after"]


def _records(path: Path) -> list[object]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def compare(before: Path, after: Path) -> list[str]:
    found = differences(
        json.loads((before / "results.json").read_text()), json.loads((after / "results.json").read_text())
    )
    for model in sorted(path.name for path in (before / "models").iterdir()):
        for name in RECORD_FILES:
            found += differences(
                _records(before / "models" / model / name),
                _records(after / "models" / model / name),
                f"models/{model}/{name}",
            )
    found += differences(_records(before / "items.jsonl"), _records(after / "items.jsonl"), "items.jsonl")
    for stored in sorted(path.name for path in (before / "reference").glob("*")):
        if (before / "reference" / stored).read_bytes() != (after / "reference" / stored).read_bytes():
            found.append(f"reference/{stored}: the bytes differ")
    return found


def main() -> int:
    before, after = (Path(arg) for arg in sys.argv[1:3])
    print(f"left out as run-to-run: {', '.join(VOLATILE)}; reasons and warnings matching {TIMING_WORDS.pattern!r}")
    found = compare(before, after)
    results = json.loads((after / "results.json").read_text())
    decisions = {model["name"]: model["verdict"]["decision"] for model in results["models"] if model.get("verdict")}
    print(f"verdicts after: {decisions}")
    for line in found:
        print("DIFFERENT", line)
    print(f"{len(found)} differences in quality fields between {before} and {after}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
