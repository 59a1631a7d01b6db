"""Checksums of the archive: a damaged entry is noticed when it is read, never read as good data.

Two layers (schema version 4, :mod:`drift.archive`):

* numeric datasets written by :func:`drift.h5tree.write_tree` carry HDF5's Fletcher32 filter, so a flipped bit in
  their stored chunks fails the read inside HDF5;
* every commit records in its ``commits`` entry a ``digest``: ``{group path: sha256}`` over each group it wrote,
  and the root attributes carry ``digest``, a sha256 over every other root attribute (config, provenance and the
  ``commits`` list with the commits' digests). These cover what Fletcher32 does not: attributes (a stored accuracy,
  a class name), strings, and datasets written without the filter.

The sha256 of a group (:func:`group_digest`) hashes, in sorted order and recursively, the path, dtype, shape and
the bytes of each dataset and the name and value of each attribute, so any change of any stored value changes it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import h5py
import numpy as np

ROOT_DIGEST = "digest"
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError)
"""What h5py raises on damaged bytes (a damaged header may even turn a dataset into another kind of object)."""
CHECKSUMMED_SCHEMA = 4
"""The first archive schema with checksums; older archives are read unverified."""


class Damaged(Exception):
    """A stored entry whose bytes differ from those committed (or that HDF5 cannot read back)."""

    def __init__(self, entry: str, why: str):
        super().__init__(f"{entry}: {why}")
        self.entry = entry
        self.why = why


def _attr_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    arr = np.asarray(value)
    if arr.dtype.kind in ("O", "U", "S"):
        return json.dumps([_attr_bytes(v).decode("utf-8", "replace") for v in arr.reshape(-1)]).encode()
    return arr.dtype.str.encode() + repr(arr.shape).encode() + arr.tobytes()


def _hash_attrs(h, obj: h5py.HLObject, skip: tuple[str, ...] = ()) -> None:
    try:
        names = sorted(obj.attrs.keys())
    except H5_ERRORS as exc:
        raise Damaged(f"{obj.name} attributes", f"unreadable ({_first_line(exc)})") from None
    for k in names:
        if k in skip:
            continue
        try:
            v = obj.attrs[k]
        except H5_ERRORS as exc:
            raise Damaged(f"{obj.name} attribute {k!r}", f"unreadable ({_first_line(exc)})") from None
        h.update(b"A" + k.encode() + b"\0" + _attr_bytes(v) + b"\0")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _hash_dataset(h, ds: h5py.Dataset) -> None:
    try:
        data = ds[()]
    except H5_ERRORS as exc:  # Fletcher32 mismatch, a damaged chunk or header
        raise Damaged(ds.name, f"unreadable ({_first_line(exc)})") from None
    arr = np.asarray(data)
    if arr.dtype.kind in ("O", "U", "S"):
        payload = json.dumps([_attr_bytes(v).decode("utf-8", "replace") for v in arr.reshape(-1)]).encode()
    else:
        payload = arr.tobytes()
    h.update(b"D" + ds.name.encode() + b"\0" + arr.dtype.str.encode() + repr(arr.shape).encode() + payload)
    _hash_attrs(h, ds)


def group_digest(node: h5py.Group | h5py.Dataset) -> str:
    """sha256 (hex) of everything stored at and below ``node``: paths, attributes, dtypes, shapes, data bytes.

    Raises:
        Damaged: an entry HDF5 cannot read back (a Fletcher32 mismatch, a damaged header).
    """
    h = hashlib.sha256()

    def visit(obj: h5py.Group | h5py.Dataset) -> None:
        if isinstance(obj, h5py.Dataset):
            _hash_dataset(h, obj)
            return
        if not isinstance(obj, h5py.Group):  # a damaged header can make a dataset read as a named datatype
            raise Damaged(obj.name or "?", f"unreadable (an HDF5 {type(obj).__name__} where data were stored)")
        h.update(b"G" + obj.name.encode() + b"\0")
        _hash_attrs(h, obj)
        try:
            keys = sorted(obj.keys())
        except H5_ERRORS as exc:
            raise Damaged(obj.name, f"unreadable group ({_first_line(exc)})") from None
        for k in keys:
            try:
                child = obj[k]
            except H5_ERRORS as exc:
                raise Damaged(f"{obj.name.rstrip('/')}/{k}", f"unreadable ({_first_line(exc)})") from None
            visit(child)

    try:
        visit(node)
    except H5_ERRORS as exc:  # damage met in an unexpected place (a name, a type): still one Damaged
        raise Damaged(_name(node), f"unreadable ({type(exc).__name__}: {_first_line(exc)})") from None
    return h.hexdigest()


def _name(node) -> str:
    try:
        return str(node.name)
    except H5_ERRORS:
        return "?"


def root_digest(f: h5py.File) -> str:
    """sha256 (hex) of the root attributes other than ``digest`` itself (config, provenance, ``commits``)."""
    h = hashlib.sha256()
    _hash_attrs(h, f, skip=(ROOT_DIGEST,))
    return h.hexdigest()


def commit_digests(f: h5py.File, paths: tuple[str, ...]) -> dict[str, str]:
    """``{path: group_digest}`` of the groups a commit wrote (the paths that exist in ``f``)."""
    return {p.strip("/"): group_digest(f[p]) for p in dict.fromkeys(paths) if p and p.strip("/") in f}


def check_root(f: h5py.File, where: str) -> None:
    """Raise :class:`Damaged` when the root attributes differ from their recorded digest, or when an archive of
    schema 4 or later has none (an archive of schema 3 or older has none and is not checked)."""
    try:
        stored = f.attrs.get(ROOT_DIGEST)
    except H5_ERRORS as exc:
        raise Damaged(f"{where} root attributes", f"unreadable ({_first_line(exc)})") from None
    if stored is None:
        try:
            version = int(f.attrs.get("schema_version", 0))
        except H5_ERRORS:
            version = CHECKSUMMED_SCHEMA
        if version >= CHECKSUMMED_SCHEMA:  # written with checksums: a missing digest is damage, not age
            raise Damaged(f"{where} root attributes", "the checksum attribute is missing or its name damaged")
        return
    stored = stored.decode() if isinstance(stored, bytes) else str(stored)
    try:
        actual = root_digest(f)
    except H5_ERRORS as exc:
        raise Damaged(f"{where} root attributes", f"unreadable ({_first_line(exc)})") from None
    if actual != stored:
        raise Damaged(f"{where} root attributes (config, provenance, commits list)", "checksum mismatch")


def check_commit(f: h5py.File, record: Mapping[str, Any]) -> None:
    """Raise :class:`Damaged` naming the first group of commit ``record`` whose digest differs from the recorded
    one (or that is missing or unreadable). A record without ``digest`` (schema 3 or older) is not checked."""
    for path, expected in (record.get("digest") or {}).items():
        try:
            node = f[path] if path in f else None
        except H5_ERRORS as exc:
            raise Damaged(path, f"unreadable ({_first_line(exc)})") from None
        if node is None:
            raise Damaged(path, "missing")
        if group_digest(node) != expected:
            raise Damaged(path, "checksum mismatch (its stored values changed since they were committed)")
