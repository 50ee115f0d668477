# Two commands on a fresh machine: `make build` (the main job) and `make test`.
# Each creates .venv if missing and installs what it needs, pinned by constraints.txt.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

# Extra flags for the build, e.g. `make build ARGS="--model tiny --batch 8"`.
ARGS ?=

.PHONY: build test bench bench-plans-full docs clean

$(VENV)/.runtime: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(PIP) -e '.[dev]'
	touch $@

build: $(VENV)/.runtime
	$(PY) -m capibara_export build --mesh 4x8 $(ARGS)

test: $(VENV)/.dev
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile tests bench --benchmark-disable

# The timed benchmark run (not part of make test): writes runtime.json (the runtime beside the
# peer, alone on one CPU device: bench/conftest.py) and out.json (the rest, 32 simulated devices).
bench: $(VENV)/.dev
	$(PY) -m pytest -q bench/test_runtime.py --benchmark-json runtime.json
	$(PY) -m pytest -q bench --ignore=bench/test_runtime.py --benchmark-json out.json
	$(PY) -m capibara_export bench-report runtime.json out.json

# The full plan study: small beside tiny (about 26 minutes more on a 2-core host).
bench-plans-full: $(VENV)/.dev
	CAPIBARA_BENCH_PLANS=full $(PY) -m pytest -q bench/test_plans.py --benchmark-json plans-full.json
	$(PY) -m capibara_export bench-report plans-full.json

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks

# The documentation site with the API reference (Sphinx + MyST), into docs/_build/html.
docs: $(VENV)/.dev
	$(PY) -m sphinx -b html -W --keep-going -q docs docs/_build/html
	@echo "open docs/_build/html/index.html"
