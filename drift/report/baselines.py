"""The controls of the drift numbers: drift beside its seed floor, the randomisation check, and whether the
reversal exceeds the seed noise (:mod:`drift.baselines`)."""

from __future__ import annotations

import json

import numpy as np

from ..archive import ArchiveReader, Cell
from ..summary import fmt, table
from .document import Run, Section, Table, Text, yes_no


def floor_rows(reader: ArchiveReader, cells: list[Cell] | None = None) -> tuple[list[str], list[list[str]]]:
    """The drift-against-floor table of an archive: header and rows, one per architecture, layer, method and floor
    phase (``cells``: default every layer at the primary score and normalisation), each ranking metric as
    ``drift / floor = ratio`` of macro-mean instabilities (:func:`drift.baselines.instability`) with the 95%
    interval of drift minus floor. Empty without a seed floor."""
    if cells is None:
        primary = reader.primary_cell()
        cells = [c for c in reader.cells() if c[1:] == primary[1:]]
    header, rows = ["architecture", "layer", "method", "floor"], []
    metrics: list[str] = []
    for arch in reader.keys("baselines/arch"):
        base = f"baselines/arch/{arch}/floor"
        for phase in reader.keys(base):
            for cell in cells:
                path = f"{base}/{phase}/{cell.key}"
                for method in reader.keys(path):
                    against = reader.read(f"{path}/{method}/against")
                    metrics = metrics or list(against)
                    n = sum(k.startswith("seed") for k in reader.keys(f"{path}/{method}"))
                    row = [arch, cell.layer, method, f"{phase} x{n}"]
                    for m in metrics:
                        a = against.get(m, {})
                        ex = a.get("excess", {})
                        row.append(f"{fmt(a.get('drift', {}).get('mean'))} / {fmt(a.get('floor', {}).get('mean'))}"
                                   f" = {fmt(a.get('ratio'), 2)}x [{fmt(ex.get('lo'))}, {fmt(ex.get('hi'))}]")
                    rows.append(row)
    return header + [f"{m}: drift / floor = ratio [excess 95%]" for m in metrics], rows


def randomisation_rows(reader: ArchiveReader) -> tuple[list[str], list[list[str]]]:
    """The randomisation check of an archive: header and rows (architecture, layer, score, method, mean Pearson r
    with the trained maps at each cut, flagged). Empty without the check."""
    rows, labels = [], []
    for arch in reader.keys("baselines/arch"):
        path = f"baselines/arch/{arch}/randomisation"
        if not reader.has(path):
            continue
        top = reader.read(path)
        labels = json.loads(top.get("labels", "[]")) or labels
        for layer, by_score in top.items():
            if not isinstance(by_score, dict):
                continue
            for score, by_method in by_score.items():
                for method, node in by_method.items():
                    r = np.asarray(node.get("pearson_by_cut", []), dtype=float)
                    rows.append([arch, layer, score, method, " -> ".join(fmt(x) for x in r),
                                 "FLAGGED" if yes_no(node.get("flagged")) == "yes" else "no"])
    cuts = " -> ".join(labels) if labels else "cuts"
    return ["architecture", "layer", "score", "method", f"Pearson r with the trained maps ({cuts})", "flagged"], rows


def verdict(reader: ArchiveReader) -> str:
    """The run's sentence on the seed floor ("" when the archive has none)."""
    return str(reader.read("baselines/ranking").get("verdict", "")) if reader.has("baselines/ranking") else ""


def summary_lines(reader: ArchiveReader, headline: dict | None = None) -> list[str]:
    """The summary's part on the controls: drift beside its seed floor, the randomisation check, the sentence."""
    out: list[str] = []
    header, rows = floor_rows(reader)
    if rows:
        cell = reader.primary_cell()
        out += [f"Drift TL -> FT beside its seed floor (score {cell.score}, maps {cell.norm}): macro-mean "
                "instability (1 - overlap or correlation; displacement) of TL vs FT, and of the run's model vs seed "
                "replicas of the same phase (the floor); ratio; 95% interval of drift minus floor", table(header, rows),
                ""]
    header, rows = randomisation_rows(reader)
    if rows:
        thr = next((reader.read(f"baselines/arch/{a}").get("flag_pearson") for a in reader.keys("baselines/arch")),
                   None)
        out += ["Randomisation check (cascading re-initialisation of the fine-tuned model from the head down): "
                f"a method is flagged when its maps keep r >= {fmt(thr)} with the trained maps at every cut",
                table(header, rows), ""]
    v = verdict(reader)
    if v:
        out += [v, ""]
    return out


def sections(run: Run) -> list[Section]:
    header, rows = floor_rows(run.reader)
    rheader, rrows = randomisation_rows(run.reader)
    sentence = verdict(run.reader)
    if not (rows or rrows):
        return []
    s = Section("baselines", "Is the drift real? Seed floor and randomisation check")
    if sentence:
        s.blocks.append(Text(sentence))
    if rows:
        s.blocks.append(Text(
            "The seed floor is the drift between the run's model and replicas of the same phase trained from the same "
            "starting point with other training seeds: what drift looks like with no change of phase. Each metric is "
            "read as an instability (1 - IoU or correlation; displacement as is), macro mean over classes on the "
            "drift table's images; ratio = drift / floor; the interval is a bootstrap of per-image drift minus floor "
            "(above 0: the drift exceeds the floor). The ranking by drift minus floor decides whether a reversal "
            "survives."))
        s.blocks.append(Table("tbl-floor", f"TL -> FT drift beside its seed floor per layer (score {run.cell.score}, "
                              f"maps {run.cell.norm})", header, rows))
    if rrows:
        s.blocks.append(Text(
            "Cascading randomisation (Adebayo et al., Sanity checks for saliency maps, 2018): the fine-tuned model's "
            "layers are re-initialised from the head downwards; each cut's maps are compared with the trained maps. "
            "Maps that stay similar at every cut (flagged) carry little information about the model, and so do their "
            "drift numbers."))
        s.blocks.append(Table("tbl-randomisation", "Randomisation check: mean Pearson r between the trained and the "
                              "randomised model's maps at each cut", rheader, rrows))
    return [s]
