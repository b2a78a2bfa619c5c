# One-command set-up: `make demo` and `make test` create .venv (inside the repo) on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= $(shell nproc)

.PHONY: venv demo test data lock clean-venv cpp

$(VENV)/.installed: requirements.lock
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.lock
	touch $@

venv: $(VENV)/.installed

# The C++ sampler (runtime/cpp) against the torch wheel's libraries.
cpp: venv
	cmake -S . -B build -DTORCH_DIR=$$($(PY) -c "import torch, os; print(os.path.dirname(torch.__file__))") >/dev/null
	cmake --build build -j2

demo: venv
	$(PY) -m python.demo

test: venv cpp
	$(PY) -m pytest -q tests

# The full synthetic dataset (18,009 training images, ~5 min on 2 cores).
data: venv
	$(PY) -m python.make_data --out data/iclevr --seed 0

# Re-resolve requirements.in into requirements.lock (every transitive package pinned).
lock:
	rm -rf /tmp/lockenv && $(PYTHON) -m venv /tmp/lockenv
	/tmp/lockenv/bin/pip install --quiet -r requirements.in
	/tmp/lockenv/bin/pip freeze > requirements.lock

clean-venv:
	rm -rf $(VENV)
