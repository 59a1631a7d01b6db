"""Example attribution maps over the test images stored in the archive."""

from __future__ import annotations

import numpy as np

from ..headline import pick_examples
from ..summary import fmt
from .document import (
    PHASES,
    Run,
    Section,
    Text,
    figure,
    slug,
    strs,
)


def _examples(run: Run) -> Section:
    s = Section("examples", "Example attribution maps")
    from .. import figures

    n_wanted = int(run.cfg.report.n_examples) if run.cfg is not None else 4
    archs = [a for a in run.archs
             if all(run.has(f"attributions/{a}/{run.cell.layer}/{run.cell.score}/{st}") for st in PHASES)]
    for a in run.archs:
        if a not in archs:
            s.blocks.append(Text(f"{a}: no attribution maps (commit attributions/{a} missing).", "note"))
    if not archs or not run.has("data/test") or n_wanted <= 0:
        if not run.has("data/test"):
            s.blocks.append(Text("No test set in the archive: no examples to show.", "note"))
        return s
    test = run.reader.read("data/test")
    labels = np.asarray(test["labels"])
    ids = strs(test.get("ids", np.arange(len(labels))))
    size = (int(run.cfg.data.image_size),) * 2 if run.cfg is not None else (64, 64)
    if "lung_masks" in test:
        size = tuple(np.asarray(test["lung_masks"]).shape[1:])
    s.blocks.append(Text("Test images with their TL and FT maps for each method, upsampled bilinearly to the input "
                         "size and overlaid; both maps of a row share one colour scale (raw, unnormalised values), "
                         "so a change in magnitude is visible. Examples (stored by the statistics step) are the first "
                         "selected, scorable images of each class in turn."))
    for arch in archs:
        usable = np.ones(len(labels), dtype=bool)
        scores: dict[str, dict] = {}
        for method in run.reader.methods(arch) if run.has(f"drift/{arch}") else []:
            ps = run.reader.drift(arch, method)
            pos = {sid: i for i, sid in enumerate(strs(ps.get("ids", ids)))}
            ok = np.ones(len(pos), dtype=bool)
            for flag in ("selected", "valid"):
                if flag in ps:
                    ok &= np.asarray(ps[flag], dtype=bool)
            usable &= np.asarray([sid in pos and bool(ok[pos[sid]]) for sid in ids])
            scores[method] = {sid: (ps, pos[sid]) for sid in ids if sid in pos}
        stored = f"stats/examples/{arch}"
        if run.has(stored):
            ex = run.reader.read(stored)
            idx = [int(i) for i in np.asarray(ex["index"]).reshape(-1)]
            images = np.asarray(ex["images"], dtype=np.float32)
        else:
            if not usable.any():
                usable = np.ones(len(labels), dtype=bool)
            idx, images = pick_examples(labels, usable, n_wanted), None
            s.blocks.append(Text(f"{arch}: the archive stores no example images (the statistics step stores them); "
                                 "maps are shown without them.", "note"))
        base = f"attributions/{arch}/{run.cell.layer}/{run.cell.score}"
        methods = [m for m in run.methods if run.has(f"{base}/transfer/{m}") and run.has(f"{base}/finetune/{m}")]
        maps = {(m, st): run.reader.maps(arch, st, m) for m in methods for st in PHASES}
        rows = []
        for j, i in enumerate(idx):
            for m in methods:
                extra = ""
                if m in scores and ids[i] in scores[m]:
                    ps, k = scores[m][ids[i]]
                    parts = [f"{run.label(q)} {fmt(np.asarray(ps[q])[k], 2)}" for q in ("iou@20", "centroid_shift")
                             if q in ps]
                    extra = "\n" + ", ".join(parts) if parts else ""
                title = f"{ids[i]}\n{run.class_name(int(labels[i]))}, {m}{extra}"
                rows.append(figures.MapRow(title, maps[(m, "transfer")][i], maps[(m, "finetune")][i],
                                           None if images is None else images[j]))
        if rows:
            fig = figures.map_overlays(rows, size)
            s.blocks.append(figure(f"fig-examples-{slug(arch)}", f"{arch}: test images, TL and FT maps per method "
                                    "(one colour scale per row).", fig))
    return s


# ---------------------------------------------------------------------------------------------- iFIM


def sections(run: Run) -> list[Section]:
    return [_examples(run)]
