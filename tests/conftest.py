"""Test-session set-up shared by every test module.

Triton decides at decoration time whether a kernel is compiled or interpreted, so the interpreter must be
switched on before anything imports ``drift_kernels``: that is why it is set here, at conftest import.

Two sessions, chosen by ``TRITON_INTERPRET`` as the session starts:

* unset or ``1`` (the default, ``make test``): kernels run through Triton's interpreter, on CPU tensors too;
  tests marked ``gpu`` (compiled kernels on a CUDA device) are skipped.
* ``0`` (``TRITON_INTERPRET=0 python -m pytest tests/kernels`` on a CUDA machine): kernels are compiled for the
  device; tests marked ``gpu`` run, and tests marked ``interpreter`` (kernels on CPU tensors through the
  interpreter) are skipped unless they are also marked ``gpu``.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

#: Kernels compiled for a GPU in this session (TRITON_INTERPRET=0 given by the caller), not interpreted.
COMPILED = os.environ["TRITON_INTERPRET"] != "1"


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "interpreter: runs the kernels on CPU tensors through Triton's interpreter (skipped with TRITON_INTERPRET=0)",
    )


def pytest_collection_modifyitems(config, items):
    no_cuda = pytest.mark.skip(reason="needs a CUDA device")
    compiled = pytest.mark.skip(reason="kernels through Triton's interpreter; TRITON_INTERPRET=0 compiles them")
    for item in items:
        if "gpu" in item.keywords:
            if not torch.cuda.is_available():
                item.add_marker(no_cuda)
        elif COMPILED and "interpreter" in item.keywords:
            item.add_marker(compiled)


@pytest.fixture
def rng():
    """A fresh, logged seed per test: inputs differ run to run, and a failure prints the seed to replay it
    (``DRIFT_TEST_SEED=<seed> pytest <test id>``)."""
    seed = int(os.environ.get("DRIFT_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def nrng(rng):
    """A NumPy generator seeded from the logged per-test seed."""
    return np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=rng)))


@pytest.fixture(scope="module")
def reference_kernels():
    """The kernels' torch references for a whole module (``DRIFT_KERNELS=reference``): end-to-end modules spend most
    of their time on Triton's interpreter otherwise. The kernels are compared with the references in tests/kernels,
    and tests/test_pipeline.py runs the pipeline through the interpreted kernels."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DRIFT_KERNELS", "reference")
    yield
    mp.undo()

