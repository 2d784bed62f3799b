# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo demo-vm test test-vm lint venv clean

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
	$(BIN)/pytest -q -m "not vm"

# Real Linux VMs under QEMU (root; builds the guest once, cached): about 20-30 minutes.
test-vm: venv
	$(BIN)/pytest -q -m vm --durations=0 tests/vm

# Two QEMU VMs moved from the sample OS 1.0.0 to 2.0.0 by reboot (docs/real-nodes.md).
demo-vm: venv
	bash scripts/demo-vm.sh

lint: venv
	$(BIN)/ruff check rollout tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info
