"""The input normalisation of every registry backbone against timm's pretrained config of its weights, the refusal
of ImageNet weights under another normalisation, and the summary's mark on archives made before the correction."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from drift import summary
from drift.archive import Archive
from drift.h5tree import write_tree
from drift.models import LEGACY_PREPROCESSING, REGISTRY, build, get_spec, pretrained_preprocessing
from drift.weights import check_preprocessing


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_registry_normalisation_is_timms_pretrained_config(arch):
    """Each spec's mean / std equal what ``timm.models.get_pretrained_cfg`` declares for the weights that
    ``model.weights = "imagenet"`` loads (timm's default tag of the spec's timm name), read directly from timm."""
    spec = get_spec(arch)
    cfg = timm.models.get_pretrained_cfg(spec.timm_name)
    assert cfg is not None, spec.timm_name
    assert spec.mean == pytest.approx(tuple(cfg.mean), abs=1e-12), (arch, cfg.mean)
    assert spec.std == pytest.approx(tuple(cfg.std), abs=1e-12), (arch, cfg.std)
    got = pretrained_preprocessing(arch)
    assert got["mean"] == tuple(cfg.mean) and got["std"] == tuple(cfg.std)
    assert got["weights"].startswith(spec.timm_name)


def test_resnetv2_50_maps_the_unit_interval_to_minus_one_one(rng):
    """Keras ResNet50V2 ``preprocess_input`` (mode "tf"): x / 127.5 - 1 on [0, 255], i.e. 2 x - 1 on [0, 1]."""
    model = build("resnetv2_50", 3)
    x = torch.rand(2, 1, 37, 41, generator=rng)
    got = model.prepare(x)
    assert torch.allclose(got, 2 * x.expand(-1, 3, -1, -1) - 1, atol=1e-6)


def test_imagenet_weights_refused_under_another_normalisation():
    model = build("resnet18", 3)
    check_preprocessing(model)  # the registry's own: accepted
    model.set_normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match=r"resnet18.*resnet18\.a1_in1k.*0\.485"):
        check_preprocessing(model)
    with pytest.raises(ValueError, match="3 positive stds"):
        model.set_normalization((0.5, 0.5, 0.5), (0.5, 0.0, 0.5))


def _archive(path, attrs: dict) -> None:
    ar = Archive(path, "", "", {"seed": 0})
    with ar.commit("data") as f:
        f.require_group("data").attrs["class_names"] = json.dumps(["a", "b"])
    for arch in ("resnetv2_50", "resnet18"):
        with ar.commit(f"models/{arch}/transfer") as f:
            g = f.require_group(f"models/{arch}/transfer")
            write_tree(g, {"test": {"accuracy": 0.5, "macro_auc": 0.5}})
            g.attrs.update({"best_epoch": 1, "seconds": 1.0, **attrs})


@pytest.mark.parametrize("case", ["none", "legacy", "current"])
def test_summary_marks_archives_with_the_old_resnetv2_50_normalisation(tmp_path, case):
    attrs = {"none": {}, "legacy": {"input_mean": json.dumps(list(LEGACY_PREPROCESSING["resnetv2_50"][0]))},
             "current": {"input_mean": json.dumps([0.5, 0.5, 0.5])}}[case]
    _archive(tmp_path / "a.h5", attrs)
    text = summary.summary_text(tmp_path / "a.h5")
    marked = "WARNING: resnetv2_50/transfer were trained with the earlier input normalisation" in text
    assert marked == (case != "current"), text
    assert "resnet18/transfer" not in text.split("WARNING")[-1].split("\n")[0]
