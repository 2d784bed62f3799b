# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo demo-vm test test-vm lint venv clean mutate

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

# Mutation testing of the pure core ([tool.mutmut] in pyproject.toml: decide, plan, the
# agent's state machine, the gate schedule, analysis verdicts, windows, the condition
# language) against the fast tests that cover them, at low priority. Prints the surviving
# mutants (`mutmut show NAME` shows one), then the share killed. A fresh run each time:
# about 6 minutes on 2 busy cores.
mutate: venv
	rm -rf mutants
	nice -n 19 $(BIN)/mutmut run
	$(BIN)/mutmut results
	$(BIN)/mutmut export-cicd-stats >/dev/null
	@$(BIN)/python -c 'import json; s = json.load(open("mutants/mutmut-cicd-stats.json")); \
	  k, t = s["killed"], s["total"]; \
	  print("mutation score: %d/%d killed (%.1f%%); survived %d, timeout %d, no tests %d, " \
	        "suspicious %d" % (k, t, 100 * k / max(t, 1), s["survived"], s["timeout"], \
	        s["no_tests"], s["suspicious"]))'

lint: venv
	$(BIN)/ruff check rollout tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info
