# mpda_dist developer targets.  Everything runs from the project venv (.venv), which
# `make venv` creates once and re-installs into whenever pyproject.toml changes.
#   make run NP=4 ARGS="configs/small.yaml -o out.h5"

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
NP     ?= 2
ARGS   ?=
PYTEST_ARGS ?=

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
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .

format: venv
	$(BIN)/ruff format .

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache $(STAMP)
