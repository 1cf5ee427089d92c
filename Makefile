# mpda_dist developer targets.  Everything runs from the project venv (.venv), which
# `make venv` creates once and re-installs into whenever pyproject.toml changes.
#   make run NP=4 ARGS="configs/small.yaml -o out.h5"
#   make test TEST_WORKERS=0 PYTEST_ARGS="-k io -x"

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
NP     ?= 2
ARGS   ?=
PYTEST_ARGS ?=
# pytest-xdist workers for `make test`: 2 fills the 2-core CI machine (the suite is bound
# by XLA's compiles, one core each); 0 runs every test in one process.
TEST_WORKERS ?= 2

.PHONY: venv run test lint format clean

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# The stamp records that the editable install matches the current pyproject.toml.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

run: venv
	$(BIN)/mpiexec -n $(NP) $(BIN)/mpda run $(ARGS)

test: venv
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .

format: venv
	$(BIN)/ruff format .

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache $(STAMP)
