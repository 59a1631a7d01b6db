"""Accuracy-stability record across commits: the headline numbers of the smoke study.

``setup_cache`` runs ``configs/smoke.toml`` once per commit (seed 0, into a temporary folder that is deleted
afterwards; the report step off) and keeps only the numbers; every ``track_*`` below reads one of them. A
commit whose study changes these numbers without meaning to shows as a step in asv's graphs.

Tracked, per architecture of the smoke config:

* test accuracy and macro AUC after each phase (``transfer``, ``finetune``);
* per CAM method: top-20 % IoU between the TL and FT maps and the centroid shift (class-macro means over the
  selected samples, as in the archive's ``drift/<arch>/<method>/summary``);
* per phase: the share of the iFIM trace held by the top eigenvalue (mean over the spectrum samples) and the
  confidence gap of the perturbation experiment (``drift.headline.confidence_gap``: area over eps of the
  |change of predicted-class confidence| inside the high-sensitivity subspace minus inside its complement, mean
  over images).

Every number is read from the archive's headline numbers (``drift.headline.load``), the ones ``drift summary``
and the report print.

If the commit cannot run the study (a module missing, another config schema), every track is skipped.
"""

from __future__ import annotations

import tempfile
import tomllib
from pathlib import Path

from ._support import need, need_attr

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.toml"


def _smoke_axes() -> tuple[list[str], list[str]]:
    """Architectures and CAM methods of the smoke config (read as TOML at discovery: no drift import)."""
    try:
        cfg = tomllib.loads(SMOKE.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        cfg = {}
    archs = cfg.get("run", {}).get("archs", ["resnet10t", "resnet18"])
    methods = cfg.get("attribution", {}).get("methods", ["gradcam++", "layercam"])
    return list(archs), list(methods)


ARCHS, METHODS = _smoke_axes()
PHASES = ["transfer", "finetune"]  # a literal: asv discovers benchmarks in old commits without importing drift


def headline_numbers(reader, archs, methods) -> dict:
    """{(quantity, arch, phase or method): value} from the archive's headline numbers (``drift.headline.load``: the
    numbers the statistics step stored, which ``drift summary`` and the report print too)."""
    h = need_attr(need("drift.headline"), "load")(reader)
    out: dict = {}
    for arch in archs:
        for phase in PHASES:
            c, f = h["classification"][arch][phase], h["fisher"][arch][phase]
            out[("accuracy", arch, phase)] = float(c["accuracy"])
            out[("macro_auc", arch, phase)] = float(c["macro_auc"])
            out[("top_eigen_share", arch, phase)] = float(f["top_share"])
            out[("confidence_gap", arch, phase)] = float(f["gap"])
        for method in methods:
            d = h["drift"][arch][method]
            out[("iou@20", arch, method)] = float(d["iou@20"]["mean"])
            out[("centroid_shift", arch, method)] = float(d["centroid_shift"]["mean"])
    return out


def setup_cache() -> dict:
    """Run the smoke study once; {(quantity, arch, phase or method): value}, or {"skip": reason}."""
    try:
        config = need("drift.config")
        pipeline = need("drift.pipeline")
        archive = need("drift.archive")
        if not SMOKE.is_file():
            raise NotImplementedError(f"{SMOKE} not found")
        with tempfile.TemporaryDirectory(prefix="drift-asv-smoke-") as tmp:
            cfg = need_attr(config, "load")(str(SMOKE), [f'run.out="{tmp}"', "run.progress=false",
                                                         "report.enabled=false"])
            path = need_attr(pipeline, "Pipeline")(cfg, fresh=True).run()
            return headline_numbers(need_attr(archive, "ArchiveReader")(path), ARCHS, METHODS)
    except (NotImplementedError, ImportError) as exc:  # an older commit without a module or function
        return {"skip": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:
        # A config this commit does not know (older schema) is a skip; anything else is a failure to report.
        if type(exc).__name__ == "ConfigError":
            return {"skip": f"configs/smoke.toml does not load in this commit: {exc}"}
        raise


setup_cache.timeout = 1800


def setup(numbers: dict, *params) -> None:
    if "skip" in numbers:
        raise NotImplementedError(f"the smoke study did not run in this commit: {numbers['skip']}")


def track_test_accuracy(numbers: dict, arch: str, phase: str) -> float:
    return numbers[("accuracy", arch, phase)]


track_test_accuracy.params = (ARCHS, PHASES)
track_test_accuracy.param_names = ["arch", "phase"]
track_test_accuracy.unit = "accuracy"


def track_test_macro_auc(numbers: dict, arch: str, phase: str) -> float:
    return numbers[("macro_auc", arch, phase)]


track_test_macro_auc.params = (ARCHS, PHASES)
track_test_macro_auc.param_names = ["arch", "phase"]
track_test_macro_auc.unit = "AUC"


def track_iou20(numbers: dict, arch: str, method: str) -> float:
    return numbers[("iou@20", arch, method)]


track_iou20.params = (ARCHS, METHODS)
track_iou20.param_names = ["arch", "method"]
track_iou20.unit = "IoU"


def track_centroid_shift(numbers: dict, arch: str, method: str) -> float:
    return numbers[("centroid_shift", arch, method)]


track_centroid_shift.params = (ARCHS, METHODS)
track_centroid_shift.param_names = ["arch", "method"]
track_centroid_shift.unit = "image diagonals"


def track_top_eigen_share(numbers: dict, arch: str, phase: str) -> float:
    return numbers[("top_eigen_share", arch, phase)]


track_top_eigen_share.params = (ARCHS, PHASES)
track_top_eigen_share.param_names = ["arch", "phase"]
track_top_eigen_share.unit = "share of trace"


def track_confidence_gap(numbers: dict, arch: str, phase: str) -> float:
    return numbers[("confidence_gap", arch, phase)]


track_confidence_gap.params = (ARCHS, PHASES)
track_confidence_gap.param_names = ["arch", "phase"]
track_confidence_gap.unit = "confidence"
