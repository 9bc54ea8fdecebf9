"""`make gpu-check`: the CUDA paths of the hf and vLLM backends in one prepared run of at most 8 minutes.

Without a CUDA GPU it says so and exits 0. With one it runs, on the built-in model:
1. hf on CUDA: bf16 reference against bnb-nf4-dq (bf16 compute) and torchao-int8wo, every phase, 32 questions
   (synchronized CUDA timing, max_memory_allocated peaks, the memory cap);
2. vLLM on CUDA, when an interpreter with vLLM is found: a vLLM bf16 reference against vllm:fp8 and
   vllm:bitsandbytes, every phase, 32 questions;
3. the backend-pass benchmark on CUDA (vLLM/transformers ratio).
Each step is bounded in time; a failing step is printed and the next one runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET_S = 8 * 60
COMMON = [
    "--device",
    "cuda",
    "--limit",
    "32",
    "--cost-rounds",
    "1",
    "--batch-sizes",
    "1,8,32",
    "--time-budget",
    "5",
    "--quiet",
]


def _step(title: str, command: list[str], deadline: float) -> subprocess.CompletedProcess | None:
    left = deadline - time.monotonic()
    print(f"\n== {title}", flush=True)
    if left < 30:
        print("skipped: the 8-minute budget is spent")
        return None
    start = time.monotonic()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=left)
    except subprocess.TimeoutExpired:
        print(f"stopped after {left:.0f} s (budget)")
        return None
    print(f"exit {result.returncode} after {time.monotonic() - start:.0f} s")
    if result.returncode != 0:
        print(result.stderr[-2000:])
    return result


def _summary(run_dir: Path) -> None:
    results = json.loads((run_dir / "results.json").read_text())
    for model in results["models"]:
        cost = model.get("cost") or {}
        latency = {point["batch_size"]: point.get("median_s") for point in cost.get("latency", [])}
        agreement = model.get("agreement") or {}
        print(
            f"  {model['name']:<24} engine {(model.get('engine') or {}).get('engine')} "
            f"{(model.get('engine') or {}).get('compute_dtype')}"
            f"  weights {cost.get('weights', {}).get('counted_bytes')}  memory {cost.get('memory_method')}"
            f"  latency {latency}  decode tok/s {(cost.get('generation') or {}).get('decode_tokens_per_s')}"
            f"  KL {((agreement.get('kl') or {}).get('mean') or {}).get('value')}"
            f"  verdict {(model.get('verdict') or {}).get('decision')}"
        )


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU visible to torch here: nothing to check (the CUDA paths need a GPU machine)")
        return 0
    print(f"gpu-check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    deadline = time.monotonic() + BUDGET_S
    cli = [sys.executable, "-m", "quantcheck.cli", "run"]
    with tempfile.TemporaryDirectory() as folder:
        hf_dir = Path(folder) / "hf"
        if (
            result := _step(
                "hf backend on CUDA",
                [*cli, "--quant", "bnb-nf4-dq", "--quant", "torchao-int8wo", "--out", str(hf_dir), *COMMON],
                deadline,
            )
        ) and result.returncode == 0:
            _summary(hf_dir)
        from quantcheck.backends import get_backend
        from quantcheck.errors import QuantcheckError

        try:
            get_backend("vllm").interpreter()
        except QuantcheckError as error:
            print(f"\n== vLLM backend on CUDA\nskipped: {error}")
            return 0
        vllm_dir = Path(folder) / "vllm"
        vllm_run = [
            *cli,
            "--backend",
            "vllm",
            "--quant",
            "vllm:fp8",
            "--quant",
            "vllm:bitsandbytes",
            "--out",
            str(vllm_dir),
            *COMMON,
            "--enforce-eager",
            "--gpu-memory-utilization",
            "0.4",
        ]
        if (result := _step("vLLM backend on CUDA", vllm_run, deadline)) and result.returncode == 0:
            _summary(vllm_dir)
        if result := _step(
            "backend pass benchmark on CUDA",
            [sys.executable, str(Path(__file__).with_name("bench_backend_pass.py")), "--device", "cuda"],
            deadline,
        ):
            print(result.stdout[-1500:])
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
