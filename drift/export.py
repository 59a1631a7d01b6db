"""Self-describing outputs: xarray views inside the archive, and the per-image metrics as one tidy table.

**xarray views.** The drift and attribution steps also write, in the same commit, a copy of their per-image
results as netCDF-style arrays with HDF5 dimension scales, so that ``xarray.open_dataset(archive,
engine="h5netcdf", group=...)`` opens them with named dimensions and coordinates:

    ``xarray/<arch>/metrics``        one variable per metric (layer, score, normalization, method, image) float64,
                                     ``valid``, ``selected``, ``degenerate_a``, ``degenerate_b`` of the same
                                     dimensions (int8), ``label`` (image) int64 and ``class_name`` (class);
                                     coordinates ``image`` (sample ids), ``layer``, ``score``, ``normalization``,
                                     ``method``, ``class``.
    ``xarray/<arch>/maps/<layer>``   ``cam`` (phase, score, method, image, y, x) float32, the raw maps at the
                                     layer's grid; coordinates ``phase`` (transfer, finetune), ``score``,
                                     ``method``, ``image``, and ``y``, ``x`` (cell indices).

The views are copies (the groups ``drift/`` and ``attributions/`` stay the archive's schema); the metrics view
holds N x cells x methods numbers, the maps view doubles the size of the raw maps.

**Tidy table.** :func:`tidy_rows` and :func:`export_table` (``drift export ARCHIVE --format csv|parquet``) give one
row per (image, architecture, layer, score, normalization, method, metric): ``image`` (sample id), ``label``,
``architecture``, ``layer``, ``score``, ``normalization``, ``method``, ``metric``, ``value``, ``valid``,
``selected``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

__all__ = ["COLUMNS", "export_table", "open_metrics", "tidy_rows", "write_maps_view", "write_metrics_view"]

COLUMNS = ("image", "label", "architecture", "layer", "score", "normalization", "method", "metric", "value",
           "valid", "selected")
_NOT_METRICS = {"ids", "labels", "valid", "selected", "ranked"}
_STR = h5py.string_dtype("utf-8")


def _text(a) -> list[str]:
    return [x.decode() if isinstance(x, bytes) else str(x) for x in np.asarray(a).reshape(-1).tolist()]


def _scale(g: h5py.Group, name: str, values) -> h5py.Dataset:
    values = list(values)
    if values and isinstance(values[0], str):
        ds = g.create_dataset(name, data=np.asarray(values, dtype=object), dtype=_STR)
    else:
        ds = g.create_dataset(name, data=np.asarray(values))
    ds.make_scale(name)
    return ds


def _attach(ds: h5py.Dataset, scales: list[h5py.Dataset]) -> None:
    for axis, sc in enumerate(scales):
        ds.dims[axis].attach_scale(sc)


def _fresh(f: h5py.File, path: str) -> h5py.Group:
    if path in f:
        del f[path]
    return f.require_group(path)


def _keys(g: h5py.Group) -> list[str]:
    return [k for k in g if isinstance(g[k], h5py.Group)]


def write_metrics_view(f: h5py.File, arch: str) -> None:
    """Write ``xarray/<arch>/metrics`` (module docstring) from ``drift/<arch>`` of the open archive ``f``."""
    src = f[f"drift/{arch}"]
    cells = [(la, sc, no) for la in _keys(src) for sc in _keys(src[la]) for no in _keys(src[la][sc])
             if no != "agreement"]
    if not cells:
        return
    layers = list(dict.fromkeys(c[0] for c in cells))
    scores = list(dict.fromkeys(c[1] for c in cells))
    norms = list(dict.fromkeys(c[2] for c in cells))
    methods = list(dict.fromkeys(m for la, sc, no in cells for m in _keys(src[la][sc][no])))
    first = src[cells[0][0]][cells[0][1]][cells[0][2]][methods[0]]["per_sample"]
    ids, labels = _text(first["ids"][()]), np.asarray(first["labels"][()], dtype=np.int64)
    metrics = [k for k in first if k not in _NOT_METRICS and first[k].ndim == 1]
    shape = (len(layers), len(scores), len(norms), len(methods), len(ids))
    data = {k: np.full(shape, np.nan) for k in metrics}
    flags = {k: np.zeros(shape, np.int8) for k in ("valid", "selected", "degenerate_a", "degenerate_b")}
    for la, sc, no in cells:
        for m in _keys(src[la][sc][no]):
            at = (layers.index(la), scores.index(sc), norms.index(no), methods.index(m))
            node = src[la][sc][no][m]
            per = node["per_sample"]
            for k in metrics:
                if k in per:
                    data[k][at] = per[k][()]
            flags["valid"][at] = per["valid"][()]
            flags["selected"][at] = per["selected"][()]
            if "degenerate" in node:
                flags["degenerate_a"][at] = node["degenerate"]["transfer"][()]
                flags["degenerate_b"][at] = node["degenerate"]["finetune"][()]
    g = _fresh(f, f"xarray/{arch}/metrics")
    classes = []
    if "data" in f and "class_names" in f["data"].attrs:
        import json

        classes = json.loads(f["data"].attrs["class_names"])
    dims = [_scale(g, "layer", layers), _scale(g, "score", scores), _scale(g, "normalization", norms),
            _scale(g, "method", methods), _scale(g, "image", ids)]
    for k, v in {**data, **flags}.items():
        _attach(g.create_dataset(k, data=v), dims)
    _attach(g.create_dataset("label", data=labels), [dims[-1]])
    if classes:
        cls = _scale(g, "class", classes)
        _attach(g.create_dataset("class_name", data=np.asarray(classes, dtype=object), dtype=_STR), [cls])
    g.attrs["description"] = "per-image drift metrics of architecture " + arch + " (drift.export)"


def write_maps_view(f: h5py.File, arch: str) -> None:
    """Write ``xarray/<arch>/maps/<layer>`` (module docstring) from ``attributions/<arch>`` of the open archive."""
    src = f[f"attributions/{arch}"]
    ids = _text(f["data/test/ids"][()]) if "data/test/ids" in f else None
    for layer in [k for k in _keys(src) if k not in ("targets", "saturated")]:
        scores = _keys(src[layer])
        phases = [p for p in ("transfer", "finetune") if p in src[layer][scores[0]]]
        methods = list(src[layer][scores[0]][phases[0]])
        n, h, w = src[layer][scores[0]][phases[0]][methods[0]].shape
        cam = np.stack([np.stack([np.stack([src[layer][s][p][m][()] for m in methods]) for s in scores])
                        for p in phases]).astype(np.float32)
        g = _fresh(f, f"xarray/{arch}/maps/{layer}")
        names = ids if ids is not None and len(ids) == n else [str(i) for i in range(n)]
        dims = [_scale(g, "phase", phases), _scale(g, "score", scores), _scale(g, "method", methods),
                _scale(g, "image", names), _scale(g, "y", np.arange(h)), _scale(g, "x", np.arange(w))]
        _attach(g.create_dataset("cam", data=cam), dims)
        g.attrs["description"] = f"raw CAMs of {arch} at layer {layer} (drift.export)"


def open_metrics(archive: str | os.PathLike, arch: str):
    """The per-image metrics of ``arch`` as an ``xarray.Dataset`` (needs xarray and h5netcdf: ``.[interop]``)."""
    import xarray as xr

    return xr.open_dataset(archive, engine="h5netcdf", group=f"xarray/{arch}/metrics")


def tidy_rows(archive: str | os.PathLike) -> Iterator[dict]:
    """One row per (image, architecture, layer, score, normalization, method, metric) of the archive's
    ``drift/`` groups, with the columns of :data:`COLUMNS`."""
    from .archive import open_h5

    with open_h5(archive) as f:
        if "drift" not in f:
            raise ValueError(f"{archive}: no drift metrics (the drift step has not run)")
        for arch in _keys(f["drift"]):
            src = f["drift"][arch]
            for la in _keys(src):
                for sc in _keys(src[la]):
                    for no in [k for k in _keys(src[la][sc]) if k != "agreement"]:
                        for m in _keys(src[la][sc][no]):
                            per = src[la][sc][no][m]["per_sample"]
                            ids, labels = _text(per["ids"][()]), per["labels"][()].tolist()
                            valid, sel = per["valid"][()].tolist(), per["selected"][()].tolist()
                            for k in [k for k in per if k not in _NOT_METRICS and per[k].ndim == 1]:
                                for i, v in enumerate(per[k][()].tolist()):
                                    yield {"image": ids[i], "label": int(labels[i]), "architecture": arch,
                                           "layer": la, "score": sc, "normalization": no, "method": m,
                                           "metric": k, "value": float(v), "valid": bool(valid[i]),
                                           "selected": bool(sel[i])}


def export_table(archive: str | os.PathLike, fmt: str = "csv", out: str | os.PathLike | None = None) -> Path:
    """Write :func:`tidy_rows` as CSV or Parquet (Parquet needs pyarrow); returns the file written (default
    ``<archive folder>/metrics.<fmt>``)."""
    if fmt not in ("csv", "parquet"):
        raise ValueError(f"format must be csv or parquet, got {fmt!r}")
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(f"archive {archive} does not exist")
    out = Path(out) if out else archive.parent / f"metrics.{fmt}"
    tmp = out.with_name(out.name + ".tmp")
    if fmt == "csv":
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(tidy_rows(archive))
    else:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ValueError("--format parquet needs pyarrow (pip install 'drift[interop]'); --format csv does "
                             "not") from e
        rows = list(tidy_rows(archive))
        pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(
            [("image", pa.string()), ("label", pa.int64()), ("architecture", pa.string()), ("layer", pa.string()),
             ("score", pa.string()), ("normalization", pa.string()), ("method", pa.string()),
             ("metric", pa.string()), ("value", pa.float64()), ("valid", pa.bool_()),
             ("selected", pa.bool_())])), tmp)
    os.replace(tmp, out)
    return out
