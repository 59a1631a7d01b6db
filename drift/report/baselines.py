"""The controls of the drift numbers: the systematic drift against seed noise with its verdicts, and the
randomisation check (:mod:`drift.baselines`, :mod:`drift.randomisation`)."""

from __future__ import annotations

import json
import math

import numpy as np

from ..archive import ArchiveReader, Cell
from ..summary import fmt, table
from .document import Run, Section, Table, Text, yes_no


def systematic_rows(reader: ArchiveReader, cells: list[Cell] | None = None) -> tuple[list[str], list[list[str]]]:
    """The systematic-drift table of an archive: one row per (architecture, replicated phase, layer, method,
    ranking metric): the observed drift mean_r d(TL, FT_r), the seed noise sigma^2, the systematic drift S with its
    95% interval (images and models resampled), the noise share sigma^2 / (S + sigma^2), and in the primary cell
    the Holm-adjusted p of "beyond seed noise" (:mod:`drift.verdicts`). Instabilities are squared-Euclidean readings
    of each metric (:func:`drift.stats.euclidean_instability`). Empty without seed replicas.

    ``cells``: default every layer at the primary score and normalisation."""
    primary = reader.primary_cell()
    if cells is None:
        cells = [c for c in reader.cells() if c[1:] == primary[1:]]
    header = ["architecture", "phase", "layer", "method", "instability", "models", "drift", "seed noise",
              "systematic S [95%]", "noise share", "p (Holm)"]
    rows = []
    judged = reader.read("baselines/ranking") if reader.has("baselines/ranking") else {}
    for arch in reader.keys("baselines/arch"):
        base = f"baselines/arch/{arch}/seeds"
        for phase in reader.keys(base):
            for cell in cells:
                path = f"{base}/{phase}/{cell.key}"
                for method in reader.keys(path):
                    node = reader.read(f"{path}/{method}/systematic")
                    for metric, v in node.items():
                        p = math.nan
                        if cell == primary:
                            p = (judged.get(phase, {}).get("systematic", {}).get(arch, {}).get(method, {})
                                 .get(metric, {}).get("p_holm", math.nan))
                        rows.append([arch, phase, cell.layer, method, f"{metric}: {v.get('instability', '')}",
                                     str(v.get("n_models", "")), fmt(v.get("drift")), fmt(v.get("sigma2")),
                                     f"{fmt(v.get('estimate'))} [{fmt(v.get('low'))}, {fmt(v.get('high'))}]",
                                     fmt(v.get("noise_share"), 2), fmt(p, 2)])
    return header, rows


def randomisation_rows(reader: ArchiveReader) -> tuple[list[str], list[list[str]]]:
    """The randomisation check of an archive: header and rows, one per architecture, layer, score, method and cut:
    the mean similarities of the trained and the randomised maps (Pearson, Spearman, |Spearman|, SSIM) beside the
    two nulls of the same run (Pearson of two randomised models with different seeds, and of the trained maps of
    different images), the normalised similarity and permutation p of the flag's test, the randomised model's logit
    spread, and whether the method is flagged (:mod:`drift.randomisation`). Empty without the check."""
    rows = []
    for arch in reader.keys("baselines/arch"):
        path = f"baselines/arch/{arch}/randomisation"
        if not reader.has(path):
            continue
        top = reader.read(path)
        labels = json.loads(top.get("labels", "[]"))
        refused = json.loads(top.get("refused", "[]")) or [""] * len(labels)
        spread = np.asarray(top.get("spread", [np.nan] * len(labels)), dtype=float)
        for layer, by_score in top.items():
            if not isinstance(by_score, dict):
                continue
            for score, by_method in by_score.items():
                for method, node in by_method.items():
                    flag = "FLAGGED" if yes_no(node.get("flagged")) == "yes" else "no"
                    for i, label in enumerate(labels):
                        c = node.get(f"cut{i}")
                        if c is None or refused[i]:
                            rows.append([arch, layer, score, method, label, "refused: output independent of the "
                                         f"input (logit spread {fmt(spread[i], 3)})", "", "", "", "", flag])
                            continue
                        m, t = c["mean"], c["test"]
                        rows.append([arch, layer, score, method, label,
                                     " / ".join(fmt(m.get(k)) for k in ("pearson", "spearman", "abs_spearman",
                                                                        "ssim")),
                                     fmt(c["null_seed"].get("pearson")), fmt(c["null_images"].get("pearson")),
                                     f"{fmt(t.get('normalised'))} (p {fmt(t.get('p'), 3)})", fmt(spread[i], 3), flag])
    return ["architecture", "layer", "score", "method", "cut", "trained vs random: r / rho / |rho| / SSIM",
            "null: random vs random' (r)", "null: trained, other image (r)", "normalised (permutation p)",
            "logit spread", "flagged"], rows


def randomisation_caption(reader: ArchiveReader) -> str:
    """What the randomisation table shows and how the flag is decided (its settings read from the archive)."""
    attrs = next((reader.read(f"baselines/arch/{a}") for a in reader.keys("baselines/arch")), {})
    alpha, thr = attrs.get("flag_alpha"), attrs.get("flag_normalised", attrs.get("flag_pearson"))
    return ("Randomisation check (cascading re-initialisation of the fine-tuned model from the head down, each "
            "architecture's own initialiser, BatchNorm statistics of training images): similarity of the trained and "
            "the randomised maps of the same image beside two nulls of the same run; normalised = (r - r0) / (1 - r0) "
            "with r0 the mean r of trained vs randomised maps of different images. A cut rejects when the permutation "
            f"p <= {fmt(alpha)} and normalised >= {fmt(thr)}; a method is flagged (its maps do not depend on the "
            f"weights) when every scored cut rejects: false-positive rate at most {fmt(alpha)} "
            "(docs/controls.md)")


def verdict(reader: ArchiveReader) -> str:
    """The run's sentences on the seed replicas and the whole chains ("" when the archive has neither)."""
    return " ".join(str(reader.read(g).get("verdict", "")) for g in ("baselines/ranking", "baselines/chains")
                    if reader.has(g)).strip()


def summary_lines(reader: ArchiveReader, headline: dict | None = None) -> list[str]:
    """The summary's part on the controls: systematic drift against seed noise, the randomisation check, the
    verdicts on the replicas."""
    out: list[str] = []
    header, rows = systematic_rows(reader)
    if rows:
        cell = reader.primary_cell()
        out += [f"Systematic drift against seed noise (score {cell.score}, maps {cell.norm}): S = mean d(TL, FT_r) - "
                "1/2 mean d(FT_r, FT_s) over the run's and the replicas' fine-tuned models, on squared-Euclidean "
                "instabilities; macro means over classes; interval resamples images and models; noise share = "
                "seed noise / observed drift", table(header, rows), ""]
    header, rows = randomisation_rows(reader)
    if rows:
        out += [randomisation_caption(reader), table(header, rows), ""]
    v = verdict(reader)
    if v:
        out += [v, ""]
    return out


def sections(run: Run) -> list[Section]:
    header, rows = systematic_rows(run.reader)
    rheader, rrows = randomisation_rows(run.reader)
    sentence = verdict(run.reader)
    if not (rows or rrows):
        return []
    s = Section("baselines", "Is the drift real? Systematic drift against seed noise, and the randomisation check")
    if sentence:
        s.blocks.append(Text(sentence))
    if rows:
        s.blocks.append(Text(
            "Each architecture's fine-tuning phase is rerun from the same transfer checkpoint with other training "
            "seeds. With M fine-tuned models (the run's and the replicas), the observed drift mean_r d(TL, FT_r) "
            "contains the seed noise once, and the drift between two fine-tuned models contains it twice, so the "
            "systematic drift S = mean_r d(TL, FT_r) - 1/2 mean_{r<s} d(FT_r, FT_s) is what the change of phase "
            "adds beyond retraining noise (instabilities read as squared Euclidean distances: 1 - r, 1 - Dice of "
            "the top-k sets, squared centroid shift). The interval resamples images and fine-tuned models (a "
            "delete-one-model jackknife; at least 3 models); 'beyond seed noise' needs its Holm-adjusted one-sided "
            "p at most 0.05. The noise share is the part of the observed drift that retraining alone gives. The "
            "false-positive rates and power of these verdicts are measured in docs/calibration.md."))
        s.blocks.append(Table("tbl-systematic", f"Systematic TL -> FT drift against seed noise per layer (score "
                              f"{run.cell.score}, maps {run.cell.norm})", header, rows))
    if rrows:
        s.blocks.append(Text(
            "Cascading randomisation (Adebayo et al., Sanity checks for saliency maps, 2018): the fine-tuned model's "
            "layers are re-initialised from the head downwards; each cut's maps are compared with the trained maps "
            "of the same images, beside the similarity of two randomised models (what the architecture alone makes "
            "maps share: near 1, the check has no range at that cut) and of the trained maps of different images "
            "(their input-independent component). A flagged method's maps reproduce the image content of the "
            "trained maps whatever the weights, and so do their drift numbers."))
        s.blocks.append(Table("tbl-randomisation", randomisation_caption(run.reader), rheader, rrows))
    return [s]
