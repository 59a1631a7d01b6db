"""Tests of the run report (drift.report, drift.figures) and of ``drift compare``.

The archives here are written with :class:`drift.archive.Archive` following the schema in drift/archive.py (that
their layout is the one a real run writes is itself tested, :func:`test_builder_writes_the_layout_of_a_real_run`)
and filled with fresh random numbers, which lets every table meet values a tiny real run cannot produce; every
number the report prints is parsed back and checked against what was written, or against a brute-force recomputation
(iFIM gap, degenerate counts, compare flags).
"""

from __future__ import annotations

import base64
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from drift import headline, report
from drift.archive import Archive, ArchiveError, ArchiveReader, Cell
from drift.config import Config
from drift.data import SYNTHETIC_CLASSES, load_synthetic
from drift.h5tree import write_tree
from drift.metrics import HEADLINE_KEYS, metric_label

SIZE = 32
N_TEST = 13
ARCHS = ("resnet10t", "resnet18")
METHODS = ("gradcam++", "layercam")
METRICS = ("iou@05", "iou@10", "iou@20", "iou@30", "centroid_shift", "pearson", "entropy_change", "ssim",
           "gini_change")
EPS = (0.01, 0.05, 0.1)
ALPHAS = (0.5, 1.0)
N_PERT = 5
DRAWS = 2


# ============================================================================================ archive builder
def _u(gen: torch.Generator, *shape: int) -> np.ndarray:
    return torch.rand(shape, generator=gen, dtype=torch.float64).numpy()


def _ints(gen: torch.Generator, hi: int, *shape: int) -> np.ndarray:
    return torch.randint(0, hi, shape, generator=gen).numpy()


def make_config(archs=ARCHS, methods=METHODS, n_test=N_TEST, seed=0, source="synthetic", path="") -> Config:
    cfg = Config()
    cfg.run.archs = list(archs)
    cfg.run.seed = seed
    cfg.data.source = source
    cfg.data.path = path
    cfg.data.image_size = SIZE
    cfg.data.n_train, cfg.data.n_val, cfg.data.n_test = 3, 2, n_test
    cfg.attribution.methods = list(methods)
    cfg.metrics.n_boot = 200
    cfg.report.n_examples = 1
    return cfg


def build_archive(path: Path, gen: torch.Generator, archs=ARCHS, methods=METHODS, upto: str = "all",
                  seed: int = 0, drift_from: dict | None = None, cfg: Config | None = None,
                  test: dict | None = None, perturbation_archs: tuple[str, ...] | None = None,
                  logits: dict | None = None) -> dict:
    """Write a schema-following archive with random contents; return everything written (the truth).

    ``upto="train"`` stops after the training phases. ``drift_from`` (a truth dict) makes the drift summaries a
    perturbed copy of another archive's, so that some intervals overlap and some do not. Perturbation groups are
    written for ``perturbation_archs`` only (default: the first architecture), so the report also meets an iFIM
    group without them. ``logits`` ({(arch, phase): (N, C) array}) replaces the random test logits of those
    models, and their stored accuracy and macro AUC are then computed from them (see :func:`sklearn_scores`).
    """
    perturbation_archs = archs[:1] if perturbation_archs is None else perturbation_archs
    cfg = cfg or make_config(archs, methods, seed=seed)
    C = len(SYNTHETIC_CLASSES)
    images_known = test is None
    if test is None:
        t = load_synthetic(cfg.data.n_train, cfg.data.n_val, cfg.data.n_test, SIZE, seed,
                           difficulty=cfg.data.difficulty).test
        test = {"ids": np.asarray(t.ids), "labels": t.labels, "lung_masks": t.lung_masks,
                "lesion_masks": t.lesion_masks}
    n = len(test["labels"])
    truth: dict = {"test": test, "cfg": cfg, "models": {}, "drift": {}, "fisher": {}, "ranking": {}, "attr": {}}
    ar = Archive(path, cfg.to_toml(), cfg.science_hash(),
                 {"seed": seed, "git_commit": f"c0ffee{_ints(gen, 1000, 1)[0]}", "device": "cpu (test)",
                  "versions": {"python": "3.11", "torch": torch.__version__}})
    with ar.commit("data") as f:
        g = f.require_group("data")
        g.attrs["class_names"] = json.dumps(list(SYNTHETIC_CLASSES))
        write_tree(g, {"test": test, "counts": {"train": _ints(gen, 9, C), "val": _ints(gen, 9, C),
                                                 "test": np.bincount(test["labels"], minlength=C)}})
    for arch in archs:
        for phase in ("transfer", "finetune"):
            epochs = 2 + int(_ints(gen, 3, 1)[0])
            ev = {"logits": _u(gen, n, C).astype(np.float32), "labels": test["labels"],
                  "accuracy": float(_u(gen, 1)[0]), "macro_auc": float(_u(gen, 1)[0]), "f1": _u(gen, C),
                  "confusion": _ints(gen, 20, C, C)}
            if logits is not None and (arch, phase) in logits:
                ev["logits"] = np.asarray(logits[(arch, phase)], dtype=np.float32)
                ev["accuracy"], ev["macro_auc"] = sklearn_scores(ev["logits"], test["labels"])
            hist = {k: _u(gen, epochs) for k in ("train_loss", "val_loss", "val_accuracy", "val_auc", "seconds")}
            hist["epoch"] = np.arange(epochs, dtype=np.float64)
            attrs = {"checkpoint": f"/x/{arch}-{phase}.pt", "sha256": "0" * 64, "best_epoch": int(epochs - 1),
                     "best_val_auc": float(_u(gen, 1)[0]), "bn_frozen": True, "weights": "random init",
                     "seconds": float(100 * _u(gen, 1)[0])}
            name = f"models/{arch}/{phase}"
            with ar.commit(name) as f:
                g = f.require_group(name)
                write_tree(g, {"history": hist, "test": ev})
                g.attrs.update(attrs)
            truth["models"][(arch, phase)] = {"test": ev, **attrs}
    if upto == "train":
        return truth
    cell = primary_cell(cfg)
    for arch in archs:
        tree = {st: {m: (_u(gen, n, 3, 3) * 2).astype(np.float16) for m in methods} for st in ("transfer", "finetune")}
        truth["attr"][arch] = tree
        with ar.commit(f"attributions/{arch}") as f:
            g = f.require_group(f"attributions/{arch}")
            write_tree(g, {cell.layer: {cell.score: tree}, "targets": {st: test["labels"] for st in tree}})
            g.attrs.update({"target": "true", "eps": 0.0})
            g[cell.layer].attrs.update({"module": "layer4.1.conv2", "keras": "", "grid": [3, 3]})
    for arch in archs:
        tree = {}
        for method in methods:
            per = {m: _u(gen, n) for m in METRICS}
            valid = _u(gen, n) > 0.15
            selected = _u(gen, n) > 0.2
            summary = {}
            for m in METRICS:
                if drift_from is not None:
                    a = drift_from["drift"][(arch, method)]["summary"][m]
                    shift = (0.0 if _u(gen, 1)[0] < 0.5 else 0.5) * (_u(gen, 1)[0] - 0.5)
                    mean, lo, hi = a["mean"] + shift, a["lo"] + shift, a["hi"] + shift
                else:
                    mean = float(_u(gen, 1)[0])
                    lo, hi = mean - 0.1 * float(_u(gen, 1)[0]), mean + 0.1 * float(_u(gen, 1)[0])
                summary[m] = {"mean": mean, "lo": lo, "hi": hi, "per_class": _u(gen, C),
                              "n_per_class": _ints(gen, 5, C), "n_excluded": int(_ints(gen, 3, 1)[0]), "ci": 0.95,
                              "n_boot": 200, "seed": seed}
            summary["paired"] = {"entropy": {"median_diff": float(_u(gen, 1)[0]) - 0.5, "statistic": 4.0,
                                             "pvalue": float(_u(gen, 1)[0]), "n": n, "n_excluded": 0}}
            deg = {"transfer": _ints(gen, 4, n), "finetune": _ints(gen, 4, n)}
            tree[method] = {"per_sample": {**per, "ids": test["ids"], "labels": test["labels"], "valid": valid,
                                           "selected": selected}, "degenerate": deg, "summary": summary}
        truth["drift"].update({(arch, m): tree[m] for m in methods})
        with ar.commit(f"drift/{arch}") as f:
            write_tree(f.require_group(cell.drift_path(arch)), tree)
            g = f.require_group(f"drift/{arch}")
            g.attrs["sample_set"] = "tp_both"
            g.attrs["n_selected"] = 9
        tree = {}
        for phase in ("transfer", "finetune"):
            r = 4
            eig = np.sort(_u(gen, 8, r), axis=1)[:, ::-1]
            x = _u(gen, N_PERT, 1, SIZE, SIZE)
            x_high = _u(gen, N_PERT, 1, SIZE, SIZE) - 0.5
            pert = {"kinds": np.array(["high", "complement", "random"], dtype="S"),
                    "removal_kinds": np.array(["high", "complement"], dtype="S"), "eps": np.asarray(EPS),
                    "alphas": np.asarray(ALPHAS), "valid": np.r_[_u(gen, N_PERT - 1) > 0.2, True],
                    "abs_conf_change": _u(gen, 3, len(EPS), N_PERT, DRAWS) * np.array([3.0, 1.0, 1.0])[:, None, None,
                                                                                          None],
                    "conf_change": _u(gen, 3, len(EPS), N_PERT, DRAWS) - 0.5,
                    "kl": _u(gen, 3, len(EPS), N_PERT, DRAWS) * 1e-3, "kl_pred": _u(gen, 3, len(EPS), N_PERT, DRAWS),
                    "removal_abs_conf_change": _u(gen, 2, len(ALPHAS), N_PERT, DRAWS)}
            tree[phase] = {"eigenvalues": eig, "eigen_share": eig / eig.sum(1, keepdims=True),
                           "rank": _ints(gen, 5, 8), "probs": _u(gen, 8, C), "ids": test["ids"][:8],
                           "components": {"ids": test["ids"][:N_PERT], "x": x.astype(np.float16), "x_high": x_high,
                                          "x_low": x - x_high, "k": _ints(gen, 4, N_PERT),
                                          "energy_share": _u(gen, N_PERT)},
                           **({"perturbation": pert} if arch in perturbation_archs else {}),
                           "summary": {"area_abs_conf_change": _u(gen, 3), "wilcoxon_pvalue": float(_u(gen, 1)[0]),
                                       "kl_ratio_small_eps": float(_u(gen, 1)[0])}}
        truth["fisher"].update({(arch, st): tree[st] for st in tree})
        with ar.commit(f"fisher/{arch}") as f:
            write_tree(f.require_group(f"fisher/{arch}"), tree)
    tree = {}
    for metric in ("iou@20", "centroid_shift"):
        order = [archs[i] for i in np.argsort(_u(gen, len(archs)))]
        tau = float(_u(gen, 1)[0] * 2 - 1)
        rev = bool(_u(gen, 1)[0] > 0.5)
        tree[metric] = {"rankings": {m: json.dumps(order if i == 0 or not rev else order[::-1])
                                     for i, m in enumerate(methods)},
                        "means": {m: {a: float(_u(gen, 1)[0]) for a in archs} for m in methods},
                        "kendall_tau": {" vs ".join(methods): tau},
                        "reverses": {" vs ".join(methods): rev}, "fully_reversed": {" vs ".join(methods): rev},
                        "p_reverse": {" vs ".join(methods): float(_u(gen, 1)[0])},
                        "p_fully_reversed": {" vs ".join(methods): float(_u(gen, 1)[0])},
                        "higher_is_stable": metric != "centroid_shift", "absolute": False}
    truth["ranking"] = tree
    reader = ArchiveReader(path)
    numbers = headline.compute(reader)
    examples = headline.examples(reader, t.images, cfg.report.n_examples) if images_known else {}
    truth["examples"], truth["split"] = examples, t if images_known else None
    with ar.commit("stats") as f:
        write_tree(f.require_group(f"stats/ranking/{cell.key}"), tree)
        write_tree(f["stats"], {"headline": numbers, "examples": examples})
        f["stats"].attrs.update({"ranking_sample_set": "tp_all", "n_ranked": 7, "n_ranked_per_class": json.dumps(
            [1, 2, 1, 2, 1]), "min_per_class": 1, "verdict": "a sentence"})
    return truth


def primary_cell(cfg: Config) -> Cell:
    return Cell(cfg.attribution.layers[0], cfg.attribution.scores[0], cfg.metrics.normalize[0])


def sklearn_scores(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Accuracy and macro one-vs-rest AUC (over the classes present; NaN with fewer than two), by sklearn."""
    from sklearn.metrics import accuracy_score, roc_auc_score

    probs = scipy.special.softmax(np.asarray(logits, dtype=np.float64), axis=1)
    present = sorted(set(np.asarray(labels).tolist()))
    auc = float(np.mean([roc_auc_score(labels == c, probs[:, c]) for c in present])) if len(present) > 1 \
        else float("nan")
    return float(accuracy_score(labels, np.asarray(logits).argmax(1))), auc


def _fresh_gen() -> torch.Generator:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"module seed={seed}")
    return torch.Generator().manual_seed(seed)


_FULL: dict = {}


def full_report(tmp_path_factory) -> tuple[Path, dict, Path]:
    """A complete archive and its report, written once per session (the browser test reuses it): read-only."""
    if "full" not in _FULL:
        d = tmp_path_factory.mktemp("full")
        truth = build_archive(d / "archive.h5", _fresh_gen())
        _FULL["full"] = d, truth, report.write_report(d / "archive.h5", d / "report")
    return _FULL["full"]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return full_report(tmp_path_factory)


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    d = tmp_path_factory.mktemp("partial")
    truth = build_archive(d / "archive.h5", _fresh_gen(), upto="train")
    return d, truth, report.write_report(d / "archive.h5", d / "report")


# ============================================================================================ parsing helpers
class _Tables(HTMLParser):
    """Cells of every <table id=...>, the ids of <section>s and <figure>s, and the <img> sources."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.sections: list[str] = []
        self.figures: list[str] = []
        self.imgs: list[str] = []
        self.notes: list[str] = []
        self._table = None
        self._cell = None
        self._note = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id")
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []
        elif tag == "section":
            self.sections.append(a.get("id"))
        elif tag == "figure":
            self.figures.append(a.get("id"))
        elif tag == "img":
            self.imgs.append(a.get("src", ""))
        elif tag == "p" and a.get("class") == "note":
            self._note = []

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "p" and self._note is not None:
            self.notes.append("".join(self._note))
            self._note = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._note is not None:
            self._note.append(data)


def parse_html(path: Path) -> _Tables:
    p = _Tables()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def rows_by(table: list[list[str]], n_key: int) -> dict[tuple, list[str]]:
    """Body rows of a parsed table keyed by their first ``n_key`` cells."""
    return {tuple(r[:n_key]): r for r in table[1:]}


def close(text: str, value: float) -> bool:
    """The printed number matches the value to the report's precision (3 decimals, or 3 significant digits)."""
    if text == "nan":
        return bool(np.isnan(value))
    x = float(text)
    return abs(x - value) <= max(5.0001e-4 if abs(value) >= 1e-3 else 0.0, 5.0001e-3 * abs(value))


def interval_of(cell: str) -> tuple[float, float, float]:
    m = re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", cell.split(" (n=")[0])
    assert m, f"not an interval: {cell!r}"
    return tuple(float(v) for v in m.groups())


def brute_gap(pert: dict) -> tuple[float, np.ndarray]:
    """iFIM gap by explicit loops: per valid sample, trapezoid over eps of the draw-mean |change|, high - complement."""
    v, eps, valid = pert["abs_conf_change"], np.asarray(pert["eps"]), pert["valid"]
    diffs = []
    for i in range(v.shape[2]):
        if not valid[i]:
            continue
        areas = []
        for kind in (0, 1):
            y = [np.mean(v[kind, e, i, :]) for e in range(len(eps))]
            areas.append(sum((eps[e + 1] - eps[e]) * (y[e] + y[e + 1]) / 2 for e in range(len(eps) - 1)))
        diffs.append(areas[0] - areas[1])
    d = np.asarray(diffs)
    return float(d.mean()), d


# ============================================================================================ report tests
SECTIONS = ("answer", "classification", "drift", "degenerate", "ranking", "examples", "fisher", "data", "overview",
            "configuration", "provenance")


def test_html_has_every_section_and_an_image_per_figure(full):
    d, truth, html_path = full
    assert html_path == d / "report" / "report.html"
    page = parse_html(html_path)
    assert list(page.sections) == list(SECTIONS)
    expected = {"fig-history", "fig-distributions", "fig-iou-k", "fig-spectra", "fig-perturbation",
                *[f"fig-examples-{a}" for a in ARCHS], *[f"fig-components-{a}" for a in ARCHS]}
    assert set(page.figures) == expected
    assert len(page.imgs) == len(expected)
    pngs = {p.stem for p in (d / "report" / "figures").glob("*.png")}
    assert pngs == expected
    for src in page.imgs:  # embedded, decodable PNGs identical to the files beside the Markdown
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1])
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
    files = {(d / "report" / "figures" / f"{f}.png").read_bytes() for f in expected}
    assert {base64.b64decode(s.split(",", 1)[1]) for s in page.imgs} == files
    # the example images are stored in the archive: no note says otherwise
    assert not [n for n in page.notes if "no example images" in n]
    assert "n_test = 13" in html_path.read_text()  # the TOML configuration is in the page


def test_markdown_links_resolve(full):
    d, _, _ = full
    md = (d / "report" / "report.md").read_text()
    links = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", md)
    assert len(links) == 9
    for link in links:
        assert (d / "report" / link).is_file(), link
    for sec in ("## Configuration", "## Provenance", "## Classification", "## Degenerate maps", "## Rank reversal"):
        assert sec in md


def test_tables_equal_the_archive(full):
    d, truth, html_path = full
    t = parse_html(html_path).tables
    cls = rows_by(t["tbl-classification"], 2)
    f1 = rows_by(t["tbl-f1"], 2)
    for (arch, phase), m in truth["models"].items():
        row = cls[(arch, phase)]
        assert close(row[2], m["test"]["accuracy"]) and close(row[3], m["test"]["macro_auc"])
        assert int(row[4]) == m["best_epoch"] + 1 and close(row[5], m["best_val_auc"])
        assert all(close(c, v) for c, v in zip(f1[(arch, phase)][2:], m["test"]["f1"], strict=True))
        conf = t[f"tbl-confusion-{arch}-{phase}"]
        assert conf[0][1:] == list(SYNTHETIC_CLASSES)
        np.testing.assert_array_equal(np.asarray([[int(c) for c in r[1:]] for r in conf[1:]]), m["test"]["confusion"])
    full_rows = rows_by(t["tbl-drift"], 3)
    head = rows_by(t["tbl-drift-headline"], 2)
    per_class = rows_by(t["tbl-drift-per-class"], 3)
    deg = rows_by(t["tbl-degenerate"], 3)
    assert t["tbl-drift-headline"][0][3:] == ["IoU@20%", "centroid shift", "Pearson r", "entropy change"]
    for (arch, method), g in truth["drift"].items():
        for metric in METRICS:
            s = g["summary"][metric]
            row = full_rows[(arch, method, metric)]
            assert close(row[3], s["mean"]) and close(row[4], s["lo"]) and close(row[5], s["hi"]), (row, s)
            assert int(row[6]) == s["n_per_class"].sum() and int(row[7]) == s["n_excluded"]
            assert all(close(c, v) for c, v in zip(per_class[(arch, method, metric)][3:], s["per_class"],
                                                   strict=True))
        for j, metric in enumerate(("iou@20", "centroid_shift", "pearson", "entropy_change")):
            s = g["summary"][metric]
            mean, lo, hi = interval_of(head[(arch, method)][3 + j])
            assert close(str(mean), s["mean"]) and close(str(lo), s["lo"]) and close(str(hi), s["hi"])
        for phase in ("transfer", "finetune"):
            codes = g["degenerate"][phase]
            brute = [sum(1 for c in codes if c == k) for k in (1, 2, 3)]
            row = deg[(arch, method, phase)]
            assert [int(c) for c in row[3:6]] == brute
            assert int(row[6]) == sum(brute) and int(row[7]) == len(codes)
    kendall = rows_by(t["tbl-kendall"], 2)
    ranking = rows_by(t["tbl-ranking"], 2)
    for metric, rr in truth["ranking"].items():
        pair = " vs ".join(METHODS)
        assert close(kendall[(metric, pair)][2], rr["kendall_tau"][pair])
        assert kendall[(metric, pair)][3] == ("yes" if rr["reverses"][pair] else "no")
        for m in METHODS:
            assert ranking[(metric, m)][2] == " > ".join(json.loads(rr["rankings"][m]))
    fisher = rows_by(t["tbl-fisher"], 2)
    for (arch, phase), f in truth["fisher"].items():
        row = fisher[(arch, phase)]
        assert int(row[2]) == 8 and close(row[3], f["eigen_share"][:, 0].mean())
        assert abs(float(row[4]) - f["rank"].mean()) <= 0.005 + 1e-12  # printed to 2 decimals; x.xx5 rounds either way
        assert all(close(row[6 + j], f["summary"]["area_abs_conf_change"][j]) for j in range(3))
        if "perturbation" not in f:
            assert row[5] == "0" and row[9] == "nan [nan, nan]"
            continue
        gap, diffs = brute_gap(f["perturbation"])
        assert int(row[5]) == len(diffs)
        mean, lo, hi = interval_of(row[9])
        assert close(str(mean), gap) and lo <= mean + 1e-3 and hi >= mean - 1e-3
        assert diffs.min() - 1e-3 <= lo and hi <= diffs.max() + 1e-3
    prov = rows_by(t["tbl-provenance"], 1)
    assert prov[("seed",)][1] == "0" and prov[("device",)][1] == "cpu (test)"
    steps = rows_by(t["tbl-commits"], 1)
    assert {"data", "stats", *[f"drift/{a}" for a in ARCHS]} <= {k[0] for k in steps}


def test_partial_archive_renders_and_says_what_is_missing(partial):
    d, truth, html_path = partial
    page = parse_html(html_path)
    assert list(page.sections) == list(SECTIONS)
    notes = " ".join(page.notes)
    assert "incomplete" in notes
    for arch in ARCHS:
        for step in (f"attributions/{arch}", f"drift/{arch}", f"fisher/{arch}"):
            assert step in notes
    assert "stats" in notes
    assert set(page.figures) == {"fig-history"} and len(page.imgs) == 1
    cls = rows_by(page.tables["tbl-classification"], 2)
    for key, m in truth["models"].items():
        assert close(cls[key][2], m["test"]["accuracy"])
    assert "tbl-drift" not in page.tables
    md = (d / "report" / "report.md").read_text()
    assert "> **Note:**" in md and all((d / "report" / p).is_file() for p in re.findall(r"\]\(([^)]+)\)", md))


def test_answer_comes_first_and_equals_the_archive(full):
    """The answer section opens the report; its numbers are the stored headline numbers, checked by brute force."""
    d, truth, html_path = full
    page = parse_html(html_path)
    assert page.sections[0] == "answer"
    t = page.tables
    cls = rows_by(t["tbl-answer-classification"], 2)
    for (arch, phase), m in truth["models"].items():
        ref = brute_intervals(m["test"]["logits"], m["test"]["labels"], 200, 0)
        for col, name in ((2, "accuracy"), (3, "macro_auc")):
            value, lo, hi = interval_of(cls[(arch, phase)][col])
            assert close(str(value), m["test"][name]) and close(str(lo), ref[name][1]) and close(str(hi), ref[name][2])
    fisher = rows_by(t["tbl-answer-fisher"], 2)
    for (arch, phase), f in truth["fisher"].items():
        row = fisher[(arch, phase)]
        assert close(row[2], f["eigen_share"][:, 0].mean()) and close(row[4], f["summary"]["wilcoxon_pvalue"])
        if "perturbation" in f:
            assert close(str(interval_of(row[3])[0]), brute_gap(f["perturbation"])[0])
    ranking = rows_by(t["tbl-answer-ranking"], 2)
    pair = " vs ".join(METHODS)
    for metric, rr in truth["ranking"].items():
        assert ranking[(metric, pair)][3] == ("yes" if rr["reverses"][pair] else "no")
        assert ranking[(metric, METHODS[0])][2] == " > ".join(json.loads(rr["rankings"][METHODS[0]]))


def test_examples_are_the_stored_test_images(full, tmp_path, rng):
    d, truth, _ = full
    t = truth["split"]
    ex = ArchiveReader(d / "archive.h5").read("stats/examples")
    assert set(ex) == set(ARCHS)
    for arch in ARCHS:
        idx = ex[arch]["index"]
        assert len(idx) == 1 and list(ex[arch]["ids"]) == [t.ids[i] for i in idx]
        np.testing.assert_allclose(ex[arch]["images"], t.images(idx).numpy()[:, 0], atol=1e-3)
        usable = np.ones(N_TEST, bool)
        for m in METHODS:
            ps = truth["drift"][(arch, m)]["per_sample"]
            usable &= ps["selected"] & ps["valid"]
        assert list(idx) == headline.pick_examples(t.labels, usable if usable.any() else ~usable, 1)
    # without stored images the maps are shown alone, with a note
    test = {"ids": np.asarray(t.ids), "labels": t.labels}
    build_archive(tmp_path / "a.h5", rng, archs=("resnet10t",), test=test)
    section = report.examples.sections(report.Run.open(tmp_path / "a.h5"))[0]
    notes = [b.text for b in section.blocks if isinstance(b, report.Text) and b.kind == "note"]
    assert any("no example images" in n for n in notes)
    assert [b.id for b in section.blocks if isinstance(b, report.Figure)] == ["fig-examples-resnet10t"]


def test_pick_examples_matches_round_robin(rng):
    for _ in range(20):
        n = int(torch.randint(1, 40, (1,), generator=rng))
        labels = torch.randint(0, 5, (n,), generator=rng).numpy()
        usable = torch.rand(n, generator=rng).numpy() > 0.4
        k = int(torch.randint(0, 12, (1,), generator=rng))
        per_class = {c: [i for i in range(n) if labels[i] == c and usable[i]] for c in sorted(set(labels.tolist()))}
        brute = []
        for depth in range(n):
            for c in per_class:
                if depth < len(per_class[c]):
                    brute.append(per_class[c][depth])
        assert headline.pick_examples(labels, usable, k) == brute[:k]
    with pytest.raises(ValueError, match="labels"):
        headline.pick_examples(np.zeros(3, int), np.ones(4, bool), 1)
    with pytest.raises(ValueError, match="n must"):
        headline.pick_examples(np.zeros(3, int), np.ones(3, bool), -1)


def test_confidence_gap_matches_loops(rng):
    E, N, m = 4, 17, 3
    pert = {"kinds": np.array(["high", "complement", "random"], dtype="S"),
            "eps": np.sort(torch.rand(E, generator=rng, dtype=torch.float64).numpy()),
            "abs_conf_change": torch.rand(3, E, N, m, generator=rng, dtype=torch.float64).numpy(),
            "valid": torch.rand(N, generator=rng).numpy() > 0.3}
    pert["valid"][0] = True
    seed = int(torch.randint(0, 1000, (1,), generator=rng))
    gap, lo, hi, n = headline.confidence_gap(pert, n_boot=500, seed=seed)
    ref, diffs = brute_gap(pert)
    assert n == len(diffs) and gap == pytest.approx(ref, rel=1e-12, abs=1e-12)
    # the documented resampling protocol, written out
    idx = np.random.default_rng(seed).integers(0, len(diffs), size=(500, len(diffs)))
    boot = np.array([diffs[row].mean() for row in idx])
    assert (lo, hi) == pytest.approx(tuple(np.percentile(boot, [2.5, 97.5])), rel=1e-12, abs=1e-12)
    with pytest.raises(ValueError, match="abs_conf_change must have shape"):
        headline.confidence_gap({**pert, "eps": pert["eps"][:2]})
    with pytest.raises(KeyError, match="kinds"):
        headline.confidence_gap({k: v for k, v in pert.items() if k != "kinds"})


def test_bad_arguments_are_named(tmp_path, full):
    d, _, _ = full
    with pytest.raises(TypeError, match="archive"):
        report.write_report(12, tmp_path)
    with pytest.raises(ArchiveError, match="not found"):
        report.write_report(tmp_path / "none.h5", tmp_path / "r")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="out_dir"):
        report.write_report(d / "archive.h5", tmp_path / "file")


# ============================================================================================ compare
def _md_tables(md: str) -> dict[str, list[list[str]]]:
    """Markdown pipe tables keyed by the heading just above them."""
    out, title = {}, None
    for line in md.splitlines():
        if line.startswith("## "):
            title = line[3:]
            out[title] = []
        elif line.startswith("|") and title is not None and not line.startswith("|---"):
            out[title].append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return out


def _table_starting(tables: dict, prefix: str) -> list[list[str]]:
    return next(v for k, v in tables.items() if k.startswith(prefix))


def test_compare_differences_and_flags(tmp_path, rng, full):
    d, ta, _ = full
    tb = build_archive(tmp_path / "b.h5", rng, drift_from=ta)
    text = report.compare(d / "archive.h5", tmp_path / "b.h5", tmp_path / "cmp.md")
    assert str(d / "archive.h5") in text and str(tmp_path / "b.h5") in text
    tables = _md_tables((tmp_path / "cmp.md").read_text())
    drift = rows_by(_table_starting(tables, "Drift headline"), 3)
    labels = {k: metric_label(k) for k in HEADLINE_KEYS}
    for (arch, method), g in ta["drift"].items():
        for metric in labels:
            a, b = g["summary"][metric], tb["drift"][(arch, method)]["summary"][metric]
            row = drift[(arch, method, labels[metric])]
            assert close(row[5], b["mean"] - a["mean"])
            brute = not (a["lo"] <= b["hi"] and b["lo"] <= a["hi"])
            assert row[6] == ("yes" if brute else "no"), (row, a, b)
            assert close(str(interval_of(row[3])[0]), a["mean"]) and close(str(interval_of(row[4])[2]), b["hi"])
    cls = rows_by(_table_starting(tables, "Classification"), 2)
    for key, m in ta["models"].items():
        mb = tb["models"][key]["test"]
        assert close(cls[key][4], mb["accuracy"] - m["test"]["accuracy"])
        assert close(cls[key][8], mb["macro_auc"] - m["test"]["macro_auc"])
        assert cls[key][5] in ("yes", "no") and cls[key][9] in ("yes", "no")
    fisher = rows_by(_table_starting(tables, "iFIM gap"), 2)
    assert set(fisher) == {k for k, f in ta["fisher"].items() if "perturbation" in f}
    for key in fisher:
        ga, _ = brute_gap(ta["fisher"][key]["perturbation"])
        gb, _ = brute_gap(tb["fisher"][key]["perturbation"])
        row = fisher[key]
        assert close(row[4], gb - ga)
        ia, ib = interval_of(row[2]), interval_of(row[3])
        assert row[5] in ("yes", "no")
        # flags from the printed intervals agree unless an endpoint pair is equal to print precision
        if min(abs(ib[1] - ia[2]), abs(ia[1] - ib[2])) > 2e-3:
            assert row[5] == ("yes" if (ib[1] > ia[2] or ib[2] < ia[1]) else "no")
    rank = rows_by(_table_starting(tables, "Ranking"), 2)
    pair = " vs ".join(METHODS)
    for metric, rr in ta["ranking"].items():
        rb = tb["ranking"][metric]
        assert abs(float(rank[(metric, pair)][4]) - (rb["kendall_tau"][pair] - rr["kendall_tau"][pair])) <= 0.005
        assert rank[(metric, pair)][5] == ("yes" if rr["reverses"][pair] != rb["reverses"][pair] else "no")
        for m in METHODS:
            same = json.loads(rr["rankings"][m]) == json.loads(rb["rankings"][m])
            assert rank[(metric, m)][5] == ("no" if same else "yes")


def brute_intervals(logits: np.ndarray, labels: np.ndarray, n_boot: int, seed: int) -> dict[str, tuple]:
    """Accuracy and macro AUC with their bootstrap intervals by loops: the documented resampling, one resample at a
    time, scored by sklearn; resamples with fewer than two classes are left out of the AUC quantiles."""
    idx = np.random.default_rng(seed).integers(0, len(labels), size=(n_boot, len(labels)))
    boot = np.array([sklearn_scores(logits[row], labels[row]) for row in idx])
    acc, auc = sklearn_scores(logits, labels)
    aucs = boot[np.isfinite(boot[:, 1]), 1]
    return {"accuracy": (acc, *np.percentile(boot[:, 0], [2.5, 97.5])),
            "macro_auc": (auc, *np.percentile(aucs, [2.5, 97.5]))}


def test_classification_intervals_match_loops(rng):
    C = len(SYNTHETIC_CLASSES)
    for n in (40, 9, 1):
        labels = torch.randint(0, C, (n,), generator=rng).numpy()
        labels[:2] = [0, 1][:n]  # at least two classes where n > 1
        logits = torch.randn(n, C, generator=rng, dtype=torch.float64).numpy().round(1)  # ties in the scores
        logits[np.arange(n), labels] += float(torch.rand(1, generator=rng)) * 2
        seed = int(torch.randint(0, 1000, (1,), generator=rng))
        got = headline.classification_intervals(logits, labels, n_boot=300, seed=seed)
        ref = brute_intervals(logits, labels, 300, seed) if n > 1 else None
        for m in ("accuracy", "macro_auc"):
            if ref is None:  # one sample: accuracy is defined, AUC is not
                assert np.isnan(got["macro_auc"]).all() if m == "macro_auc" else got[m][1] == got[m][2] == got[m][0]
                continue
            assert got[m] == pytest.approx(ref[m], rel=1e-12, abs=1e-12), (n, m)
    none = headline.classification_intervals(logits, labels, n_boot=0)
    assert np.isnan(none["accuracy"][1:]).all() and np.isfinite(none["accuracy"][0])
    with pytest.raises(ValueError, match="logits must have shape"):
        headline.classification_intervals(logits[:, :, None], labels)


def _compare_classification(tmp_path, rng, logits_a: dict, logits_b: dict, labels: np.ndarray, n_boot: int = 100
                            ) -> tuple[dict, dict, dict]:
    """Two archives on one test set with the given test logits, compared; the parsed classification rows."""
    test = {"ids": np.asarray([f"img{i:04d}.png" for i in range(len(labels))]), "labels": labels}
    archs = tuple(sorted({a for a, _ in logits_a}))
    cfg = make_config(archs, n_test=len(labels), seed=7)
    cfg.metrics.n_boot = n_boot
    ta = build_archive(tmp_path / "a.h5", rng, archs=archs, test=test, upto="train", logits=logits_a, cfg=cfg, seed=7)
    tb = build_archive(tmp_path / "b.h5", rng, archs=archs, test=test, upto="train", logits=logits_b, cfg=cfg, seed=7)
    report.compare(tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "cmp.md")
    tables = _md_tables((tmp_path / "cmp.md").read_text())
    return ta, tb, rows_by(_table_starting(tables, "Classification"), 2)


def _check_classification_rows(ta: dict, tb: dict, rows: dict, n_boot: int = 100) -> dict:
    """Printed values, intervals and flags against sklearn loops; returns {key: (accuracy flag, AUC flag)}."""
    flags = {}
    for key in ta["models"]:
        row = rows[key]
        ev_a, ev_b = ta["models"][key]["test"], tb["models"][key]["test"]
        ref_a = brute_intervals(ev_a["logits"], ev_a["labels"], n_boot, 7)
        ref_b = brute_intervals(ev_b["logits"], ev_b["labels"], n_boot, 7)
        for m, (ca, cb, cd, cf) in (("accuracy", (2, 3, 4, 5)), ("macro_auc", (6, 7, 8, 9))):
            ia, ib = interval_of(row[ca]), interval_of(row[cb])
            assert all(close(str(v), r) for v, r in zip(ia, ref_a[m], strict=True)), (row, ref_a[m])
            assert all(close(str(v), r) for v, r in zip(ib, ref_b[m], strict=True)), (row, ref_b[m])
            assert close(row[cd], ev_b[m] - ev_a[m])
            (_, alo, ahi), (_, blo, bhi) = ref_a[m], ref_b[m]
            assert row[cf] == ("yes" if (blo > ahi or bhi < alo) else "no"), (row, ref_a[m], ref_b[m])
        flags[key] = (row[5], row[9])
    return flags


def test_compare_flags_a_clear_accuracy_difference(tmp_path, rng):
    n, C = 240, len(SYNTHETIC_CLASSES)
    labels = torch.randint(0, C, (n,), generator=rng).numpy()
    onehot = np.eye(C)[labels]
    noise = lambda: torch.randn(n, C, generator=rng, dtype=torch.float64).numpy()  # noqa: E731
    keys = [("resnet10t", s) for s in ("transfer", "finetune")]
    good = {k: noise() + 4 * onehot for k in keys}  # accuracy near 1, AUC near 1
    poor = {k: noise() for k in keys}  # accuracy near 1/C, AUC near 0.5
    ta, tb, rows = _compare_classification(tmp_path, rng, good, poor, labels)
    for key, m in ta["models"].items():
        assert m["test"]["accuracy"] - tb["models"][key]["test"]["accuracy"] > 0.3
    flags = _check_classification_rows(ta, tb, rows)
    assert flags == {k: ("yes", "yes") for k in keys}


def test_compare_does_not_flag_nearly_identical_runs(tmp_path, rng):
    n, C = 240, len(SYNTHETIC_CLASSES)
    labels = torch.randint(0, C, (n,), generator=rng).numpy()
    onehot = np.eye(C)[labels]
    noise = lambda s: s * torch.randn(n, C, generator=rng, dtype=torch.float64).numpy()  # noqa: E731
    keys = [("resnet10t", s) for s in ("transfer", "finetune")]
    a = {k: noise(1.0) + onehot for k in keys}  # a middling classifier, accuracy about 0.6
    b = {k: v + noise(1e-3) for k, v in a.items()}  # the same up to a few flipped near-ties
    ta, tb, rows = _compare_classification(tmp_path, rng, a, b, labels)
    for key, m in ta["models"].items():
        assert abs(m["test"]["accuracy"] - tb["models"][key]["test"]["accuracy"]) <= 0.02
    flags = _check_classification_rows(ta, tb, rows)
    assert flags == {k: ("no", "no") for k in keys}


def test_compare_refuses_other_classes_or_samples(tmp_path, rng):
    a = tmp_path / "a.h5"
    build_archive(a, rng, archs=("resnet10t",), upto="train")
    b = tmp_path / "b.h5"
    build_archive(b, rng, archs=("resnet10t",), upto="train")
    report.compare(a, b)  # same test set and classes: comparable
    with Archive(b).commit("data") as f:
        f["data"].attrs["class_names"] = json.dumps(["a", "b", "c", "d", "e"])
    with pytest.raises(ValueError, match="class names") as err:
        report.compare(a, b)
    assert str(a) in str(err.value) and str(b) in str(err.value)
    c = tmp_path / "c.h5"
    build_archive(c, rng, archs=("resnet10t",), upto="train", cfg=make_config(("resnet10t",), n_test=N_TEST + 2))
    with pytest.raises(ValueError, match="different test samples") as err:
        report.compare(a, c)
    assert str(a) in str(err.value) and str(c) in str(err.value)


# ============================================================================================ figures


# ============================================================================================ the builder's layout
def _layout(path: Path) -> dict[str, tuple]:
    """Every group and dataset of an archive: path -> ("group", attribute names) or ("dataset", dtype kind, rank,
    attribute names)."""
    import h5py

    out: dict[str, tuple] = {}

    def visit(name: str, obj) -> None:
        if isinstance(obj, h5py.Group):
            out[name] = ("group", frozenset(obj.attrs))
        else:
            out[name] = ("dataset", obj.dtype.kind, obj.ndim, frozenset(obj.attrs))

    with h5py.File(path) as f:
        f.visititems(visit)
        out["/"] = ("group", frozenset(f.attrs))
    return out


def test_builder_writes_the_layout_of_a_real_run(tmp_path, rng):
    """The random archives of these tests follow the writer: every group, dataset and attribute that
    :func:`build_archive` writes is where a real run (:class:`drift.pipeline.Pipeline`, same architectures,
    methods and protocol cell, one epoch) writes it, as the same kind of object, dtype kind and rank."""
    from drift.pipeline import Pipeline

    real, built = make_config(), make_config()
    real.attribution.layers = built.attribution.layers = ["block"]  # random 2 x 2 last-conv maps are all zero
    real.run.out, real.run.progress = str(tmp_path / "real"), False
    real.data.image_size, real.data.n_train, real.data.n_val = 64, 10, 5
    real.model.weights = "none"
    for phase in (real.train.transfer, real.train.finetune):
        phase.epochs, phase.batch_size = 1, 5
    real.metrics.sample_set, real.metrics.ranking_sample_set = "all", "all"
    real.metrics.min_per_class, real.metrics.n_boot = 1, 20
    real.fisher.n_spectrum, real.fisher.n_components, real.fisher.batch_size = 3, 2, 2
    real.fisher.eps_grid, real.fisher.alphas = [0.05], [1.0]
    real.report.enabled = False
    want = _layout(Pipeline(real).run())
    build_archive(tmp_path / "built.h5", _fresh_gen(), cfg=built, perturbation_archs=ARCHS)
    got = _layout(tmp_path / "built.h5")
    missing = sorted(p for p in got if p not in want)
    assert not missing, f"the builder writes paths a real run does not: {missing}"
    for p, g in got.items():
        w = want[p]
        assert g[:-1] == w[:-1], f"{p}: the builder writes {g[:-1]}, a real run {w[:-1]}"
        assert g[-1] <= w[-1], f"{p}: attributes {sorted(g[-1] - w[-1])} are not written by a real run"


@pytest.fixture(scope="module", autouse=True)
def _torch_references(reference_kernels):
    """Every test here, module fixtures included, on the kernels' torch references (tests/conftest.py)."""
