"""Per-layer sensitivity and the mixed-precision variant (issue #26 parts 2 and 3), computed for real on the built-in
model: one layer quantized in place changes that layer's weights and nothing else, a replay from the kept layer inputs
is the model's own forward bit for bit, keeping every layer is the reference exactly, and `quantcheck sensitivity`
ranks all 30 layers, proposes a mixed variant and measures it in an ordinary run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from conftest import quantcheck
from quantcheck.backends.hf.backend import answer_position_logprobs
from quantcheck.data.batching import left_padded
from quantcheck.data.load import load_dataset
from quantcheck.models.builtin import builtin_model_dir
from quantcheck.models.loading import decoder_stack, kept_modules, load_model, load_tokenizer
from quantcheck.models.quant_methods import REGISTRY, LoadRequest
from quantcheck.report.markdown import parse_md_table
from quantcheck.schema.results import Estimate
from quantcheck.schema.sensitivity import LayerSensitivity, SensitivityTable
from quantcheck.scoring.loglik import encode_items
from quantcheck.scoring.sensitivity import capture, load_pair, propose_keep, replay, swapped

LAYERS = 30
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
LINEARS += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def loaded():
    """The reference and the whole bnb-nf4 variant, loaded once, and one batch of 4 questions as the scorer pads it."""
    path = str(builtin_model_dir())
    request = LoadRequest(path=path, device="cpu", dtype=torch.float32)
    reference, quantized = load_pair(REGISTRY["bnb-nf4"], request)
    tokenizer = load_tokenizer(path)
    encoded = encode_items(tokenizer, load_dataset("mmlu:virology", 4, 0).items)
    batch = left_padded(encoded.prompt_ids, tokenizer.pad_token_id, "cpu")
    return SimpleNamespace(
        request=request,
        reference=reference,
        quantized=quantized,
        stack=decoder_stack(reference),
        batch=batch,
        expected=answer_position_logprobs(reference, batch),  # the log-likelihood scorer's own rows
    )


def test_replaying_from_any_layer_with_nothing_swapped_is_the_forward_itself(loaded):
    inputs = capture(loaded.reference, loaded.stack, loaded.batch)
    assert torch.equal(inputs.reference, loaded.expected)
    for index in range(LAYERS):
        assert torch.equal(replay(loaded.stack, inputs, index), loaded.expected), index


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's value, a bnb 4-bit weight as its dequantized float matrix."""
    import bitsandbytes

    values = {}
    for name, module in model.named_modules():
        for key, parameter in module.named_parameters(recurse=False):
            if isinstance(module, bitsandbytes.nn.Linear4bit) and key == "weight":
                parameter = bitsandbytes.functional.dequantize_4bit(parameter.data, parameter.quant_state)
            values[f"{name}.{key}"] = parameter.detach().clone()
    return values


@pytest.mark.parametrize("index", [0, 13, 29])
def test_quantizing_layer_i_changes_its_linear_weights_and_nothing_else(loaded, index):
    before = _weights(loaded.reference)
    original = loaded.stack.layers[index]
    with swapped(loaded.stack, index, decoder_stack(loaded.quantized).layers[index]):
        during = _weights(loaded.reference)
    assert loaded.stack.layers[index] is original
    assert torch.equal(loaded.expected, answer_position_logprobs(loaded.reference, loaded.batch))  # swapped back
    assert during.keys() == before.keys()
    changed = {name for name in before if not torch.equal(before[name], during[name])}
    assert changed == {f"model.layers.{index}.{linear}.weight" for linear in LINEARS}
    for name in changed:  # quantized, not replaced: NF4 moves each weight by a few percent of its matrix's scale
        error = (during[name] - before[name]).abs().max() / before[name].abs().max()
        assert 0 < error < 0.2, (name, float(error))


def test_keeping_every_layer_reproduces_the_reference_exactly(loaded):
    import bitsandbytes

    path = loaded.request.path
    kept = load_model(REGISTRY["bnb-nf4"], replace(loaded.request, keep=kept_modules(path, tuple(range(LAYERS)))))
    assert not any(isinstance(module, bitsandbytes.nn.Linear4bit) for module in kept.modules())
    assert torch.equal(answer_position_logprobs(kept, loaded.batch), loaded.expected)
    one = load_model(REGISTRY["bnb-nf4"], replace(loaded.request, keep=kept_modules(path, (3,))))
    quantized = {name for name, module in one.named_modules() if isinstance(module, bitsandbytes.nn.Linear4bit)}
    assert quantized == {
        f"model.layers.{index}.{linear}" for index in range(LAYERS) if index != 3 for linear in LINEARS
    }


def _layer(index: int, kl: float) -> LayerSensitivity:
    return LayerSensitivity(
        index=index, name=f"model.layers.{index}", kl=Estimate(value=kl), top1_agreement=1.0, answer_flips=0
    )


def test_the_greedy_rule_keeps_the_fewest_highest_kl_layers_that_bring_the_rest_within_max_kl():
    layers = [_layer(0, 0.01), _layer(1, 0.30), _layer(2, 0.02), _layer(3, 0.10), _layer(4, 0.03)]
    assert propose_keep(layers, 0.061) == ([1, 3], pytest.approx(0.06))
    assert propose_keep(layers, 0.05) == ([1, 3, 4], pytest.approx(0.03))
    assert propose_keep(layers, 1.0) == ([], pytest.approx(0.46))
    assert propose_keep(layers, 0.0) == ([0, 1, 2, 3, 4], 0.0)
    assert propose_keep(layers, 0.05, count=1) == ([1], pytest.approx(0.16))
    # Tensors beyond the blocks stay quantized in every proposal: their KL counts, and above max_kl alone keeps all.
    assert propose_keep(layers, 0.061, outside=0.02) == ([1, 3, 4], pytest.approx(0.05))
    assert propose_keep(layers, 0.05, outside=0.08) == ([0, 1, 2, 3, 4], pytest.approx(0.08))


@pytest.fixture(scope="module")
def sensitivity_run(tmp_path_factory) -> Path:
    """`quantcheck sensitivity --quant bnb-nf4` on 4 questions as a user runs it (quality only, to stay short)."""
    out = tmp_path_factory.mktemp("sensitivity") / "run"
    result = quantcheck(
        "sensitivity",
        "--quant",
        "bnb-nf4",
        "--limit",
        "4",
        "--max-kl",
        "0.2",
        "--skip-cost",
        "--skip-generation",
        "--out",
        str(out),
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model.layers." in result.stdout and "llm_int8_skip_modules" in result.stdout, result.stdout
    return out


def test_every_decoder_layer_gets_a_measured_kl_ranked_highest_first(sensitivity_run):
    table = SensitivityTable.model_validate_json((sensitivity_run / "sensitivity.json").read_text())
    assert (table.method, table.items, table.max_kl) == ("bnb-nf4", 4, 0.2)
    assert sorted(layer.index for layer in table.layers) == list(range(LAYERS))
    assert all(layer.name == f"model.layers.{layer.index}" for layer in table.layers)
    assert all(layer.kl.value > 0 and layer.kl.units == 4 for layer in table.layers)
    assert [layer.kl.value for layer in table.layers] == sorted(
        (layer.kl.value for layer in table.layers), reverse=True
    )
    assert all(0 <= layer.top1_agreement <= 1 and 0 <= layer.answer_flips <= 4 for layer in table.layers)
    assert table.predicted_variant_kl == pytest.approx(sum(layer.kl.value for layer in table.layers))


def test_the_proposal_is_measured_as_an_ordinary_variant_of_the_run(sensitivity_run):
    table = SensitivityTable.model_validate_json((sensitivity_run / "sensitivity.json").read_text())
    results = {model["name"]: model for model in json.loads((sensitivity_run / "results.json").read_text())["models"]}
    first = table.proposals[0]
    assert table.measured_variant_kl.value > 0.2  # the plain variant fails, so a proposal was made
    assert first.keep and (first.keep, first.predicted_kl) == propose_keep(table.layers, 0.2)
    assert first.variant == "bnb-nf4?keep=" + ",".join(map(str, first.keep))
    assert (
        f"llm_int8_skip_modules=['lm_head', {', '.join(repr(f'model.layers.{i}') for i in first.keep)}]" in first.serve
    )
    for proposal in table.proposals:  # each one measured; a later one only after its predecessor missed --max-kl
        measured = results[proposal.variant]
        assert measured["quant"] == proposal.variant
        assert proposal.measured_kl.value == pytest.approx(measured["agreement"]["kl"]["mean"]["value"])
        assert measured["agreement"]["kl"]["store"] == "full"
        assert proposal.decision == measured["verdict"]["decision"]
        assert proposal.within_max_kl == (proposal.measured_kl.value <= 0.2)
    assert all(not earlier.within_max_kl for earlier in table.proposals[:-1])
    assert table.measured_variant_kl.value == pytest.approx(results["bnb-nf4"]["agreement"]["kl"]["mean"]["value"])


def test_the_report_shows_the_ranking_the_proposals_and_the_per_layer_chart(sensitivity_run):
    """The command renders the run's report with the sensitivity section: the top layers as ranked, each proposal's
    predicted beside measured KL and its verdict, and the bar chart of every layer."""
    table = SensitivityTable.model_validate_json((sensitivity_run / "sensitivity.json").read_text())
    markdown = (sensitivity_run / "report.md").read_text()
    assert "## Per-layer sensitivity: bnb-nf4" in markdown
    layers = parse_md_table(markdown, "Layer (the only one quantized)")
    assert [row[0] for row in layers] == [f"{layer.name} ({layer.index})" for layer in table.layers[:5]]
    proposals = {row[0]: row for row in parse_md_table(markdown, "Variant", with_column="Layers kept")}
    for proposal in table.proposals:
        row = proposals[proposal.variant]
        assert row[1] == str(len(proposal.keep)) and row[4] == proposal.decision
    assert (sensitivity_run / "figures" / "sensitivity.png").is_file()
    assert 'id="sensitivity"' in (sensitivity_run / "report.html").read_text()


def _cli(*args: str):
    from quantcheck.cli import app

    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize(
    "args, fragment",
    [
        (
            ["run", "--quant", "bnb-nf4?keep=0,30"],
            "keep=0,30: layer 30 does not exist; the model's decoder layers are 0..29",
        ),
        (["run", "--quant", "bnb-nf4?keep=1,x"], "keep=1,x: give decoder layer indices as whole numbers"),
        (["run", "--quant", "fp16?keep=1"], "fp16 cannot leave layers out"),
        (["sensitivity", "--quant", "bf16"], "bf16 cannot leave layers out"),
        (["sensitivity", "--quant", "bnb-nf4", "--keep", "31"], "--keep 31 is more than the model's 30 decoder layers"),
        (["sensitivity", "--quant", "gguf:F16"], "gguf:F16 is not quantized"),
        (["sensitivity", "--quant", "gguf:Q2_K?keep=1"], "without options"),
        (["sensitivity", "--quant", "bnb-nf5"], "unknown quantization method 'bnb-nf5'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, fragment):
    result = _cli(*args, "--out", str(tmp_path / "run"))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert not (tmp_path / "run").exists()
    assert "Traceback" not in result.output


def test_a_runs_config_file_gives_sensitivity_its_model_and_data_unless_typed(tmp_path):
    """`sensitivity --config RUN_DIR/config.toml` ranks layers on the run's own model, data and settings; an option
    typed on the command line wins, and a bad file is one line naming it."""
    config = tmp_path / "config.toml"
    config.write_text('dataset = "mmlu:virologyy"\nlimit = 4\nvariants = ["bnb-nf4"]\n')

    def refused(*args: str) -> str:
        result = _cli("sensitivity", "--quant", "bnb-nf4", "--config", str(config), *args, "--out", str(tmp_path / "r"))
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert not (tmp_path / "r").exists()
        return result.stderr.strip()

    assert "unknown MMLU subject 'virologyy'" in refused()  # the file's data set reached the command
    assert "unknown MMLU subject 'anatomyy'" in refused("--dataset", "mmlu:anatomyy")  # the typed one wins
    config.write_text("[thresholds]\nmax_kl = -1\n")
    assert refused() == f"error: {config}: thresholds.max_kl: Input should be greater than or equal to 0"


@pytest.fixture(scope="module")
def gguf_sensitivity_run(tmp_path_factory) -> Path:
    """`quantcheck sensitivity --quant gguf:Q2_K` on 4 questions: one file and one load per block, 2 blocks kept."""
    out = tmp_path_factory.mktemp("gguf-sensitivity") / "run"
    result = quantcheck(
        "sensitivity", "--quant", "gguf:Q2_K", "--limit", "4", "--keep", "2", "--skip-cost", "--skip-generation",
        "--out", str(out), timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_a_gguf_type_ranks_every_block_and_its_kept_blocks_are_measured(gguf_sensitivity_run):
    table = SensitivityTable.model_validate_json((gguf_sensitivity_run / "sensitivity.json").read_text())
    assert (table.method, table.items) == ("gguf:Q2_K", 4)
    assert sorted(layer.index for layer in table.layers) == list(range(LAYERS))
    assert all(layer.name == f"blk.{layer.index}" and layer.kl.value > 0 for layer in table.layers)
    # Q2_K also quantizes the token embeddings, which the built-in model (tied) reads as its output head too: ranked
    # on its own, beside the blocks, never kept by a proposal.
    (embeddings,) = table.outside
    assert (embeddings.name, embeddings.index) == ("token_embd", -1) and embeddings.kl.value > 0
    assert "token_embd" in (gguf_sensitivity_run / "report.md").read_text()
    (proposal,) = table.proposals  # --keep 2: measured as asked, once
    assert proposal.keep == sorted(layer.index for layer in table.layers[:2])
    assert proposal.variant == "gguf:Q2_K?keep=" + ",".join(map(str, proposal.keep))
    assert proposal.serve.startswith("llama-quantize --tensor-type-file TYPES.txt model-F32.gguf")
    assert f"blocks {', '.join(map(str, proposal.keep))} at F32" in proposal.serve
    models = json.loads((gguf_sensitivity_run / "results.json").read_text())["models"]
    measured = next(model for model in models if model["name"] == proposal.variant)
    assert proposal.measured_kl.value == pytest.approx(measured["agreement"]["kl"]["mean"]["value"])
    assert measured["engine"]["engine"] == "llama.cpp"


def test_a_gguf_with_one_block_quantized_differs_from_f32_in_that_block_alone(tmp_path):
    from quantcheck.backends.llamacpp import quantize_only, read_gguf_header
    from quantcheck.models.plan import read_config

    config = read_config(builtin_model_dir())
    width, inner = config["hidden_size"], config["intermediate_size"]
    kv = width // config["num_attention_heads"] * config["num_key_value_heads"]
    block = 2 * width * width + 2 * width * kv + 3 * width * inner
    path = quantize_only(builtin_model_dir(), "Q4_K_M", "blk.7", tmp_path / "block-7.gguf", 2)
    types = read_gguf_header(path).tensor_types
    assert sum(count for name, count in types.items() if name != "F32") == block, types
    # block 7's tensors at the types the plain Q4_K_M gives block 7 (its mix depends on the layer), not block 0's
    import gguf

    from quantcheck.backends.llamacpp import prepare_gguf

    def block_types(gguf_path: Path) -> dict[str, str]:
        tensors = gguf.GGUFReader(gguf_path).tensors
        return {tensor.name: tensor.tensor_type.name for tensor in tensors if tensor.name.startswith("blk.7.")}

    assert block_types(path) == block_types(prepare_gguf(builtin_model_dir(), "Q4_K_M", 2))
