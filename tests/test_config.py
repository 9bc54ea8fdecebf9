"""Config files and `compare()` keywords: one layout, validated once, each mistake one line naming its key.

No model runs here: every case fails (or is checked) before anything loads.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import typer
from pydantic import BaseModel

from conftest import quantcheck
from quantcheck.backends.vllm import VllmSettings
from quantcheck.cli import CONFIG_KEYS, NOT_IN_CONFIG, app
from quantcheck.config import RunConfig, key_path, parse_config, read_config, resolved_toml, tomllib
from quantcheck.errors import QuantcheckError
from quantcheck.schema.models import Calibration
from test_cli_errors import assert_one_line_error

README = Path(__file__).resolve().parents[1] / "README.md"


def write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, fragments",
    [
        (
            'variants = ["none"]\n[thresholds]\nmax_kl = "low"\n',
            ["run.toml: thresholds.max_kl: Input should be a valid number"],
        ),
        (
            'variants = ["none"]\n[generation]\ntemprature = 0.2\n',
            ["run.toml: generation.temprature: unknown key", "temperature, greedy"],
        ),
        ('variants = ["none"]\nquants = ["bnb-nf4"]\n', ["run.toml: quants: unknown key", "variants"]),
        ('variants = "none"\n', ["run.toml: variants: Input should be a valid list"]),
        ('variants = ["none", 4]\n', ["run.toml: variants[1]: Input should be a valid string"]),
        ('variants = ["none"]\ngeneration = 3\n', ["run.toml: generation: Input should be a valid dictionary"]),
        (
            'variants = ["none"]\n[cost]\nbatch_sizes = [1, 0]\n',
            ["run.toml: cost.batch_sizes[1]: Input should be greater than 0"],
        ),
        ('variants = ["none"]\ndevice = "tpu"\n', ["run.toml: device: Input should be 'auto', 'cpu' or 'cuda'"]),
        ('variants = ["none"]\nlimit 4\n', ["run.toml: not valid TOML", "line 2"]),
        (
            'variants = ["none"]\n[store]\ntop_k = 10\n',
            ["run.toml: store.top_k: Input should be greater than or equal to 20"],
        ),
    ],
    ids=[
        "wrong-type",
        "unknown-nested-key",
        "unknown-top-key",
        "list-expected",
        "list-item",
        "table-expected",
        "out-of-range-item",
        "bad-choice",
        "not-toml",
        "store-top-k",
    ],
)
def test_a_bad_config_file_is_one_line_naming_the_key(tmp_path, text, fragments):
    write(tmp_path, text)
    result = quantcheck("run", "--config", "run.toml", cwd=tmp_path)
    assert_one_line_error(result, *fragments)


def test_a_missing_config_file_is_one_line(tmp_path):
    assert_one_line_error(
        quantcheck("run", "--config", str(tmp_path / "nope.toml")), "nope.toml: cannot read the config file"
    )


def test_an_option_typed_over_the_file_wins_and_is_named_in_errors(tmp_path):
    config = write(tmp_path, 'variants = ["none"]\nlimit = 4\n')
    # The typed value replaced the file's valid one, so the error is the option's, not the file's.
    assert_one_line_error(
        quantcheck("run", "--config", str(config), "--limit", "0"), "--limit: Input should be greater than 0"
    )
    # A typed dataset reaches the run: the file alone names a valid one.
    assert_one_line_error(
        quantcheck("run", "--config", str(config), "--dataset", "mmlu:virologyy", "--out", str(tmp_path / "out")),
        "unknown MMLU subject 'virologyy'",
    )
    # A default the user did not type leaves the file alone: limit stays the file's bad value.
    bad = write(tmp_path, 'variants = ["none"]\nlimit = 0\n', "bad.toml")
    assert_one_line_error(
        quantcheck("run", "--config", str(bad), "--seed", "3"), f"{bad}: limit: Input should be greater than 0"
    )


def _leaf_keys(table: type[BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for name, field in table.model_fields.items():  # a table is a model (its default: the model with defaults)
        is_table = isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        keys |= _leaf_keys(field.annotation, f"{prefix}{name}.") if is_table else {prefix + name}
    return keys


def _default(path: str) -> object:
    value: object = RunConfig()
    for part in path.split("."):
        value = getattr(value, part)
    return value


def test_every_run_option_is_a_config_key_with_the_same_default():
    """The file holds what the command line holds, and --help shows the defaults a file or compare() gets; `run` and
    `plan` take the same options, each with the help its key declares."""
    command = typer.main.get_command(app).commands["run"]
    planned = typer.main.get_command(app).commands["plan"]
    assert [param.name for param in planned.params] == [param.name for param in command.params]
    assert all(param.help for param in command.params), "a run option without help"
    options = {param.name: param.default for param in command.params if param.name not in NOT_IN_CONFIG}
    keys = {CONFIG_KEYS.get(name, name): default for name, default in options.items()}
    assert set(keys) == _leaf_keys(RunConfig)
    for key, default in keys.items():
        expected = _default(key)
        if key == "variants":
            assert default is None and expected == []  # --quant repeated; none typed is an empty list
        else:
            assert default == expected, key


PUBLIC_FLAGS = """--allow-offload --allow-pickle --backend --batch-size --batch-sizes --calibration
--calibration-samples
--calibration-seq-len --chat --config --context --cost-rounds --cpu-kv-cache-gb --dataset --debug --device
--distributed-executor-backend --dtype --enforce-eager --fail-on --fit-gb --floors --force --gen-batch-size
--gpu-memory-utilization --greedy --iterations --limit --max-accuracy-drop --max-kl --max-memory-gb --max-model-len
--max-new-tokens --min-memory-saving --min-top1 --n-ctx --no-allow-offload --no-allow-pickle --no-debug
--no-enforce-eager --no-floors --no-force --no-greedy --no-quiet --no-skip-cost --no-skip-generation --no-skip-quality
--no-trust-remote-code --out --pipeline-parallel-size --prefer --quant --quiet --reference-kld --reference-url --seed
--seq-len --skip-cost --skip-generation --skip-quality --store --store-tail-samples --store-top-k --temperature
--tensor-parallel-size --threads --time-budget --trust-remote-code -q""".split()


SENSITIVITY_FLAGS = """--allow-pickle --batch-size --config --dataset --debug --device --dtype --force --keep --limit
--max-kl --no-allow-pickle --no-debug --no-force --no-quiet --no-skip-cost --no-skip-generation --no-trust-remote-code
--out --quant --quiet --seed --skip-cost --skip-generation --threads --trust-remote-code -q""".split()


@pytest.mark.parametrize(("name", "published"), [("run", PUBLIC_FLAGS), ("sensitivity", SENSITIVITY_FLAGS)])
def test_the_command_lines_flags_are_the_published_ones(name, published):
    """The options are made from the settings' keys (RunConfig, SensitivityOptions): renaming a key (or a slip in
    OPTION_NAMES) would rename a flag that scripts and CI jobs type; the list here is what users have, changed only on
    purpose."""
    command = typer.main.get_command(app).commands[name]
    flags = [flag for param in command.params if param.name != "model" for flag in param.opts + param.secondary_opts]
    assert sorted(flags) == sorted(published)


def test_resolved_toml_reads_back_as_the_same_config(tmp_path, monkeypatch):
    odd = tmp_path / 'qu"est\\ions ü 🙂\x7f.jsonl'
    odd.write_text("")
    (tmp_path / "speech.txt").write_text("")
    monkeypatch.chdir(tmp_path)  # a relative calibration file is replayed from any folder
    config = RunConfig(
        variants=["bnb-nf4", "vllm:pretrained:./nowhere"],
        dataset=odd,
        limit=4,
        skip_cost=True,
        force=True,
        generation={"max_new_tokens": 4, "chat": "off"},
        cost={"batch_sizes": [1, 8]},
        engine={"vllm": {"distributed_executor_backend": "ray", "cpu_kv_cache_gb": 0.5}, "llamacpp": {"n_ctx": 4096}},
        thresholds={"max_kl": math.inf},
        calibration={"source": "text:speech.txt", "samples": 4},
    )
    used = {"out": str(tmp_path / "run"), "device": "cpu", "dtype": "float32", "threads": 2}
    text = resolved_toml(config, used)
    again = parse_config(tomllib.loads(text), key_path)
    expected = config.model_copy(
        update={
            "out": (tmp_path / "run").resolve(),
            "dataset": str(odd.resolve()),
            "calibration": Calibration(source=f"text:{(tmp_path / 'speech.txt').resolve()}", samples=4),
            "device": "cpu",
            "dtype": "float32",
            "threads": 2,
            "force": False,
        }
    )
    assert again == expected
    assert again.thresholds.max_kl == math.inf and again.engine.vllm.distributed_executor_backend == "ray"
    assert again.engine.llamacpp.n_ctx == 4096 and "[engine.llamacpp]\nn_ctx = 4096" in text
    assert not {"force", "quiet"} & set(tomllib.loads(text))  # how to treat a folder and the terminal is not the run


def test_each_engine_has_its_own_table_and_a_saved_flat_engine_table_still_runs(tmp_path, capsys):
    """[engine.vllm] and [engine.llamacpp] come from the backends' own settings; the flat [engine] of vLLM keys that
    earlier versions saved is read under the new names (max_model_len, which llama.cpp read too, as both), with one
    line saying so."""
    assert set(RunConfig.model_fields["engine"].annotation.model_fields) == {"vllm", "llamacpp"}
    saved = tmp_path / "config.toml"
    saved.write_text('variants = ["none"]\n\n[engine]\nmax_model_len = 4096\ncpu_kv_cache_gb = 0.5\n')
    config = read_config(saved)
    assert (config.engine.vllm.max_model_len, config.engine.vllm.cpu_kv_cache_gb) == (4096, 0.5)
    assert config.engine.llamacpp.n_ctx == 4096
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and f"{saved}: engine.max_model_len is now engine.vllm.max_model_len and" in note[0]
    assert config.options().engine == {
        "vllm": VllmSettings(max_model_len=4096, cpu_kv_cache_gb=0.5).model_dump(),
        "llamacpp": {"n_ctx": 4096},
    }
    with pytest.raises(QuantcheckError, match=r"engine\.vllm\.n_ctx: unknown key; known keys here: tensor_parallel"):
        parse_config({"engine": {"vllm": {"n_ctx": 1}}}, key_path)


def test_relative_paths_are_written_absolute(tmp_path, monkeypatch):
    tmp_path = tmp_path.resolve()
    (tmp_path / "questions.jsonl").write_text("")
    (tmp_path / "awq").mkdir()
    monkeypatch.chdir(tmp_path)
    config = RunConfig(variants=["vllm:pretrained:awq"], dataset="questions.jsonl", model="org/name")
    again = tomllib.loads(resolved_toml(config, {"out": "run", "device": "cpu", "dtype": "float32", "threads": 1}))
    assert again["dataset"] == str(tmp_path / "questions.jsonl")
    assert again["variants"] == [f"vllm:pretrained:{tmp_path / 'awq'}"]
    assert again["out"] == str(tmp_path / "run")
    assert again["model"] == "org/name"  # a hub id is not a path


def test_the_readme_config_example_is_a_valid_config():
    text = re.search(r"```toml\n(.*?)```", README.read_text(), re.S).group(1)
    options = parse_config(tomllib.loads(text), key_path).options()
    assert options.quants == ["bnb-nf4-dq", "torchao-int8wo"] and options.limit == 200
    assert options.thresholds.max_accuracy_drop == pytest.approx(0.02)  # points in the file, a fraction inside
    assert options.cost_settings == {"batch_sizes": [1, 8, 32]}


def test_compare_names_a_bad_keyword_before_anything_runs():
    import quantcheck

    with pytest.raises(QuantcheckError, match=r"^temprature: unknown key; known keys here: model, backend, variants"):
        quantcheck.compare(variants=["none"], temprature=0.1)
    with pytest.raises(QuantcheckError, match=r"^variants: Input should be a valid list"):
        quantcheck.compare(variants="bnb-nf4")
    with pytest.raises(
        QuantcheckError, match=r"^thresholds.max_accuracy_drop: Input should be less than or equal to 100"
    ):
        quantcheck.compare(variants=["none"], thresholds={"max_accuracy_drop": 150})
