"""The run itself: archive and commits, data, benchmark records, configuration and provenance (last)."""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np

from ..summary import fmt
from .document import (
    Run,
    Section,
    Table,
    Text,
    missing_commits,
    strs,
)


def _overview(run: Run) -> Section:
    s = Section("overview", "Run")
    r = run.reader
    s.blocks.append(Text(f"Archive {run.path} (schema {r.attrs.get('schema_version', '?')}, created "
                         f"{r.attrs.get('created', '?')}). Architectures: {', '.join(run.archs) or 'none'}; "
                         f"attribution methods: {', '.join(run.methods) or 'none'}; classes: "
                         f"{', '.join(run.class_names) or 'unknown'}."))
    missing = missing_commits(r)
    if run.cfg is None:
        s.blocks.append(Text(f"The stored configuration could not be read ({run.cfg_error}); sections rely on the "
                             "archive alone and cannot tell which commits are missing.", "note"))
    if missing:
        s.blocks.append(Text(f"This run is incomplete: {len(run.done)} commit(s) made, {len(missing)} missing: "
                             f"{', '.join(missing)}. Sections that depend on them say so in their place.", "note"))
    else:
        s.blocks.append(Text(f"All {len(run.done)} commits of the run are made."))
    return s


def _configuration(run: Run) -> Section:
    s = Section("configuration", "Configuration")
    text = run.reader.config_text.strip()
    s.blocks.append(Text("The full run configuration (TOML) as stored in the archive: saved to a file and passed to "
                         "drift run --config, it reproduces the run."))
    s.blocks.append(Text(text, "pre", collapsed=True) if text else Text("The archive stores no configuration.",
                                                                          "note"))
    return s


def _provenance(run: Run) -> Section:
    s = Section("provenance", "Provenance")
    a = run.reader.attrs
    rows = [[k, str(a.get(k, "-"))] for k in ("seed", "data_seed", "git_commit", "device", "created", "science_hash",
                                              "schema_version")]
    versions = a.get("versions")
    if isinstance(versions, str):
        try:
            versions = json.loads(versions)
        except json.JSONDecodeError:
            versions = {"versions": versions}
    for k, v in (versions or {}).items():
        rows.append([f"version: {k}", str(v)])
    s.blocks.append(Table("tbl-provenance", "Provenance of the run", ["item", "value"], rows))
    commits = run.reader.commits
    if commits:
        rows = [[c.get("name", "?"), fmt(c.get("seconds")), str(c.get("finished", "-")), _versions(c)]
                for c in commits]
        rows.append(["total", fmt(sum(float(c.get("seconds", 0) or 0) for c in commits)), "", ""])
        s.blocks.append(Table("tbl-commits", "The archive's commits, in order, with the seconds recorded for each, "
                              "when it finished and the versions that computed it (training time per phase is in "
                              "the classification table)", ["commit", "seconds", "finished", "computed by"], rows))
        if run.reader.integrity_note:
            s.blocks.append(Text(run.reader.integrity_note, "note"))
    else:
        s.blocks.append(Text("Nothing has been committed to this archive yet.", "note"))
    return s


def _versions(commit: dict) -> str:
    """The versions recorded with a commit (drift with its git commit, torch, timm, ...), '-' when the archive
    predates that record."""
    v = commit.get("versions")
    if not isinstance(v, dict):
        return "-"
    return ", ".join(f"{k} {v[k]}" for k in ("drift", "torch", "timm", "numpy", "h5py", "python") if k in v)


def _data(run: Run) -> Section:
    s = Section("data", "Data")
    if not run.has("data"):
        s.blocks.append(Text("No data step in this archive: the test set is unknown.", "note"))
        return s
    d = run.reader.read("data")
    counts = d.get("counts", {})
    splits = [k for k in ("train", "val", "test") if k in counts]
    rows = []
    for c, name in enumerate(run.class_names):
        rows.append([name] + [str(int(np.asarray(counts[k])[c])) if c < len(np.asarray(counts[k])) else "-"
                              for k in splits])
    rows.append(["total"] + [str(int(np.asarray(counts[k]).sum())) for k in splits])
    if splits:
        s.blocks.append(Table("tbl-data", "Images per class and split", ["class", *splits], rows))
    else:
        n = len(np.asarray(d.get("test", {}).get("labels", [])))
        s.blocks.append(Text(f"The archive stores no class counts per split; the test set has {n} images.", "note"))
    if run.cfg is not None:
        dc = run.cfg.data
        src = f"synthetic task (seed {run.cfg.data_seed}, difficulty {dc.difficulty}, confounder {dc.confounder}" + \
            (f", {dc.confounder_transfer} in the transfer phase" if dc.confounder_transfer != -1 else "") + ")" \
            if dc.source == "synthetic" else f"{dc.source} {dc.path}"
        s.blocks.append(Text(f"Source: {src}; images {dc.image_size} x {dc.image_size} px. Lung and lesion masks: "
                             f"{'yes' if 'lung_masks' in d.get('test', {}) else 'no'}."))
    skipped = d.get("skipped", {})
    files = strs(skipped.get("files", [])) if "files" in skipped else []
    reasons = strs(skipped.get("reasons", [])) if "reasons" in skipped else []
    if files:
        rows = [[f, r] for f, r in zip(files[:50], reasons[:50])]
        s.blocks.append(Table("tbl-skipped", f"Input files skipped as unreadable ({len(files)}; first 50 listed)",
                              ["file", "reason"], rows))
    return s




def _bench(run: Run) -> Section | None:
    b = run.reader.bench()
    if not b:
        return None
    s = Section("bench", "Benchmark records")
    rows = [[k, v] for k, v in _flatten(b)][:200]
    s.blocks.append(Table("tbl-bench", "Benchmark records stored in the archive (scalars and short arrays)",
                          ["record", "value"], rows, collapsed=len(rows) > 40))
    return s


def _flatten(tree: dict, prefix: str = "") -> Iterable[tuple[str, str]]:
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            yield from _flatten(v, key)
        elif isinstance(v, np.ndarray):
            if v.size <= 8:
                yield key, ", ".join(fmt(x, 4) if np.issubdtype(v.dtype, np.number) else str(x)
                                     for x in v.reshape(-1))
        else:
            yield key, fmt(v, 4) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)



def sections(run: Run) -> list[Section]:
    """The run's description after the results: data, benchmark records, the run, configuration, provenance."""
    out = [_data(run)]
    bench = _bench(run)
    if bench is not None:
        out.append(bench)
    return out + [_overview(run), _configuration(run), _provenance(run)]
