# Two commands do everything on a fresh clone: `make run` (the demo study) and `make test` (the test suite).
# Both create or refresh the virtual environment in .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.drift-installed

.PHONY: run smoke test browser lint bench-gpu bench-cpu asv-quick gpu-check gpu-study compile-check-triton36 clean

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

# On a CUDA machine: compiled-kernel tests, kernel resources, kernel / CAM / iFIM timings, packed into
# results/gpu/gpu-check.tar.gz with results/gpu/summary.md (bench/gpu_check.py; about 6 minutes). Nothing from the
# network: wheels/ provides grad-cam and ttach. Runs .venv's python when there is one, else the machine's own.
# ARGS passes options: make gpu-check ARGS="--only kernels", ARGS="--skip cams", ARGS=--dry-run (no GPU needed).
GPU_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(GPU_PY) bench/gpu_check.py $(ARGS)

# On a CUDA machine: the paper-size study on synthetic data (configs/gpu-study.toml, about 8 minutes on one H100),
# each command under its time budget, packed into results/gpu-study/gpu-study.tar.gz with summary.md.
gpu-study:
	$(GPU_PY) bench/gpu_study.py $(ARGS)

# The ahead-of-time compile check (tests/kernels/test_compile.py) under triton 3.6, the GPU machine's version, in a
# side folder (.triton36/, triton 3.6 installed there with --no-deps and put first on PYTHONPATH; torch and the
# rest from .venv). Run before any GPU session; about 5 minutes on 2 cores.
TRITON36 := $(CURDIR)/.triton36
$(TRITON36)/.installed:
	$(GPU_PY) -m pip install --quiet --no-deps --target $(TRITON36) 'triton==3.6.*'
	@touch $@
compile-check-triton36: $(TRITON36)/.installed
	PYTHONPATH=$(TRITON36) TRITON_INTERPRET=0 $(GPU_PY) -c 'import triton; assert triton.__version__.startswith("3.6"), triton.__file__'
	PYTHONPATH=$(TRITON36) TRITON_INTERPRET=0 $(GPU_PY) -m pytest -q -p no:cacheprovider tests/kernels/test_compile.py

bench-cpu: $(STAMP)
	$(PY) -m pytest tests/benchmarks -q --benchmark-enable --benchmark-json=results/pytest-benchmark-cpu.json

asv-quick: $(STAMP)
	$(VENV)/bin/asv run -E existing:$(PY) --quick --show-stderr --set-commit-hash $$(git rev-parse HEAD)

clean:
	rm -rf runs .pytest_cache .hypothesis
