"""Every bad input gets one line that says what is wrong, exit code 2, and no traceback."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import quantcheck
from quantcheck.errors import QuantMethodError
from quantcheck.models.quant_methods import REGISTRY, QuantMethod


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def jsonl(tmp_path: Path, *rows: object, name: str = "q.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


GOOD_ROW = {"question": "q?", "choices": ["a", "b", "c", "d"], "answer": "A"}


@pytest.mark.parametrize(
    "make_args, fragments",
    [
        (lambda tmp: ["--quant", "bnb-nf5"], ["unknown quantization method 'bnb-nf5'", "bnb-nf4", "torchao-int8wo"]),
        (lambda tmp: ["--quant", "none", "--device", "cuda"], ["no CUDA GPU", "--device cpu"]),
        (lambda tmp: [str(tmp / "no-such-model"), "--quant", "none"], ["does not exist"]),
        (
            lambda tmp: ["someone/no-such-model-xyz", "--quant", "none"],
            ["cannot fetch someone/no-such-model-xyz", "local model folder"],
        ),
        (lambda tmp: [str(tmp), "--quant", "none"], ["is not a model folder"]),
        (
            lambda tmp: ["--quant", "none", "--dataset", "mmlu:virologyy"],
            ["unknown MMLU subject 'virologyy'", "virology"],
        ),
        (lambda tmp: ["--quant", "none", "--dataset", jsonl(tmp, "")], ["has no questions"]),
        (
            lambda tmp: ["--quant", "none", "--dataset", jsonl(tmp, GOOD_ROW, "{broken")],
            ["q.jsonl:2", "not valid JSON"],
        ),
        (
            lambda tmp: ["--quant", "none", "--dataset", jsonl(tmp, {**GOOD_ROW, "answer": "F"})],
            ["q.jsonl:1", "out of range"],
        ),
        (lambda tmp: ["--quant", "none", "--limit", "0"], ["--limit: Input should be greater than 0"]),
        (lambda tmp: ["--quant", "none", "--limit", "-3"], ["--limit: Input should be greater than 0"]),
        (
            lambda tmp: ["--quant", "none", "--temperature", "-0.5"],
            ["--temperature: Input should be greater than or equal to 0"],
        ),
        (
            lambda tmp: ["--quant", "none", "--max-new-tokens", "0"],
            ["--max-new-tokens: Input should be greater than 0"],
        ),
        (lambda tmp: ["--quant", "none", "--min-top1", "1.5"], ["--min-top1: Input should be less than or equal to 1"]),
        (
            lambda tmp: ["--quant", "none", "--max-accuracy-drop", "-1"],
            ["--max-accuracy-drop: Input should be greater than or equal to 0"],
        ),
        (lambda tmp: ["--quant", "none", "--batch-sizes", "1,x"], ["--batch-sizes must be comma-separated"]),
        (lambda tmp: ["--quant", "none", "--chat", "maybe"], ["--chat: Input should be 'auto', 'on' or 'off'"]),
        (lambda tmp: [], ["name at least one variant with --quant"]),
        (lambda tmp: ["--quant", "none", "--store", "tiny"], ["--store: Input should be 'compact' or 'full'"]),
        (
            lambda tmp: ["--quant", "none", "--store-top-k", "10"],
            ["--store-top-k: Input should be greater than or equal to 20"],
        ),
        # checked before any connection is tried (nothing listens on port 9)
        (lambda tmp: ["--quant", "url:ftp://127.0.0.1:9/v1"], ["is not an http(s) URL"]),
        (
            lambda tmp: ["--quant", "url:http://127.0.0.1:9/v1?weight_gb=-2"],
            ["weight_gb must be a positive number of GiB"],
        ),
        (
            lambda tmp: ["--quant", "url:http://127.0.0.1:9/v1?top_k=5"],
            ["unknown option 'top_k'", "top_logprobs, weight_gb"],
        ),
        (
            lambda tmp: ["--quant", "url:http://user:secret@127.0.0.1:9/v1"],
            ["carries credentials", "QUANTCHECK_API_KEY"],
        ),
    ],
    ids=[
        "unknown-quant",
        "cuda-missing",
        "missing-folder",
        "hub-offline",
        "not-a-model",
        "unknown-subject",
        "empty-dataset",
        "malformed-jsonl",
        "answer-out-of-range",
        "limit-zero",
        "limit-negative",
        "negative-temperature",
        "max-new-tokens-zero",
        "threshold-range",
        "threshold-negative",
        "bad-batch-sizes",
        "bad-chat",
        "no-quant",
        "bad-store",
        "store-top-k-too-small",
        "url-scheme",
        "url-weight-gb",
        "url-unknown-option",
        "url-credentials",
    ],
)
def test_bad_input_is_one_line(tmp_path, make_args, fragments):
    result = quantcheck("run", *make_args(tmp_path), "--out", str(tmp_path / "out"), "--skip-cost")
    assert_one_line_error(result, *fragments)


def test_unwritable_out_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = quantcheck("run", "--quant", "none", "--out", str(blocker / "out"))
    assert_one_line_error(result, "cannot create --out", "writable")


def test_pickle_only_checkpoint_is_refused_without_opt_in(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    result = quantcheck("run", str(tmp_path), "--quant", "none", "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "pickle", "--allow-pickle")


def test_debug_shows_the_traceback(tmp_path):
    result = quantcheck("run", "--quant", "bnb-nf5", "--debug", "--out", str(tmp_path / "out"))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_method_on_an_unsupported_device_is_refused_before_loading():
    cuda_only = QuantMethod("cuda-only", "test entry", frozenset({"cuda"}), (), "", REGISTRY["none"].recipe)
    with pytest.raises(QuantMethodError, match="cuda-only does not run on cpu"):
        cuda_only.check_runnable("cpu")


def test_method_with_a_missing_library_says_what_to_install():
    missing = QuantMethod(
        "needs-lib",
        "test entry",
        frozenset({"cpu"}),
        ("no_such_quant_library",),
        "'quantcheck[x]'",
        REGISTRY["none"].recipe,
    )
    with pytest.raises(QuantMethodError, match=r"needs no_such_quant_library .*pip install 'quantcheck\[x\]'"):
        missing.check_runnable("cpu")


def test_report_on_a_folder_without_results(tmp_path):
    assert_one_line_error(quantcheck("report", str(tmp_path)), "has no results.json")


def test_quants_lists_every_method_and_whether_it_runs_here():
    result = quantcheck("quants", env={"COLUMNS": "200"})
    assert result.returncode == 0
    for name in REGISTRY:
        assert name in result.stdout
    assert "yes (cpu)" in result.stdout
    # Each backend's own-checkpoint row, written once with its prefix.
    assert (
        "vllm:pretrained:PATH" in result.stdout
        and "gguf:FILE.gguf" in result.stdout
        and "gguf:gguf:" not in result.stdout
    )
    # Install hints keep their extras (rich markup once ate "[vllm]"), and the grammar and its options are shown.
    assert "quantcheck[vllm]" in result.stdout or "yes (cpu)" in result.stdout.split("vllm:none")[1].splitlines()[0]
    grammar = (
        "every --quant is [backend:]method[?key=value&...]; options: hf: keep; vllm: kv_cache; "
        "gguf: keep, imatrix, samples, seq_len; url: top_logprobs, weight_gb, prompt_logprobs"
    )
    assert grammar in result.stdout
    assert "gguf:TYPE?imatrix=default|text:FILE" in result.stdout  # the GGUF made with an importance matrix
    # llm-compressor's recipes, read by transformers and by vLLM, each saying whether it needs calibration.
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if "llmc:" in line}
    assert {"llmc:gptq-w4a16", "llmc:rtn-w4a16", "vllm:llmc:gptq-w4a16"} <= set(rows)
    assert "calibrated" in rows["llmc:gptq-w4a16"] and "no calibration" in rows["llmc:rtn-w4a16"]


def test_chat_forced_on_for_a_model_without_a_chat_template(tmp_path):
    from quantcheck.models.builtin import builtin_model_dir

    plain = tmp_path / "no-template"
    plain.mkdir()
    for path in builtin_model_dir().iterdir():
        if path.name == "chat_template.jinja":
            continue
        (plain / path.name).symlink_to(path)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").unlink()
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    result = quantcheck("run", str(plain), "--quant", "none", "--chat", "on", "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "--chat on", "no chat template")


def test_schema_command_prints_the_results_json_schema(small_run):
    schema = json.loads(quantcheck("schema").stdout)
    assert schema["title"] == "Results" and "ItemRecord" in schema["$defs"]
    import jsonschema

    jsonschema.validate(json.loads((small_run / "results.json").read_text()), schema)


def test_the_terminal_shows_quantcheck_lines_and_library_noise_goes_to_logs(tmp_path):
    """A first run on a fresh cache converts the built-in model: torchao/tqdm/torch chatter stays in log files."""
    cache = tmp_path / "cache"
    result = quantcheck(
        "run",
        "--quant",
        "none",
        "--limit",
        "2",
        "--skip-cost",
        "--skip-generation",
        "--no-floors",
        "--out",
        str(tmp_path / "run"),
        env={"QUANTCHECK_CACHE": str(cache)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    terminal = result.stdout + result.stderr
    for noise in ("Failed to load", "Converting and de-quantizing", "it/s]", "_pytree", "Warning"):
        assert noise not in terminal, noise
    assert "converting the built-in model once" in terminal
    assert "Converting and de-quantizing" in (cache / "models" / "smollm2-135m.convert.log").read_text()


def test_progress_in_a_log_is_a_line_every_tenth_of_a_phase_with_elapsed_time_and_eta(tmp_path):
    """No terminal (CI, a log file): each phase says it starts, then reports each tenth of its work with the time it
    took so far and the ETA, and says when it finished."""
    result = quantcheck(
        "run",
        "--quant",
        "none",
        "--limit",
        "10",
        "--batch-size",
        "1",
        "--skip-generation",
        "--skip-cost",
        "--no-floors",
        "--out",
        str(tmp_path / "run"),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("reference (quality) loglik: ")]
    assert lines[0] == "reference (quality) loglik: 0/10 done, starting"
    done = [int(line.split(": ")[1].split("/")[0]) for line in lines[1:]]
    assert done == list(range(1, 11)), lines
    assert all(re.search(r"done, \d+ s, (eta \d+ s|eta not known yet|finished)$", line) for line in lines[1:]), lines
    assert lines[-1].endswith("finished")


@pytest.mark.parametrize("command", ["run", "sensitivity"])
def test_a_folder_of_other_files_is_refused_before_any_work(tmp_path, command):
    """One check (RunFolder.refuse_foreign) for both commands: sensitivity refuses before minutes of scoring."""
    (tmp_path / "notes.txt").write_text("mine")
    result = quantcheck(command, "--quant", "bnb-nf4", "--limit", "4", "--out", str(tmp_path))
    assert_one_line_error(result, "is not empty and is not a quantcheck run", "--force")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]
