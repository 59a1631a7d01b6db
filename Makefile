# Two commands do everything on a fresh clone: `make run` (the demo study) and `make test` (the test suite).
# Both create or refresh the virtual environment in .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.drift-installed

.PHONY: run smoke test browser lint bench-gpu bench-cpu asv-quick gpu-check clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/drift run --config configs/demo.toml

smoke: $(STAMP)
	$(VENV)/bin/drift run --config configs/smoke.toml --fresh

test: $(STAMP) browser
	$(PY) -m pytest -q

# The report's browser test needs headless Chromium: installed from Debian's packages where the machine
# allows it (root with apt-get); elsewhere that one test says why it cannot run.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; } || \
	  echo "note: chromium not installed; the browser test will say so"

lint: $(STAMP)
	$(VENV)/bin/ruff check drift kernels bench tests

# On a GPU machine: pytest-benchmark timings of the hot paths, written under results/.
bench-gpu: $(STAMP)
	$(PY) -m pytest tests/benchmarks -q --benchmark-enable --benchmark-json=results/pytest-benchmark-gpu.json
	$(PY) bench/gpu_kernels.py --json results/gpu_kernels.json

# On a CUDA machine: compiled-kernel tests, kernel resources, kernel / CAM / iFIM timings under results/gpu/
# (bench/gpu_check.py; about 6 minutes). Runs .venv's python when there is one, else the machine's own.
gpu-check:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) bench/gpu_check.py

bench-cpu: $(STAMP)
	$(PY) -m pytest tests/benchmarks -q --benchmark-enable --benchmark-json=results/pytest-benchmark-cpu.json

asv-quick: $(STAMP)
	$(VENV)/bin/asv run -E existing:$(PY) --quick --show-stderr --set-commit-hash $$(git rev-parse HEAD)

clean:
	rm -rf runs .pytest_cache .hypothesis
