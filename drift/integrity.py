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

Both layers are checked *by HDF5's parsing*: a flipped bit in HDF5's own metadata (an object header, a heap, a
B-tree) is met while the library parses the file, before any digest can be compared, and some such bits send the
library into a loop that never returns (one flipped bit in the global heap of a variable-length string attribute
did so). Hence a third layer, the **seal**: every archive drift writes starts with a 512-byte HDF5 user block
(which the library skips), holding the sha256 of every byte after it (:func:`seal`). A reader compares it before
HDF5 sees the file (:func:`seal_state`). An intact seal means the bytes are exactly those drift wrote, which HDF5
parses. Any other state (a broken seal, or an archive written before seals) is first parsed in a child process
with a time limit (:func:`probe`), reading every attribute and dataset: a file on which the child hangs or crashes
is refused as damaged; one it reads to the end is then read here, where the digests find which commit is damaged,
so the undamaged commits are kept.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
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


SEAL_BYTES = 512
"""Size of the user block at the start of every archive drift writes: the seal, then zero bytes."""
SEAL_MAGIC = b"drift archive seal; sha256 of the bytes after 512: "
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _seal_block(sha256_hex: str) -> bytes:
    """The user block of a seal: the magic, the hex digest, a newline, zero bytes up to :data:`SEAL_BYTES`."""
    return (SEAL_MAGIC + sha256_hex.encode() + b"\n").ljust(SEAL_BYTES, b"\0")


def seal(data: memoryview | bytearray) -> bool:
    """Write the seal of an archive's bytes ``data`` into its user block, in place; False (nothing written) when
    the file has no user block (an archive created before seals: HDF5's signature at byte 0)."""
    if bytes(data[SEAL_BYTES:SEAL_BYTES + len(HDF5_SIGNATURE)]) != HDF5_SIGNATURE:
        return False
    data[:SEAL_BYTES] = _seal_block(hashlib.sha256(data[SEAL_BYTES:]).hexdigest())
    return True


def seal_state(path: str | Path) -> str:
    """``intact`` (the seal matches every byte after the user block), ``unsealed`` (HDF5's signature at byte 0: an
    archive written before seals, or not by drift) or ``broken`` (anything else: a damaged seal, damaged bytes, a
    file that is not HDF5). Reads the file once, in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        head = fh.read(SEAL_BYTES)
        if head.startswith(HDF5_SIGNATURE):
            return "unsealed"
        while piece := fh.read(1 << 20):
            h.update(piece)
    return "intact" if head == _seal_block(h.hexdigest()) else "broken"


PROBE_SECONDS = 20.0
"""The child's time limit in :func:`probe`, plus one second per 50 MB of archive."""

_PROBE = r"""
import sys
import h5py

seen = set()


def walk(obj):
    try:
        info = h5py.h5o.get_info(obj.id)
        key = (info.fileno, info.addr)
    except Exception:
        return
    if key in seen:
        return
    seen.add(key)
    try:
        names = list(obj.attrs)
    except Exception:
        names = []
    for k in names:
        try:
            obj.attrs[k]
        except Exception:
            pass
    if isinstance(obj, h5py.Dataset):
        try:
            if obj.size * obj.dtype.itemsize <= limit:
                obj[()]
        except Exception:
            pass
        return
    try:
        keys = list(obj.keys())
    except Exception:
        return
    for k in keys:
        try:
            child = obj[k]
        except Exception:
            continue
        walk(child)


limit = 8 * int(sys.argv[2]) + (1 << 20)
try:
    f = h5py.File(sys.argv[1], "r")
except Exception:
    sys.exit(0)
walk(f)
"""


def probe(path: str | Path, seconds: float | None = None) -> str | None:
    """Parse the archive at ``path`` in a child process, reading every attribute and dataset (errors are fine):
    None when the child finishes within ``seconds`` (default :data:`PROBE_SECONDS` plus a second per 50 MB), else
    why it did not (it hung, or HDF5 crashed it)."""
    size = Path(path).stat().st_size
    limit = (PROBE_SECONDS + size / 50e6) if seconds is None else seconds
    try:
        run = subprocess.run([sys.executable, "-c", _PROBE, str(path), str(size)], capture_output=True,
                             timeout=limit, check=False)
    except subprocess.TimeoutExpired:
        return f"HDF5 did not finish parsing it within {limit:.0f} s"
    if run.returncode < 0:
        return f"HDF5 crashed parsing it (signal {-run.returncode})"
    if run.returncode != 0:
        tail = run.stderr.decode(errors="replace").strip().splitlines()
        return f"HDF5 failed parsing it ({tail[-1] if tail else f'exit status {run.returncode}'})"
    return None
