"""A reduced planted / null-twin / placebo triple through the whole pipeline (tiny backbone, small images, about a
minute on two cores): the planted marker is detected against the twin by both methods (marker share up, lung mass
down), the placebo (no marker, other fine-tuning seeds from the same transfer checkpoint) is not, and finds no
outcome at all."""

import time

import numpy as np
import pytest

from drift import config
from drift import known_answer as ka
from drift.pipeline import Pipeline

REDUCED = [
    'run.archs=["resnet10t"]', "run.progress=false", "data.image_size=64", "data.n_train=80", "data.n_val=10",
    "data.n_test=40", "data.seed=0", "model.weights=none", "model.input_scale={}", "train.finetune.per_arch={}",
    "train.transfer.epochs=1", "train.finetune.epochs=3", "train.finetune.lr=3e-3", "train.transfer.batch_size=20",
    "train.finetune.batch_size=20", 'metrics.sample_set="all"', 'metrics.ranking_sample_set="all"',
    "metrics.n_boot=20", "metrics.min_per_class=1", 'attribution.layers=["stride16"]', "attribution.batch_size=20",
    "baselines.seeds=2",  # three fine-tuned models per study: the verdicts resample the training seed
]


@pytest.fixture(scope="module")
def triple(tmp_path_factory, reference_kernels):
    out = tmp_path_factory.mktemp("known")
    paths, seconds = {}, {}
    for name, cfg_file, extra in (("planted", "configs/planted.toml", ["data.confounder=1.0"]),
                                  ("twin", "configs/null.toml", []),
                                  ("placebo", "configs/null.toml", ["baselines.replica_seeds=[2000, 2001]"])):
        t0 = time.perf_counter()
        cfg = config.load(cfg_file, [*REDUCED, *extra, f'run.out="{out / name}"'])
        paths[name] = Pipeline(cfg).run()
        seconds[name] = time.perf_counter() - t0
    return paths, seconds


def test_reduced_planted_shift_is_detected_and_the_placebo_is_not(triple):
    paths, seconds = triple
    planted, twin, placebo = (ka.read_study(paths[k]) for k in ("planted", "twin", "placebo"))
    assert planted.info["strength"] == 1.0 and planted.info["strength_transfer"] == 0.0
    assert twin.info["strength"] == 0.0 and twin.info["marker_region"] == "slot"
    res = ka.judge(planted, twin, placebo)
    print(ka.verdict_markdown(res), seconds)
    assert all(res["detected"].values()), res["sentence"]
    assert not any(res["placebo_detected"].values()), res["sentence"]
    for r in res["rows"]:
        if r["study"] == "planted" and r["outcome"] in ka.PRIMARY and r["expected"] != "0":
            assert r["found"] and np.sign(r["estimate"]) == (1 if r["expected"] == "+" else -1), r
        if r["study"] == "placebo":
            assert not r["found"], r


def test_planted_and_twin_share_the_transfer_checkpoint(triple):
    """The transfer phase never sees a plate in either study: with one seed it is the same model (same logits on
    the unmarked images it trained on, same test predictions wherever no plate is painted)."""
    from drift.archive import ArchiveReader

    paths, _ = triple
    a, b = ArchiveReader(paths["planted"]), ArchiveReader(paths["twin"])
    assert a.read("models/resnet10t/transfer")["sha256"] == b.read("models/resnet10t/transfer")["sha256"]


def test_one_architecture_gets_its_systematic_verdict(triple):
    """A single-architecture run with replicas is judged too (systematic drift beyond seed noise, Holm over its
    methods and metrics); no reversal is tested with one architecture."""
    from drift.archive import ArchiveReader

    paths, _ = triple
    judged = ArchiveReader(paths["planted"]).read("baselines/ranking")
    ps = [v["p_holm"] for by_metric in judged["finetune"]["systematic"]["resnet10t"].values()
          for v in by_metric.values()]
    assert len(ps) == 2 * 3 and all(0 <= p <= 1 for p in ps)
    assert "reversal" not in judged["finetune"] and "seed noise" in str(judged["verdict"])


def test_the_verdicts_layer_is_chosen_and_a_missing_one_named(triple):
    """``read_study(layer=...)`` reads that CAM layer's cell (here the one stored, so the same arrays as the
    primary cell); a layer the run did not compute is refused, naming the archive and the layers it has."""
    paths, _ = triple
    default, chosen = ka.read_study(paths["planted"]), ka.read_study(paths["planted"], layer="stride16")
    assert default.info["layer"] == "stride16" and default.info["layers"] == ["stride16"]
    assert chosen.info["cell"] == default.info["cell"] and "stride16" in chosen.info["cell"]
    for m in default.changes:
        for k in default.changes[m]:
            np.testing.assert_array_equal(chosen.changes[m][k], default.changes[m][k])
    with pytest.raises(ValueError, match=r"layer 'last-conv'.*stride16"):
        ka.read_study(paths["planted"], layer="last-conv")
