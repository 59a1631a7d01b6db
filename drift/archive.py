"""The run archive: one HDF5 file per run, written stage by stage so that a crash never corrupts it.

Schema (version 1) -- the one place it is documented. ``<arch>`` is a registry name, ``<stage>`` is
``transfer`` or ``finetune``, ``<method>`` an attribution method (``gradcam++``, ``layercam``, ...).

Root attributes
    schema_version      int, :data:`SCHEMA_VERSION`
    config              the full run config as TOML text
    science_hash        hash of the config's result-changing part (resume refuses another hash)
    seed, git_commit, device, created, versions (JSON: python, torch, timm, h5py, numpy, drift)
    stages              JSON list of finished stages, in order, each {"name", "seconds", "finished"}
data/                   class_names (attr, JSON), test/ids, test/labels, test/lung_masks, test/lesion_masks
                        (bool, synthetic only), test/marker_masks (bool, confounder on),
                        skipped/files, skipped/reasons (inputs skipped under skip_bad)
models/<arch>/<stage>/  history/{epoch, train_loss, val_loss, val_accuracy, val_auc, seconds}
                        test/{logits (N, C), labels, accuracy, macro_auc, f1 (C,), confusion (C, C)}
                        attrs: checkpoint (path), sha256, best_epoch, best_val_auc, bn_frozen, weights (origin),
                        seconds, precision, schedule, epochs, lr, batch_size (the stage's settings for this arch),
                        input_size (side of the images the backbone saw)
attributions/<arch>/<stage>/<method>
                        raw maps (N, h, w) float32 at the target layer's resolution, chunked, gzip;
                        attrs: layer, target ("true"/"predicted"), eps; targets/<stage> (N,) class used
drift/<arch>/<method>/  per_sample/<metric> (n,) float, ids (n,), labels (n,), valid (n,) over the chosen sample
                        set; degenerate/{transfer, finetune} (N,) int codes (0 ok, 1 non-finite, 2 zero,
                        3 constant); summary/<metric>/{mean, lo, hi, per_class, n} and paired tests
stats/                  ranking/<metric>/ {rankings (JSON attr), kendall_tau, reverses, p_reverse}
fisher/<arch>/<stage>/  eigenvalues (N, r), rank (N,), probs (N, C), ids; components/{ids, x, x_high, x_low,
                        k, coefficients}; perturbation/<arrays of the perturbation experiment>; summary attrs
bench/                  benchmark records (see ``drift bench export``)

Atomicity: each stage is a transaction. The writer copies the archive to ``<name>.tmp``, writes the stage
there, flushes and fsyncs it, and renames it over the archive (an atomic replace on POSIX). Whatever kills the
process, the file at the archive's path is the previous complete version or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

SCHEMA_VERSION = 1
_COMPRESS_ABOVE = 4096  # elements; smaller datasets are stored plainly


class ArchiveError(RuntimeError):
    """An archive that cannot be used: missing, not HDF5, corrupt, of another schema or another config."""


def _open_checked(path: Path, mode: str = "r") -> h5py.File:
    if not path.is_file():
        raise ArchiveError(f"archive not found: {path}")
    try:
        f = h5py.File(path, mode)
    except OSError as exc:
        raise ArchiveError(f"{path} is not a readable HDF5 archive ({exc})") from None
    version = f.attrs.get("schema_version")
    if version is None:
        f.close()
        raise ArchiveError(f"{path} has no schema_version attribute: not a drift archive")
    if int(version) > SCHEMA_VERSION:
        f.close()
        raise ArchiveError(f"{path} has schema version {int(version)}; this drift reads up to {SCHEMA_VERSION}")
    return f


def write_tree(group: h5py.Group, values: Mapping[str, Any]) -> None:
    """Write nested dicts as groups, arrays/lists as datasets and scalars/strings as attributes.

    Existing members of the same name are replaced.
    """
    for key, value in values.items():
        key = str(key)
        if isinstance(value, Mapping):
            sub = group.require_group(key)
            write_tree(sub, value)
            continue
        if key in group:
            del group[key]
        if value is None:
            continue
        if isinstance(value, (str, bool, int, float, np.integer, np.floating, np.bool_)):
            group.attrs[key] = value
            continue
        arr = np.asarray(value)
        if arr.dtype.kind in ("U", "O"):
            group.create_dataset(key, data=np.asarray([str(v) for v in arr.reshape(-1)], dtype=object).reshape(
                arr.shape), dtype=h5py.string_dtype())
        elif arr.size > _COMPRESS_ABOVE and arr.ndim >= 1:
            chunks = (min(arr.shape[0], 256),) + arr.shape[1:] if arr.ndim > 1 else True
            group.create_dataset(key, data=arr, compression="gzip", compression_opts=4, chunks=chunks)
        else:
            group.create_dataset(key, data=arr)


def read_tree(node: h5py.Group | h5py.Dataset) -> Any:
    """The inverse of :func:`write_tree`: a dict of arrays, strings and scalars (attributes included)."""
    if isinstance(node, h5py.Dataset):
        data = node[()]
        if node.dtype.kind == "O" or h5py.check_string_dtype(node.dtype) is not None:
            return np.asarray(data, dtype=object).astype(str)
        return data
    out: dict[str, Any] = {}
    for k, v in node.attrs.items():
        out[k] = v.decode() if isinstance(v, bytes) else (v.item() if isinstance(v, np.generic) else v)
    for k in node:
        out[k] = read_tree(node[k])
    return out


class Archive:
    """Writer of one run's archive (see module docstring); also resumes an existing one.

    Args:
        path: the ``.h5`` file.
        config_text: the run config as TOML, stored in the root attributes on creation.
        science_hash: refuses to resume an archive written under another hash.
        provenance: extra root attributes (seed, device, versions, ...).
    """

    def __init__(self, path: str | os.PathLike, config_text: str = "", science_hash: str = "",
                 provenance: Mapping[str, Any] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        if self._tmp.exists():  # a stage that died mid-write; the archive itself is intact
            self._tmp.unlink()
        if self.path.exists():
            with _open_checked(self.path) as f:
                old = f.attrs.get("science_hash", "")
            if science_hash and old and old != science_hash:
                raise ArchiveError(
                    f"{self.path} was written with another configuration (hash {old}, now {science_hash}); "
                    "use another --out folder, or --fresh to start over"
                )
            return
        with h5py.File(self._tmp, "w") as f:
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["config"] = config_text
            f.attrs["science_hash"] = science_hash
            f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            f.attrs["stages"] = "[]"
            for k, v in (provenance or {}).items():
                f.attrs[k] = v if isinstance(v, (str, int, float, bool)) else json.dumps(v)
        self._commit()

    def _commit(self) -> None:
        with open(self._tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self._tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def stages(self) -> list[str]:
        with _open_checked(self.path) as f:
            return [s["name"] for s in json.loads(f.attrs.get("stages", "[]"))]

    def done(self, name: str) -> bool:
        return name in self.stages()

    @contextmanager
    def stage(self, name: str, replace: tuple[str, ...] = (), started: float | None = None) -> Iterator[h5py.File]:
        """A transaction writing one stage: yields the (copied) file; commits atomically on success.

        Args:
            name: the stage's name, recorded in the ``stages`` attribute when it commits.
            replace: group paths deleted before the stage writes (a forced re-run starts clean).
            started: ``time.perf_counter()`` when the stage's computation began, so that the recorded
                ``seconds`` cover the work and not only the write (default: when the transaction opens).
        """
        t0 = time.perf_counter() if started is None else started
        shutil.copyfile(self.path, self._tmp)
        try:
            with h5py.File(self._tmp, "a") as f:
                for g in replace:
                    if g in f:
                        del f[g]
                yield f
                stages = [s for s in json.loads(f.attrs.get("stages", "[]")) if s["name"] != name]
                stages.append({"name": name, "seconds": round(time.perf_counter() - t0, 3),
                               "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
                f.attrs["stages"] = json.dumps(stages)
                f.flush()
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise
        self._commit()


class ArchiveReader:
    """Read access to an archive without knowing h5py paths.

    Every method opens the file briefly, so a reader never holds it open while a run writes a new version.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with _open_checked(self.path) as f:
            self.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}

    # ---- provenance
    @property
    def config_text(self) -> str:
        return str(self.attrs.get("config", ""))

    @property
    def config(self):
        from .config import from_toml_text

        return from_toml_text(self.config_text)

    @property
    def stages(self) -> list[dict]:
        return json.loads(self.attrs.get("stages", "[]"))

    def has(self, path: str) -> bool:
        with _open_checked(self.path) as f:
            return path in f

    def read(self, path: str = "/") -> Any:
        """Everything below ``path`` as nested dicts of numpy arrays and attributes."""
        with _open_checked(self.path) as f:
            if path not in f:
                raise KeyError(f"{self.path}: no {path!r} in the archive (stages done: "
                               f"{[s['name'] for s in self.stages]})")
            return read_tree(f[path])

    def keys(self, path: str = "/") -> list[str]:
        with _open_checked(self.path) as f:
            return list(f[path].keys()) if path in f else []

    # ---- study views
    @property
    def class_names(self) -> list[str]:
        return json.loads(self.read("data").get("class_names", "[]"))

    def archs(self) -> list[str]:
        return self.keys("models")

    def evaluation(self, arch: str, stage: str) -> dict:
        return self.read(f"models/{arch}/{stage}/test")

    def history(self, arch: str, stage: str) -> dict:
        return self.read(f"models/{arch}/{stage}/history")

    def maps(self, arch: str, stage: str, method: str) -> np.ndarray:
        """Raw attribution maps (N, h, w) as float32."""
        return self.read(f"attributions/{arch}/{stage}/{method}").astype(np.float32)

    def methods(self, arch: str) -> list[str]:
        return self.keys(f"drift/{arch}")

    def drift(self, arch: str, method: str) -> dict:
        """Per-sample drift metrics of (arch, method): {metric: (n,) array, 'ids', 'labels', 'valid'}."""
        return self.read(f"drift/{arch}/{method}/per_sample")

    def drift_summary(self, arch: str, method: str) -> dict:
        return self.read(f"drift/{arch}/{method}/summary")

    def ranking(self) -> dict:
        return self.read("stats/ranking") if self.has("stats/ranking") else {}

    def fisher(self, arch: str, stage: str) -> dict:
        return self.read(f"fisher/{arch}/{stage}")

    def bench(self) -> dict:
        return self.read("bench") if self.has("bench") else {}


def open_archive(path: str | os.PathLike) -> ArchiveReader:
    """Open an archive for reading (validates it first)."""
    return ArchiveReader(path)
