"""Nested Python trees in HDF5: dicts as groups, arrays as datasets, scalars and strings as attributes.

The archive (:mod:`drift.archive`) stores every result through these three functions.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import h5py
import numpy as np

_COMPRESS_ABOVE = 4096  # elements; smaller datasets are stored plainly


def write_tree(group: h5py.Group, values: Mapping[str, Any]) -> None:
    """Write nested dicts as groups, arrays/lists as datasets and scalars/strings as attributes.

    Existing members of the same name are replaced. Numeric datasets of at least one element carry HDF5's
    Fletcher32 checksum (a damaged chunk fails its read); strings, scalars and attributes are covered by the
    commit's sha256 digest (:mod:`drift.integrity`).
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
            group.create_dataset(key, data=arr, compression="gzip", compression_opts=4, chunks=chunks,
                                 fletcher32=True)
        elif arr.ndim >= 1 and arr.size > 0 and arr.dtype.kind in "biufc":
            group.create_dataset(key, data=arr, fletcher32=True)
        else:
            group.create_dataset(key, data=arr)


def read_tree(node: h5py.Group | h5py.Dataset) -> Any:
    """The inverse of :func:`write_tree`: a dict of arrays, strings and scalars (attributes included)."""
    if isinstance(node, h5py.Dataset):
        data = node[()]
        if node.dtype.kind == "O" or h5py.check_string_dtype(node.dtype) is not None:
            # Stored as UTF-8 (write_tree): decode explicitly, numpy's astype(str) would assume ASCII.
            flat = [v.decode("utf-8") if isinstance(v, bytes) else str(v)
                    for v in np.asarray(data, dtype=object).reshape(-1)]
            return np.asarray(flat, dtype=str).reshape(np.shape(data))
        return data
    out: dict[str, Any] = {}
    for k, v in node.attrs.items():
        out[k] = v.decode() if isinstance(v, bytes) else (v.item() if isinstance(v, np.generic) else v)
    for k in node:
        out[k] = read_tree(node[k])
    return out


def as_tree(obj) -> dict:
    """A stats/perturbation result (dataclass, dict, tuple) as a tree of arrays and scalars for the archive."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            k = " vs ".join(map(str, k)) if isinstance(k, tuple) else k
            if isinstance(v, dict) or dataclasses.is_dataclass(v):
                out[str(k)] = as_tree(v)
            elif isinstance(v, (list, tuple)) and v and isinstance(v[0], str):
                out[str(k)] = json.dumps(list(v))
            elif hasattr(v, "detach") and hasattr(v, "numpy"):  # a torch tensor
                out[str(k)] = v.detach().cpu().numpy()
            elif v is None:
                continue
            else:
                out[str(k)] = v
        return out
    return {"value": obj}
