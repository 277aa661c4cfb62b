# The two commands of the README:
#   make run   - set up .venv and run the main job (no download needed)
#   make test  - set up .venv and run the tests on the CPU backend
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# PYTHONDONTWRITEBYTECODE (set on some machines, e.g. sandboxes) left empty for the
# project's own commands: otherwise every process compiles the package's source again
# (0.15 - 0.2 s each; the test suite starts over a hundred), and pytest rewrites every
# test module's asserts again in each worker. The bytecode goes to __pycache__/
# (ignored by git, not packaged).
BYTECODE := PYTHONDONTWRITEBYTECODE=

run: $(STAMP)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(BYTECODE) $(PY) -m benchmarks.run \
	  --config=configs/heart_disease.py --workdir=results/heart_disease

demo: $(STAMP)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(BYTECODE) $(PY) -m benchmarks.quickstart

# 2 pytest workers (TEST_WORKERS=0: one process); XLA's fast-compile settings and a
# persistent compilation cache in .pytest_cache/ (tests/conftest.py).
TEST_WORKERS ?= 2
test: $(STAMP)
	JAX_PLATFORMS=cpu $(BYTECODE) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests

bench: $(STAMP)
	$(BYTECODE) $(PY) -m benchmarks.throughput --out=results/throughput.csv

clean:
	rm -rf $(VENV) .pytest_cache
