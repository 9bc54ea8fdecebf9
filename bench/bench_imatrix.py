"""quantcheck's importance matrix against llama.cpp's own `llama-imatrix`, on the same text and windows.

quantcheck collects the matrix in transformers (`models/importance.py`: forward hooks on every linear layer's input)
so that `make test` need not compile llama-imatrix; this bench holds it to llama-imatrix's output:
1. the built-in model's F32 GGUF (the cache's, as `gguf:TYPE` makes it) and the default calibration text;
2. `llama-imatrix -m F32.gguf -f TEXT -c SEQ_LEN --chunks SAMPLES` (no BOS is added: the built-in model's GGUF
   says add_bos_token false, as its tokenizer does);
3. quantcheck's collector on the same text, windows and length.
Prints, over every tensor both hold, the largest norm of the difference relative to llama-imatrix's (target: under
1 %), the largest one column's difference relative to the tensor's mean, the lowest correlation, and both tools'
times.
Usage: python bench/bench_imatrix.py --llama-imatrix PATH [--samples 32] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from quantcheck.backends.llamacpp import _collect_importance, _convert, gguf_cache_folder, read_imatrix
from quantcheck.cost.scenario import default_threads
from quantcheck.models.builtin import builtin_model_dir
from quantcheck.models.calibrated import IMATRIX, calibration_text, make_spec
from quantcheck.schema.models import Calibration, MakeSettings

TARGET = 0.01


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-imatrix", required=True, type=Path)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    reference = builtin_model_dir()
    full = gguf_cache_folder(reference) / "F32.gguf"
    if not full.exists():
        full.parent.mkdir(parents=True, exist_ok=True)
        _convert(reference, full)
    make = make_spec(IMATRIX, "default", {}, "bench", Calibration(samples=args.samples, seq_len=args.seq_len))
    with tempfile.TemporaryDirectory() as scratch:
        text = Path(scratch, "calibration.txt")
        text.write_text(calibration_text("default"), encoding="utf-8")
        theirs, ours = Path(scratch, "llama-imatrix.gguf"), Path(scratch, "quantcheck.gguf")
        start = time.perf_counter()
        command = [str(args.llama_imatrix), "-m", str(full), "-f", str(text), "-c", str(args.seq_len)]
        command += ["--chunks", str(args.samples), "-b", str(args.seq_len), "-o", str(theirs), "--no-ppl"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"llama-imatrix failed ({done.returncode}): {done.stderr[-2000:]}")
        llama_seconds = time.perf_counter() - start
        start = time.perf_counter()
        making = MakeSettings(threads=default_threads())
        _collect_importance(reference, full, text.read_text(encoding="utf-8"), make, ours, Path(scratch, "log"), making)
        our_seconds = time.perf_counter() - start
        expected, collected = read_imatrix(theirs), read_imatrix(ours)
    shared = sorted(set(expected) & set(collected))
    worst, element, lowest = 0.0, 0.0, 1.0
    for name in shared:
        a, b = expected[name], collected[name]
        worst = max(worst, float(np.linalg.norm(a - b) / np.linalg.norm(a)))
        element = max(element, float(np.abs(a - b).max() / a.mean()))
        lowest = min(lowest, float(np.corrcoef(a, b)[0, 1]))
    print(f"tensors: {len(shared)} in both, {len(expected)} from llama-imatrix, {len(collected)} from quantcheck")
    print(f"largest |difference| / |llama-imatrix's| over a tensor: {worst:.5f} (target < {TARGET})")
    print(f"largest difference of one column / the tensor's mean: {element:.4f}")
    print(f"lowest correlation: {lowest:.8f}")
    ratio = our_seconds / llama_seconds
    print(f"time: llama-imatrix {llama_seconds:.1f} s, quantcheck {our_seconds:.1f} s (ratio {ratio:.2f})")
    if worst >= TARGET or len(shared) != len(expected):
        sys.exit("the two importance matrices differ beyond the target")


if __name__ == "__main__":
    main()
