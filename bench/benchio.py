"""Benchmark records into HDF5: ``drift bench export SOURCE --out FILE``.

Two sources are read, both in the JSON their tools write:

* **asv** result files, ``<results_dir>/<machine>/<commit>-<env>.json`` (asv >= 0.5, result format version 2),
  given as the results folder (``results/asv``), one machine's folder, or one file. Units, benchmark types and
  parameter names come from ``<results_dir>/benchmarks.json`` when it is there (asv writes it on every run);
  without it they are inferred from the benchmark name (``time_`` seconds, ``peakmem_`` / ``mem_`` bytes).
* **pytest-benchmark** JSON (``pytest --benchmark-json FILE`` or the files of its ``.benchmarks/`` storage),
  given as a file or a folder holding such files.

Layout written below ``bench/`` (the same in a stand-alone bench file and in a run archive)::

    bench/asv/<machine>/<commit8>-<env>/            one asv result file
        attrs: tool "asv", commit, machine, env_name, date (ISO 8601, UTC), python, versions (JSON: python and
               the environment's requirements), machine_info (JSON: asv's machine parameters), source (file),
               exported (ISO 8601), exported_with (drift version)
        <benchmark name>/                           e.g. time_kernels.FisherGram.time_fisher_gram
            value (P,) float64                      one per parameter combination (row-major over the params);
                                                    NaN where the benchmark failed or was skipped
            status (P,) int8                        0 measured, 1 failed, 2 skipped (NotImplementedError)
            params/<param name> (P,) str            each combination's values as asv writes them (repr)
            stats/<ci_99_a|ci_99_b|q_25|q_75|number|repeat> (P,) float64, where asv recorded them
            attrs: name, type (time, peakmem, track, ...), unit, version, param_names (JSON), started_at, duration
    bench/pytest/<machine>/<commit8>-<YYYYmmddTHHMMSS>/    one pytest-benchmark JSON file
        attrs: tool "pytest-benchmark", commit, machine, datetime, dirty, branch, versions (JSON: python,
               pytest-benchmark), machine_info (JSON), source, exported, exported_with
        <fullname with "/" as ".">/                 e.g. tests.benchmarks.test_bench_kernels.py::test_x[5]
            attrs: name, fullname, group, param, params (JSON), options (JSON), extra_info (JSON), unit "seconds",
                   and every number of pytest-benchmark's stats: min, max, mean, stddev, median, iqr, q1, q3,
                   ld15iqr, hd15iqr, ops, total, rounds, iterations, iqr_outliers, stddev_outliers; outliers (str)
            data (rounds,) float64                  the per-round times, when the JSON holds them
            extra/ attrs: the numeric entries of extra_info (e.g. a kernel's max error measured in the test)

Exporting the same record again replaces it; other records and, in a run archive, everything else are kept.
The file is written through :class:`drift.archive.Archive` as one commit, so a crash leaves the previous version
and :meth:`drift.archive.ArchiveReader.bench` reads the records back as nested dicts.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Iterable, Mapping
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

from drift import __version__
from drift.archive import Archive, ArchiveError
from drift.h5tree import write_tree

__all__ = ["STATUS_FAILED", "STATUS_OK", "STATUS_SKIPPED", "export", "read_source"]

STATUS_OK, STATUS_FAILED, STATUS_SKIPPED = 0, 1, 2

ASV_RESULT_VERSION = 2
_ASV_STATS = ("ci_99_a", "ci_99_b", "q_25", "q_75", "number", "repeat")
_PYTEST_STATS = ("min", "max", "mean", "stddev", "median", "iqr", "q1", "q3", "ld15iqr", "hd15iqr", "ops", "total",
                 "rounds", "iterations", "iqr_outliers", "stddev_outliers")
# asv keeps these next to the result files; they describe the suite and the machine, not measurements.
_ASV_METADATA = ("benchmarks.json", "machine.json")


# ------------------------------------------------------------------------------------------------ reading


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); expected an asv result file or a "
                         "pytest-benchmark JSON file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text (JSON) file; expected an asv result file or a "
                         "pytest-benchmark JSON file") from None


def _kind(data: Any) -> str | None:
    """'asv', 'pytest' or None for JSON that is neither an asv result file nor a pytest-benchmark file."""
    if isinstance(data, Mapping):
        if "result_columns" in data and "commit_hash" in data:
            return "asv"
        if "benchmarks" in data and "machine_info" in data:
            return "pytest"
    return None


def _iso_ms(ms: Any) -> str:
    """asv's JavaScript timestamps (milliseconds since the epoch) as ISO 8601 UTC; '' when absent."""
    if not isinstance(ms, (int, float)) or isinstance(ms, bool) or not math.isfinite(ms):
        return ""
    return _dt.datetime.fromtimestamp(ms / 1000.0, tz=_dt.UTC).isoformat(timespec="seconds")


def _key(text: str) -> str:
    """An HDF5 member name for text: '/' separates groups in HDF5, so it becomes '.'."""
    key = str(text).replace("/", ".").strip()
    return key if key not in ("", ".", "..") else f"_{key}"


def _asv_benchmark_info(result_file: Path) -> dict[str, Any]:
    """asv's ``benchmarks.json`` of the results folder two levels up, or {} when there is none."""
    meta = result_file.parent.parent / "benchmarks.json"
    if not meta.is_file():
        return {}
    data = _load_json(meta)
    return data if isinstance(data, dict) else {}


def _unit_from_name(name: str) -> tuple[str, str]:
    """(type, unit) of an asv benchmark from its name, asv's own conventions."""
    last = name.rsplit(".", 1)[-1]
    for prefix, kind, unit in (("time_", "time", "seconds"), ("timeraw_", "time", "seconds"),
                               ("peakmem_", "peakmemory", "bytes"), ("mem_", "memory", "bytes"),
                               ("track_", "track", "unit")):
        if last.startswith(prefix):
            return kind, unit
    return "unknown", "unit"


def _float_or_nan(v: Any, where: str) -> tuple[float, int]:
    if v is None:
        return math.nan, STATUS_FAILED
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{where}: expected a number or null, got {type(v).__name__} {v!r}")
    v = float(v)
    return v, (STATUS_SKIPPED if math.isnan(v) else STATUS_OK)


def _asv_record(path: Path, data: Mapping[str, Any]) -> tuple[tuple[str, str, str], dict[str, Any], int]:
    """(("asv", machine, record), tree, number of values) of one asv result file."""
    version = data.get("version")
    if version != ASV_RESULT_VERSION:
        raise ValueError(f"{path}: asv result format version {version!r}; drift reads version {ASV_RESULT_VERSION} "
                         "(asv >= 0.5; run `asv update` to convert older results)")
    for field in ("commit_hash", "env_name", "params", "results", "result_columns"):
        if field not in data:
            raise ValueError(f"{path}: not a complete asv result file, the field {field!r} is missing")
    columns = data["result_columns"]
    if not isinstance(columns, list) or "result" not in columns:
        raise ValueError(f"{path}: result_columns must list 'result', got {columns!r}")
    if not isinstance(data["results"], Mapping) or not isinstance(data["params"], Mapping):
        raise ValueError(f"{path}: 'results' and 'params' must be JSON objects")
    info = _asv_benchmark_info(path)
    machine = str(data["params"].get("machine") or path.parent.name)
    commit = str(data["commit_hash"])
    tree: dict[str, Any] = {}
    n_values = 0
    for name, row in data["results"].items():
        where = f"{path}: benchmark {name!r}"
        if not isinstance(row, list):
            raise ValueError(f"{where}: expected a list of columns, got {type(row).__name__}")
        cols = dict(zip(columns, row))
        params = cols.get("params") or []
        if not isinstance(params, list) or not all(isinstance(p, list) and p for p in params):
            raise ValueError(f"{where}: params must be a list of non-empty lists, got {params!r}")
        combos = list(product(*params)) if params else [()]
        raw = cols.get("result")
        if raw is None:
            raw = [None] * len(combos)
        if not isinstance(raw, list) or len(raw) != len(combos):
            got = len(raw) if isinstance(raw, list) else type(raw).__name__
            raise ValueError(f"{where}: {len(combos)} parameter combinations but {got} results")
        parsed = [_float_or_nan(v, f"{where} result[{i}]") for i, v in enumerate(raw)]
        bench_info = info.get(name) if isinstance(info.get(name), Mapping) else {}
        kind, unit = _unit_from_name(name)
        param_names = list(bench_info.get("param_names") or [f"param{i + 1}" for i in range(len(params))])
        if len(param_names) != len(params):
            param_names = [f"param{i + 1}" for i in range(len(params))]
        node: dict[str, Any] = {
            "name": name,
            "type": str(bench_info.get("type", kind)),
            "unit": str(bench_info.get("unit", unit)),
            "version": str(cols.get("version") or ""),
            "param_names": json.dumps(param_names),
            "started_at": _iso_ms(cols.get("started_at")),
            "value": np.asarray([v for v, _ in parsed], dtype=np.float64),
            "status": np.asarray([s for _, s in parsed], dtype=np.int8),
        }
        if isinstance(cols.get("duration"), (int, float)):
            node["duration"] = float(cols["duration"])
        if params:
            node["params"] = {pn: np.asarray([str(c[i]) for c in combos], dtype=object)
                              for i, pn in enumerate(param_names)}
        stats = {}
        for s in _ASV_STATS:
            col = cols.get(f"stats_{s}")
            if isinstance(col, list) and len(col) == len(combos):
                stats[s] = np.asarray([math.nan if v is None else float(v) for v in col], dtype=np.float64)
        if stats:
            node["stats"] = stats
        tree[_key(name)] = node
        n_values += len(combos)
    requirements = data.get("requirements") if isinstance(data.get("requirements"), Mapping) else {}
    attrs = {
        "tool": "asv",
        "commit": commit,
        "machine": machine,
        "env_name": str(data["env_name"]),
        "date": _iso_ms(data.get("date")),
        "python": str(data.get("python", "")),
        "versions": json.dumps({"python": str(data.get("python", "")), **{str(k): str(v) for k, v in
                                                                           requirements.items()}}),
        "machine_info": json.dumps(data["params"], sort_keys=True),
    }
    return ("asv", _key(machine), _key(path.stem)), {**attrs, **tree}, n_values


def _pytest_record(path: Path, data: Mapping[str, Any]) -> tuple[tuple[str, str, str], dict[str, Any], int]:
    """(("pytest", machine, record), tree, number of values) of one pytest-benchmark JSON file."""
    benches = data["benchmarks"]
    machine_info = data["machine_info"]
    if not isinstance(benches, list) or not isinstance(machine_info, Mapping):
        raise ValueError(f"{path}: 'benchmarks' must be a list and 'machine_info' an object (pytest-benchmark JSON)")
    commit_info = data.get("commit_info") if isinstance(data.get("commit_info"), Mapping) else {}
    machine = str(machine_info.get("node") or "unknown")
    commit = str(commit_info.get("id") or "unknown")
    stamp = str(data.get("datetime") or "")
    try:
        when = _dt.datetime.fromisoformat(stamp).strftime("%Y%m%dT%H%M%S")
    except ValueError:
        when = "undated"
    tree: dict[str, Any] = {}
    n_values = 0
    for i, b in enumerate(benches):
        where = f"{path}: benchmarks[{i}]"
        if not isinstance(b, Mapping) or not isinstance(b.get("stats"), Mapping) or "fullname" not in b:
            raise ValueError(f"{where} is not a pytest-benchmark record (needs 'fullname' and 'stats')")
        st = b["stats"]
        node: dict[str, Any] = {
            "name": str(b.get("name", b["fullname"])),
            "fullname": str(b["fullname"]),
            "unit": "seconds",
            "params": json.dumps(b.get("params"), default=str),
            "options": json.dumps(b.get("options"), default=str),
            "extra_info": json.dumps(b.get("extra_info") or {}, default=str),
        }
        for opt in ("group", "param"):
            if b.get(opt) is not None:
                node[opt] = str(b[opt])
        for s in _PYTEST_STATS:
            if s not in st:
                continue
            v, _ = _float_or_nan(st[s], f"{where} stats.{s}")
            counts = ("rounds", "iterations", "iqr_outliers", "stddev_outliers")
            node[s] = int(v) if s in counts and math.isfinite(v) else v
        if "mean" not in node:
            raise ValueError(f"{where} ({b['fullname']}) has no stats.mean: was it run with --benchmark-disable?")
        if "outliers" in st:
            node["outliers"] = str(st["outliers"])
        if isinstance(st.get("data"), list):
            node["data"] = np.asarray([_float_or_nan(v, f"{where} stats.data")[0] for v in st["data"]],
                                      dtype=np.float64)
        extra = b.get("extra_info") if isinstance(b.get("extra_info"), Mapping) else {}
        numeric = {str(k): float(v) for k, v in extra.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numeric:
            node["extra"] = numeric
        key = _key(b["fullname"])
        while key in tree:  # two names that differ only by '/' vs '.'
            key += "~"
        tree[key] = node
        n_values += 1
    attrs = {
        "tool": "pytest-benchmark",
        "commit": commit,
        "machine": machine,
        "datetime": stamp,
        "dirty": bool(commit_info.get("dirty", False)),
        "branch": str(commit_info.get("branch", "")),
        "versions": json.dumps({"python": str(machine_info.get("python_version", "")),
                                "pytest-benchmark": str(data.get("version", ""))}),
        "machine_info": json.dumps({k: v for k, v in machine_info.items() if k != "cpu"}, default=str,
                                   sort_keys=True),
    }
    return ("pytest", _key(machine), _key(f"{commit[:8]}-{when}")), {**attrs, **tree}, n_values


def _is_asv_html(folder: Path) -> bool:
    """``asv publish`` output (``results/asv/html`` here): a web page's data, not results."""
    return (folder / "index.json").is_file() and (folder / "graphs").is_dir()


def _candidates(source: Path) -> Iterable[Path]:
    """JSON files of a folder: its own and those one level down (asv's <machine>/ folders, .benchmarks/<id>/)."""
    if _is_asv_html(source):
        return []
    files = sorted(source.glob("*.json")) + sorted(f for f in source.glob("*/*.json") if not _is_asv_html(f.parent))
    return [f for f in files if f.is_file() and f.name not in _ASV_METADATA]


def read_source(source: str | os.PathLike) -> tuple[list[tuple[tuple[str, str, str], dict[str, Any], int]], int]:
    """Parse an asv results folder / result file or pytest-benchmark JSON file(s) into record trees.

    Args:
        source: an asv results folder (``results/asv``), a machine folder in it, one asv result file, a
            pytest-benchmark JSON file, or a folder of pytest-benchmark files (``.benchmarks``).

    Returns:
        ([((tool, machine, record), tree, number of values), ...], number of JSON files in a folder that were
        neither kind and were left out).

    Raises:
        TypeError: source is not a path.
        FileNotFoundError: source does not exist (the message names it).
        ValueError: a file that is not valid JSON or not in either format, a malformed record (the message
            names the file and the benchmark), or a folder without any record.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a path (str or os.PathLike), got {type(source).__name__}")
    src = Path(source)
    if not src.exists():
        raise FileNotFoundError(f"benchmark source not found: {src} (expected an asv results folder such as "
                                "results/asv, or a pytest-benchmark JSON file)")
    records = []
    if src.is_file():
        data = _load_json(src)
        kind = _kind(data)
        if kind is None:
            raise ValueError(f"{src} is neither an asv result file (fields commit_hash, result_columns) nor a "
                             "pytest-benchmark JSON file (fields benchmarks, machine_info)")
        records.append(_asv_record(src, data) if kind == "asv" else _pytest_record(src, data))
        return records, 0
    ignored = 0
    for f in _candidates(src):
        data = _load_json(f)
        kind = _kind(data)
        if kind is None:
            ignored += 1
            continue
        records.append(_asv_record(f, data) if kind == "asv" else _pytest_record(f, data))
    if not records:
        raise ValueError(f"{src} holds no benchmark results: no asv result files (<machine>/<commit>-<env>.json) "
                         "and no pytest-benchmark JSON files in it or one folder down")
    return records, ignored


# ------------------------------------------------------------------------------------------------ writing


def export(source: str | os.PathLike, out: str | os.PathLike) -> str:
    """Write the benchmark numbers of ``source`` into the ``bench/`` group of the HDF5 file ``out``.

    Every number of the source is copied unchanged (float64): asv values (B,) per benchmark over its P parameter
    combinations, pytest-benchmark statistics per test; the layout is in this module's docstring. ``out`` may be
    a new file (created as a drift archive holding only ``bench/``, root attribute ``schema_version``), a bench
    file written before, or a run archive; records already in it are replaced only where the same record (tool,
    machine, commit and environment or date) is exported again. One atomic transaction: a crash leaves ``out``
    as it was.

    Args:
        source: see :func:`read_source`.
        out: the HDF5 file to write.

    Returns:
        A one-paragraph message: what was written where.

    Raises:
        TypeError: source or out is not a path.
        FileNotFoundError: the source does not exist.
        ValueError: an unreadable or malformed source (naming the file), or an ``out`` that is a folder or an
            existing file that is not a drift archive.
    """
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a path (str or os.PathLike), got {type(out).__name__}")
    records, ignored = read_source(source)
    dest = Path(out)
    if dest.is_dir():
        raise ValueError(f"--out {dest} is a folder; give the HDF5 file to write, e.g. {dest / 'bench.h5'}")
    try:
        import h5py

        archive = Archive(dest, provenance={"kind": "benchmark records",
                                            "versions": {"drift": __version__, "h5py": h5py.__version__,
                                                         "numpy": np.__version__}})
    except ArchiveError as exc:
        raise ValueError(f"--out {dest}: cannot add benchmark records to it: {exc}") from None
    stamp = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    paths = [f"bench/{tool}/{machine}/{rec}" for (tool, machine, rec), _, _ in records]
    with archive.commit("bench") as f:
        for path, (_, tree, _) in zip(paths, records):
            if path in f:  # a record exported again replaces the old one as a whole
                del f[path]
            write_tree(f.require_group(path), {**tree, "exported": stamp, "exported_with": __version__})
    n_bench = sum(sum(isinstance(v, dict) for v in tree.values()) for _, tree, _ in records)
    n_values = sum(n for _, _, n in records)
    shown = ", ".join(paths[:4]) + (f", ... ({len(paths)} in all)" if len(paths) > 4 else "")
    note = f"; left out {ignored} other JSON file(s) of {source}" if ignored else ""
    return (f"exported {len(records)} record(s), {n_bench} benchmarks, {n_values} values from {source} "
            f"into {dest}: {shown}{note}")
