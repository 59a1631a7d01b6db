"""Classification details: every checkpoint's test scores, per-class F1, confusion matrices, training curves."""

from __future__ import annotations

import numpy as np

from ..summary import fmt
from .document import (
    PHASES,
    Run,
    Section,
    Table,
    Text,
    figure,
    slug,
    yes_no,
)


def _classification(run: Run) -> tuple[Section, dict]:
    s = Section("classification", "Classification")
    rows, f1_rows, conf_tables, histories = [], [], [], {}
    for arch in run.archs:
        for phase in PHASES:
            if not run.has(f"models/{arch}/{phase}/test"):
                continue
            g = run.reader.read(f"models/{arch}/{phase}")
            ev = g["test"]
            rows.append([arch, phase, fmt(ev.get("accuracy")), fmt(ev.get("macro_auc")),
                         str(int(g.get("best_epoch", -1)) + 1) if "best_epoch" in g else "-",
                         fmt(g.get("best_val_auc")), yes_no(g.get("bn_frozen")), str(g.get("weights", "-")),
                         fmt(g.get("seconds"), 1)])
            f1 = np.asarray(ev.get("f1", []), dtype=np.float64).reshape(-1)
            f1_rows.append([arch, phase, *[fmt(v) for v in f1]])
            if "confusion" in ev:
                cm = np.asarray(ev["confusion"])
                crows = [[run.class_name(i), *[str(int(v)) for v in cm[i]]] for i in range(cm.shape[0])]
                conf_tables.append(Table(f"tbl-confusion-{slug(arch)}-{phase}",
                                         f"Confusion matrix, {arch} {phase} (rows: true class, columns: predicted)",
                                         ["true \\ predicted", *[run.class_name(j) for j in range(cm.shape[1])]],
                                         crows))
            if "history" in g:
                histories.setdefault(arch, {})[phase] = g["history"]
    if not rows:
        s.blocks.append(Text("No trained checkpoint in this archive (commits models/<arch>/transfer and "
                             "models/<arch>/finetune missing): no classification results.", "note"))
        return s, histories
    s.blocks.append(Table("tbl-classification", "Test-set accuracy and macro one-vs-rest AUC per architecture and "
                          "training phase (transfer: frozen backbone, the study's stage 1; "
                          "finetune: all layers, stage 2)",
                          ["architecture", "phase", "accuracy", "macro AUC", "best epoch", "best val AUC",
                           "BN frozen", "initial weights", "train s"], rows))
    n_cls = max(len(r) - 2 for r in f1_rows)
    s.blocks.append(Table("tbl-f1", "Per-class F1 on the test set",
                          ["architecture", "phase", *[run.class_name(c) for c in range(n_cls)]], f1_rows))
    for arch in run.archs:
        for phase in PHASES:
            if not run.has(f"models/{arch}/{phase}/test"):
                s.blocks.append(Text(f"{arch} {phase}: not trained yet, no results.", "note"))
    s.blocks.extend(conf_tables)
    return s, histories




def sections(run: Run) -> list[Section]:
    from .. import figures

    s, histories = _classification(run)
    if histories:
        s.blocks.append(figure("fig-history", "Training curves: losses and validation scores per epoch, transfer "
                               "(solid) then fine-tuning (dashed).", figures.training_history(histories)))
    return [s]
