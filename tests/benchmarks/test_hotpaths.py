"""The checks of the declared hot paths (``bench/benchmarks/_hotpaths.py``) reject wrong outputs: a check that
passed anything would make every benchmark built on it vacuous."""

import pytest
import torch

from bench.benchmarks._hotpaths import (
    FISHER_GRAM,
    FISHER_PROJECT,
    HOT_PATHS,
    IFIM_SPECTRUM,
    JACOBIAN,
    TOPK_IOU,
    fisher_inputs,
    jacobian_inputs,
    map_inputs,
)


def seed(rng):
    return int(torch.randint(0, 2**31, (1,), generator=rng))


def test_fisher_checks_reject_a_perturbed_output(rng):
    inputs = fisher_inputs(3, 5, int(torch.randint(50, 300, (1,), generator=rng)) | 1, "cpu", seed(rng), m=3)
    K, Gx = FISHER_GRAM.call("reference", inputs)()
    FISHER_GRAM.check(inputs, "reference", (K, Gx))
    with pytest.raises(AssertionError):
        FISHER_GRAM.check(inputs, "reference", (K * (1 + 1e-4), Gx))
    V = FISHER_PROJECT.call("reference", inputs)()
    FISHER_PROJECT.check(inputs, "reference", V)
    with pytest.raises(AssertionError):
        FISHER_PROJECT.check(inputs, "reference", V + 1e-4 * V.abs().max())


@pytest.mark.parametrize("ties", ["index", "fractional"])
def test_topk_check_rejects_one_wrong_count(rng, ties):
    inputs = map_inputs(5, 9, int(torch.randint(7, 20, (1,), generator=rng)), "cpu", seed(rng), ties=ties)
    inter, union, iou = TOPK_IOU.call("reference", inputs)()
    TOPK_IOU.check(inputs, "reference", (inter, union, iou))
    inter = inter.clone()
    inter[int(torch.randint(5, (1,), generator=rng)), 1] += 1
    with pytest.raises(AssertionError):
        TOPK_IOU.check(inputs, "reference", (inter, union, iou))


def test_jacobian_and_spectrum_checks_reject_a_scaled_output(rng):
    inputs = jacobian_inputs("small_cnn", int(torch.randint(9, 16, (1,), generator=rng)), 2, "cpu", seed(rng))
    J = JACOBIAN.call("loop", inputs)()
    with pytest.raises(AssertionError):
        JACOBIAN.check(inputs, "loop", J * (1 + 1e-3))
    eigenvalues = IFIM_SPECTRUM.call("drift", inputs)()
    with pytest.raises(AssertionError):
        IFIM_SPECTRUM.check(inputs, "drift", eigenvalues * (1 + 1e-3))


def test_every_path_names_its_implementations():
    assert set(HOT_PATHS) == {"cams", "jacobian", "ifim_spectrum", "fisher_gram", "fisher_project", "topk_iou"}
    assert set(JACOBIAN.implementations()) == {"loop", "vmap", "batched_grad", "replicate"}
    with pytest.raises(NotImplementedError):
        FISHER_GRAM.call("no-such-implementation", None)
