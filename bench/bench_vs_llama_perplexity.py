"""quantcheck's text-corpus statistics against llama.cpp's own `llama-perplexity --kl-divergence`.

Both run the same GGUF files in llama.cpp (the built-in model converted to F32 as the reference,
quantized to each type) on the same text (`text:builtin`), with the same context, chunks and threads:
1. `quantcheck run --backend llamacpp --quant gguf:TYPE ... --dataset text:builtin --store full`;
2. `llama-perplexity -m F32.gguf --kl-divergence-base BASE`, then `--kl-divergence` per type, on the run's
   corpus.txt (the files quantcheck ran, read from each model's engine.json).
Prints each statistic from both tools and their relative difference (target: mean KL and same-top-1
within 2 %). Differences come from llama.cpp storing the base's log-probabilities as uint16 and from
tokenization (llama.cpp's tokenizer from the GGUF there, the reference's from transformers here).
Usage: python bench/bench_vs_llama_perplexity.py --llama-perplexity PATH [--chunks 16] [--context 512]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

TARGET = 0.02
LLAMA_ROWS = {  # llama-perplexity's line -> (quantcheck's statistic, scale to llama.cpp's unit)
    "Mean PPL(Q)": ("perplexity", 1.0),
    "Mean PPL(Q)/PPL(base)": ("perplexity_ratio", 1.0),
    "Mean    KLD": ("kl.mean", 1.0),
    "Median  KLD": ("kl.median", 1.0),
    "99.0%   KLD": ("kl.99", 1.0),
    "Maximum KLD": ("kl.max", 1.0),
    "RMS Δp    ": ("delta_p.rms", 100.0),
    "Same top p": ("same_top1", 100.0),
}
JUDGED = ("Mean    KLD", "Same top p")


def run(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command[:3])} failed ({result.returncode}): {(result.stderr or result.stdout)[-2000:]}")
    return result.stdout + result.stderr


def llama_statistics(output: str) -> dict[str, float]:
    values = {}
    for label in LLAMA_ROWS:
        match = re.search(re.escape(label) + r"\s*:\s*(-?[\d.]+)", output)
        if match:
            values[label] = float(match.group(1))
    return values


def quantcheck_value(corpus: dict, path: str) -> float:
    head, _, key = path.partition(".")
    value = corpus[head][key] if key else corpus[head]
    return value["value"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-perplexity", required=True, type=Path)
    parser.add_argument("--types", nargs="+", default=["Q8_0", "Q4_K_M"])
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not args.llama_perplexity.exists():
        sys.exit(f"{args.llama_perplexity} does not exist: build it with `make bench` (target $(LLAMA_PERPLEXITY))")

    with tempfile.TemporaryDirectory(prefix="qc-vs-llama-") as scratch:
        out = Path(scratch) / "run"
        run(
            [
                sys.executable,
                "-m",
                "quantcheck.cli",
                "run",
                "--backend",
                "llamacpp",
                "--dataset",
                "text:builtin",
                "--limit",
                str(args.chunks),
                "--context",
                str(args.context),
                "--threads",
                str(args.threads),
                "--store",
                "full",
                "--skip-cost",
                "--quiet",
                "--out",
                str(out),
                *(part for gguf_type in args.types for part in ("--quant", f"gguf:{gguf_type}")),
            ]
        )
        results = json.loads((out / "results.json").read_text())
        files = {model["name"]: model["engine"]["parallel"]["file"] for model in results["models"]}
        corpus, base = out / "corpus.txt", Path(scratch) / "base.kld"
        common = ["-f", str(corpus), "-c", str(args.context), "--chunks", str(args.chunks), "-t", str(args.threads)]
        run([str(args.llama_perplexity), "-m", files["reference"], *common, "--kl-divergence-base", str(base)])
        print(
            "quantcheck vs llama-perplexity --kl-divergence: text:builtin, "
            f"{args.chunks} chunks of {args.context} tokens, "
            f"{args.threads} threads, the same GGUF files (reference F32)"
        )
        print(f"{'type':8} {'statistic':24} {'llama-perplexity':>17} {'quantcheck':>12} {'difference':>11}")
        failed = []
        for model in results["models"][1:]:
            llama = llama_statistics(
                run(
                    [
                        str(args.llama_perplexity),
                        "-m",
                        files[model["name"]],
                        *common,
                        "--kl-divergence-base",
                        str(base),
                        "--kl-divergence",
                    ]
                )
            )
            for label, (path, scale) in LLAMA_ROWS.items():
                if label not in llama:
                    continue
                ours = quantcheck_value(model["corpus"], path) * scale
                difference = ours / llama[label] - 1 if llama[label] else float("nan")
                print(f"{model['name']:8} {label.strip():24} {llama[label]:17.6f} {ours:12.6f} {difference:+11.2%}")
                if label in JUDGED and not abs(difference) <= TARGET:
                    failed.append(f"{model['name']} {label.strip()}")
        print("within 2 % on mean KL and same top p: " + ("yes" if not failed else "NO (" + ", ".join(failed) + ")"))


if __name__ == "__main__":
    main()
