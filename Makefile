# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint venv clean

$(BIN)/rollout: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/rollout

venv: $(BIN)/rollout

demo: venv
	$(BIN)/rollout demo

test: venv
	$(BIN)/ruff check rollout tests
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: venv
	$(BIN)/ruff check rollout tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info
