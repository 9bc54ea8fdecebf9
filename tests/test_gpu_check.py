"""The offline GPU check (bench/gpu_check.py): its bundle fits in 64 MiB, and its dry run walks every step on CPU
from that bundle alone, in a simulated image that lacks what the GPU host lacks."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


gpu_check = _module()


def _check(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *arguments], capture_output=True, text=True, env=OFFLINE, timeout=600
    )


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("gpu") / "bundle"
    made = _check("bundle", str(folder))
    assert made.returncode == 0, made.stderr[-2000:]
    return folder, made.stdout


@pytest.fixture(scope="module")
def dry_run(bundle, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu") / "out"
    return out, _check("--bundle", str(bundle[0]), "--out", str(out), "--dry-run")


def test_the_bundle_is_at_most_64_mib_and_holds_the_wheels_the_image_lacks_at_the_versions_tested_here(bundle):
    folder, printed = bundle
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    assert size <= 64 * 2**20
    assert re.search(r"([\d.]+) MiB of the 64 MiB", printed).group(1) == f"{size / 2**20:.1f}"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert f"bitsandbytes=={metadata.version('bitsandbytes')}" in manifest["requirements"]
    assert f"pydantic-core=={metadata.version('pydantic-core')}" in manifest["requirements"]
    wheels = {path.name for path in (folder / "wheels").iterdir()}
    assert any(name.startswith("pydantic_core-") and "-cp312-" in name for name in wheels)  # the GPU host's python
    assert any(name.startswith("quantcheck-") for name in wheels)
    assert not any(name.startswith(("torch-", "transformers-", "numpy-")) for name in wheels)  # the image has them
    assert (folder / "model" / "tokenizer.json").exists() and not list((folder / "model").glob("*.safetensors"))


def test_the_dry_run_walks_every_step_from_the_bundle_alone(dry_run, bundle):
    out, result = dry_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "== installed quantcheck, pydantic, bitsandbytes, torchao from the bundle" in result.stdout
    results = json.loads((out / "hf" / "results.json").read_text())
    libraries = results["environment"]["libraries"]
    # The simulated image hides what the host lacks: quanto and HQQ are installed here but not there.
    assert libraries["optimum-quanto"] is None and libraries["hqq"] is None
    assert libraries["bitsandbytes"] == metadata.version("bitsandbytes")
    models = {model["name"]: model for model in results["models"]}
    assert list(models) == ["reference", "bnb-nf4-dq", "torchao-int8wo"]
    assert models["reference"]["precision"]["compute_dtype"] == "bfloat16"
    for model in models.values():
        assert model["loglik"]["n"] == gpu_check.DRY_SIZES.questions
        assert model["generative"]["accuracy"]["n"] == gpu_check.DRY_SIZES.questions
        points = [(point["batch_size"], point["status"]) for point in model["cost"]["latency"]]
        assert points == [(1, "ok"), (4, "ok")]
        assert model["cost"]["generation"]["decode_tokens_per_s"] > 0
    assert results["config"]["cost_settings"]["max_memory_bytes"] == gpu_check.DRY_SIZES.memory_cap_gb * 2**30
    assert 0.3 < models["bnb-nf4-dq"]["cost_vs_reference"]["weight_memory_ratio"] < 0.5
    table = (out / "table.txt").read_text()
    assert f"{models['bnb-nf4-dq']['cost_vs_reference']['weight_memory_ratio']:.3f}" in table
    # Both floor runs ran on CPU here, so the device floor is exactly nothing: the same rows, the same answers.
    rows = [(out / f"floor-{where}" / "reference" / "logprobs.npy").read_bytes() for where in ("cuda", "cpu")]
    assert rows[0] == rows[1]
    questions = gpu_check.DRY_SIZES.questions
    assert "CPU against CPU: a dry run" in table
    assert f"mean KL 0 (max 0), same top token 1.000, same answer {questions}/{questions}" in table


def test_the_drawn_weights_depend_on_the_seed_only(bundle):
    first, again, other = (gpu_check.draw_model(bundle[0] / "model", seed) for seed in (0, 0, 1))
    pairs = zip(first.state_dict().values(), again.state_dict().values(), other.state_dict().values())
    assert all(torch.equal(a, b) for a, b, _ in pairs)
    embedding = "model.embed_tokens.weight"
    assert not torch.equal(first.state_dict()[embedding], other.state_dict()[embedding])


def test_a_bundle_missing_a_wheel_fails_the_dry_run_in_one_line_before_any_run(bundle, tmp_path):
    broken = tmp_path / "bundle"
    shutil.copytree(bundle[0], broken)
    for wheel in (broken / "wheels").glob("pydantic_core-*"):
        wheel.unlink()
    result = _check("--bundle", str(broken), "--out", str(tmp_path / "out"), "--dry-run")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("gpu_check: `pip install` failed")
    assert "Traceback" not in result.stderr and not (tmp_path / "out" / "hf").exists()


def test_without_a_gpu_or_a_bundle_it_says_what_to_do(tmp_path, bundle):
    assert _check("--bundle", str(tmp_path)).stdout.startswith(f"gpu_check: {tmp_path} is not a bundle")
    if not torch.cuda.is_available():
        result = _check("--bundle", str(bundle[0]), "--out", str(tmp_path / "out"))
        assert result.returncode == 2 and "pass --dry-run" in result.stdout


def test_without_pip_the_same_wheels_are_unpacked_each_for_this_python(bundle, tmp_path):
    manifest = json.loads((bundle[0] / "manifest.json").read_text())
    gpu_check.unpack(bundle[0] / "wheels", manifest["requirements"], tmp_path / "site")
    probe = "import pydantic_core, torchao, quantcheck.cli; print(pydantic_core.__file__, torchao.__file__)"
    result = subprocess.run(
        [sys.executable, "-c", probe],
        env={**OFFLINE, "PYTHONPATH": str(tmp_path / "site")},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-1500:]
    assert all(Path(place).is_relative_to(tmp_path / "site") for place in result.stdout.split())
    here = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert list((tmp_path / "site").glob(f"pydantic_core/_pydantic_core.{here.replace('cp', 'cpython-')}*.so"))
