"""One grammar for every --quant value, `[backend:]method[?key=value&...]`: one parser, one error format, options
declared by the backend that reads them."""

from __future__ import annotations

import pytest

from conftest import quantcheck
from quantcheck.backends import get_backend
from quantcheck.backends.variants import GRAMMAR, parse_variant_text
from quantcheck.errors import QuantcheckError

URL = "http://127.0.0.1:9/v1"


@pytest.mark.parametrize(
    ("text", "backend", "body", "options"),
    [
        ("bnb-nf4", "hf", "bnb-nf4", {}),
        ("hf:bnb-nf4", "hf", "bnb-nf4", {}),
        ("bnb-nf4?keep=0,1,29", "hf", "bnb-nf4", {"keep": "0,1,29"}),
        ("vllm:fp8_per_channel", "vllm", "fp8_per_channel", {}),
        ("vllm:pretrained:/models/awq", "vllm", "pretrained:/models/awq", {}),
        ("gguf:Q4_K_M", "llamacpp", "Q4_K_M", {}),
        ("gguf:/tmp/x.gguf", "llamacpp", "/tmp/x.gguf", {}),
        (f"url:{URL}", "openai", URL, {}),
        (f"url:{URL}#served?top_logprobs=5", "openai", f"{URL}#served", {"top_logprobs": "5"}),
        # the model's name may also follow the options, as a URL's fragment follows its query
        (
            f"url:{URL}?top_logprobs=5&weight_gb=0.5#served",
            "openai",
            f"{URL}#served",
            {"top_logprobs": "5", "weight_gb": "0.5"},
        ),
    ],
)
def test_every_form_splits_into_backend_body_and_options(text, backend, body, options):
    parsed = parse_variant_text(text)
    assert (parsed.backend, parsed.body, parsed.options) == (backend, body, options)


def test_options_are_the_backends_own_declaration():
    assert set(get_backend("openai").variant_options) == {"top_logprobs", "weight_gb", "prompt_logprobs"}
    assert set(get_backend("hf").variant_options) == {"keep"}
    assert set(get_backend("vllm").variant_options) == {"kv_cache"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bnb-nf4?bits=3", "unknown option 'bits' in 'bnb-nf4?bits=3'; the hf backend's options: keep"),
        (
            "vllm:none?group=64",
            "unknown option 'group' in 'vllm:none?group=64'; the vllm backend's options: kv_cache",
        ),
        (f"url:{URL}?top_k=5", "the openai backend's options: top_logprobs, weight_gb, prompt_logprobs"),
        (f"url:{URL}?top_logprobs", "options are key=value pairs joined by '&'"),
        ("bnb-nf4?", "nothing follows '?'"),
        (f"url:{URL}?top_logprobs=5&top_logprobs=6", "an option is given twice"),
    ],
)
def test_one_error_format_names_the_value_and_the_grammar(text, message):
    with pytest.raises(QuantcheckError) as error:
        parse_variant_text(text)
    assert message in str(error.value)
    assert str(error.value).endswith(f"({GRAMMAR})")
    assert "\n" not in str(error.value)


def test_the_command_line_refuses_an_unknown_option_in_one_line_before_loading(tmp_path):
    result = quantcheck("run", "--quant", "bnb-nf4?bits=3", "--out", str(tmp_path / "run"), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: unknown option 'bits' in 'bnb-nf4?bits=3'; the hf backend's options: keep ({GRAMMAR})"
    )
    assert not (tmp_path / "run").exists()


def test_iters_belongs_to_a_tuned_recipe():
    from quantcheck.models import calibrated
    from quantcheck.schema.models import Calibration

    with pytest.raises(QuantcheckError, match="tuning steps of autoround-w4a16; gptq-w4a16 is not tuned: leave"):
        calibrated.make_spec("gptq-w4a16", "default", {"iters": "5"}, "llmc:gptq-w4a16?iters=5", Calibration())
    tuned = calibrated.make_spec("autoround-w4a16", "default", {}, "llmc:autoround-w4a16", Calibration())
    assert tuned.iters == 200  # AutoRound's own default


def test_a_recipe_that_calibrates_on_nothing_ignores_the_runs_calibration():
    """rtn-w4a16 is the same checkpoint whatever --calibration-samples says: one cache entry, no re-making."""
    from quantcheck.backends.variants import variant_spec
    from quantcheck.models import calibrated
    from quantcheck.models.builtin import builtin_model_dir
    from quantcheck.schema.models import Calibration

    run = Calibration(source="text:/no/such/file.txt", samples=8, seq_len=64)
    made = calibrated.make_spec("rtn-w4a16", "default", {}, "llmc:rtn-w4a16", run)
    assert (made.calibration, made.samples, made.seq_len) == ("default", 32, 256)
    # The same through the variant grammar, which hands make_spec the variant's own data or `default`.
    spec = variant_spec("llmc:rtn-w4a16", str(builtin_model_dir()), str, run)
    assert (spec.make.calibration, spec.make.samples, spec.make.seq_len) == ("default", 32, 256)
