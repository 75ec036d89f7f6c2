# Two commands for users: `make run` and `make test`; each sets up .venv first when needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SEED    ?= 0
RUN_DIR ?= runs/pointmass-$(shell date +%Y%m%d-%H%M%S)

.PHONY: run test test-slow bench lock clean

# Reinstall only when what the install depends on changed.  torch goes first and pinned,
# so nothing later can pull an unpinned (CUDA) build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt torch
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,robotics,sweep]'
	touch $(STAMP)

# The embedded fleet: a local Ray started in-process, sized to this machine (`make run SEED=1`).
run: $(STAMP)
	$(VENV)/bin/sacfleet train --config pointmass --run-dir $(RUN_DIR) --set train.seed=$(SEED)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Every throughput suite: a table on stdout; table.txt, records.json and plots in runs/bench-<time>.
bench: $(STAMP)
	$(VENV)/bin/sacfleet bench --out runs/bench-$(shell date +%Y%m%d-%H%M%S)

# Regenerate the pinned set from the current .venv (after changing dependencies).
lock: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | grep -v '^-e ' \
		| sed -E 's/^torch==([0-9.]+)\+[a-z0-9]+$$/torch==\1/' > constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
