"""Real chest X-ray data: a folder of class sub-folders or a CSV manifest, split by class and by patient.

Layouts:

- ``root/<class>/...`` (files found recursively): split here into train / val / test, stratified by class.
- ``root/{train,val,test}/<class>/...``: already split; ``val`` may be absent, then it is carved from ``train``.
- a CSV manifest with columns ``path,label`` and optional ``split`` (train / val / test) and ``patient_id``;
  paths are relative to the manifest's folder unless ``root`` is given. With ``patient_id``, no patient ever lands
  in two splits.

Every file is fully decoded once when the splits are built (so corrupt and truncated files fail early, naming the
file) and then read lazily, one image per `ImageSet.__getitem__`. Supported formats: PNG (8 and 16 bit), JPEG,
anything else Pillow decodes, and DICOM when pydicom is installed (``pip install drift-cxr[dicom]``).
"""

from __future__ import annotations

import csv
import errno
import os
import posixpath
import stat
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from drift.data.base import DataError, Splits, check_int
from drift.data.identity import check_class_folders, file_key, find_on_disk, merge_linked_files, nfc
from drift.data.images import decode_image
from drift.data.splits import SPLIT_NAMES, build_splits, check_fractions

_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "test": "test", "testing": "test"}
_MAX_LISTED = 5


class DataWarning(UserWarning):
    """An input file was skipped (``skip_bad=True``) or a data layout looks suspicious."""


def _validate(paths: Sequence[Path]) -> list[str | None]:
    """Fully decode every file; the error message per file, None where it decoded. Threads: decoding drops the GIL."""

    def check(path: Path) -> str | None:
        try:
            decode_image(path)
        except DataError as e:
            return str(e)
        return None

    if len(paths) < 16:
        return [check(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(check, paths))


def _drop_bad(paths: Sequence[Path], names: Sequence[str], skip_bad: bool,
              skipped: list[tuple[str, str]]) -> np.ndarray:
    """Validate ``paths``; raise listing the bad ones, or warn, record and return a keep-mask under ``skip_bad``."""
    errors = _validate(paths)
    bad = [(name, err) for name, err in zip(names, errors) if err is not None]
    if bad and not skip_bad:
        listed = "; ".join(err for _, err in bad[:_MAX_LISTED])
        more = f" (and {len(bad) - _MAX_LISTED} more)" if len(bad) > _MAX_LISTED else ""
        raise DataError(f"{len(bad)} bad input file(s): {listed}{more}. Fix or remove them, or skip them with "
                        f"--set data.skip_bad=true (skip_bad=True in Python)")
    for name, err in bad:
        warnings.warn(f"skipping {err}", DataWarning, stacklevel=3)
        skipped.append((name, err))
    return np.array([err is None for err in errors], dtype=bool)


def _check_classes(class_names: Sequence[str], labels: np.ndarray, where: str) -> None:
    if len(class_names) < 2:
        raise DataError(f"{where}: found only {len(class_names)} class ({', '.join(map(repr, class_names))}); "
                        f"a classifier needs at least 2")
    counts = np.bincount(labels, minlength=len(class_names))
    empty = [class_names[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise DataError(f"{where}: class(es) {', '.join(map(repr, empty))} have no usable images")


# -- folders -----------------------------------------------------------------------------------------------------

def _visible(p: Path | str) -> bool:
    """False for hidden entries (``.DS_Store``, ``.git``) and tool folders such as ``__MACOSX``."""
    return not (p if isinstance(p, str) else p.name).startswith((".", "__"))


def _broken_link(p: Path) -> str | None:
    """Why the symbolic link ``p`` yields no image file (dangling, a loop, a folder), or None if it does."""
    try:
        target = p.stat()
    except FileNotFoundError:
        return f"{p}: dangling symbolic link (its target {os.readlink(p)!r} does not exist)"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"{p}: symbolic link loop"
        return f"{p}: unreadable symbolic link ({e.strerror})"
    if stat.S_ISDIR(target.st_mode):
        return f"{p}: symbolic link to a folder (links to folders are not followed, so a loop cannot recurse)"
    return None


def _class_folders(folder: Path, root: Path | None = None,
                   skipped: list[tuple[str, str]] | None = None) -> dict[str, list[Path]]:
    """``{class name: sorted files under folder/<class>/ (recursive, hidden entries skipped)}``.

    Symbolic links that give no file (dangling, loops, links to folders) are left out with a `DataWarning` and
    recorded in ``skipped`` as ``(path relative to root, reason)``: a missing image is never silent.
    """
    dirs = sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p))
    check_class_folders(dirs, root or folder)
    if not dirs:
        raise DataError(f"{folder}: no class sub-folders found; expected {folder}/<class>/<image files>")
    stray = [p.name for p in folder.iterdir() if p.is_file() and _visible(p)]
    if stray:
        warnings.warn(f"{folder}: ignoring {len(stray)} file(s) outside class folders ({', '.join(stray[:3])})",
                      DataWarning, stacklevel=3)
    out = {}
    for d in dirs:
        entries = [p for p in d.rglob("*") if all(_visible(part) for part in p.relative_to(d).parts)]
        for p in sorted(p for p in entries if p.is_symlink()):
            why = _broken_link(p)
            if why is not None:
                warnings.warn(f"skipping {why}", DataWarning, stacklevel=3)
                if skipped is not None:
                    skipped.append((p.relative_to(root or folder).as_posix(), why))
        files = sorted(p for p in entries if p.is_file())
        if not files:
            raise DataError(f"class folder {d} is empty: class {d.name!r} has no image files")
        out[nfc(d.name)] = files  # compared in NFC; display spellings: _display_names
    return out


def _display_names(folder: Path) -> dict[str, str]:
    """``{NFC name: the folder's own spelling}`` of the class folders of ``folder``."""
    return {nfc(p.name): p.name for p in sorted(folder.iterdir()) if p.is_dir() and _visible(p)}


def load_folder(root: str | os.PathLike, size: int, seed: int, val_fraction: float = 0.15,
                test_fraction: float = 0.2, skip_bad: bool = False, *,
                classes: Sequence[str] | None = None) -> Splits:
    """Load ``root/<class>/*`` (split here) or ``root/{train,val,test}/<class>/*`` (already split).

    Split folders may carry their common names: ``train`` or ``training``, ``val``, ``valid`` or ``validation``,
    ``test`` or ``testing`` (two folders naming one split are an error); sample ids keep the folder's own name.

    Class names are ``classes`` when given (a class folder outside it is an error naming the folder, so a typo
    never becomes a class of its own), else the sorted class folder names (of ``train`` when pre-split). Symbolic
    links that give no file are left out with a `DataWarning` and recorded in `Splits.skipped`. Without a split
    layout the
    images are split stratified by class with target fractions ``(1 - val - test, val, test)`` (see
    `assign_splits`; each image is its own group, as folders carry no patient ids: use `load_csv` with a
    ``patient_id`` column to keep patients together). In a pre-split layout the fractions are ignored, except
    that a missing ``val`` folder is carved from ``train`` with fraction ``val_fraction``. Sample ids are paths
    relative to ``root``, with ``/`` separators.

    Args:
        root: Data folder.
        size: Images are resized to ``(size, size)``.
        seed: Seed for the split assignment.
        val_fraction: Target validation fraction, in (0, 1).
        test_fraction: Target test fraction, in (0, 1); ``val_fraction + test_fraction < 1``.
        skip_bad: Skip unreadable files with a `DataWarning`, recording them in `Splits.skipped`, instead of
            raising. Structural problems (an empty class, a single class, a split without some class) still raise.
        classes: The expected class names, in label order.

    Returns:
        `Splits` of lazily loaded `ImageSet` items ``(1, size, size)`` float32 in [0, 1].

    Raises:
        DataError: Missing root, no or empty class folders, fewer than two classes, a split missing a class,
            bad files (unless ``skip_bad``), a mix of split and class folders at the top level, a class folder
            not in ``classes`` or a class of ``classes`` without a folder.
        TypeError, ValueError: Bad ``size``, ``seed`` or fractions.
    """
    size = check_int(size, "size", 1, 4096)
    seed = check_int(seed, "seed", 0)
    val_fraction, test_fraction = check_fractions(val_fraction, test_fraction)
    root = Path(root)
    if not root.exists():
        raise DataError(f"data root {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder")
    top = sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p))
    # Split folders by their conventional names: train/training, val/valid/validation, test/testing.
    split_dirs = [name for name in top if name in _SPLIT_ALIASES]
    folder_of: dict[str, str] = {}
    for name in split_dirs:
        if _SPLIT_ALIASES[name] in folder_of:
            raise DataError(f"{root}: folders {folder_of[_SPLIT_ALIASES[name]]!r} and {name!r} both name the "
                            f"{_SPLIT_ALIASES[name]!r} split; keep one")
        folder_of[_SPLIT_ALIASES[name]] = name
    split_dirs = [s for s in SPLIT_NAMES if s in folder_of]
    skipped: list[tuple[str, str]] = []
    if not split_dirs:
        by_class = _class_folders(root, root, skipped)
        layout = {None: by_class}
    else:
        others = [name for name in top if name not in _SPLIT_ALIASES]
        if others:
            raise DataError(f"{root}: mixes split folders ({', '.join(split_dirs)}) with other folders "
                            f"({', '.join(others[:5])}); use either root/<class>/ or root/{{train,val,test}}/<class>/")
        for required in ("train", "test"):
            if required not in split_dirs:
                raise DataError(f"{root}: pre-split layout has no {required!r} folder (found {', '.join(split_dirs)})")
        layout = {name: _class_folders(root / folder_of[name], root, skipped) for name in split_dirs}
        class_set = set(layout["train"])
        for name, by_class in layout.items():
            missing, extra = sorted(class_set - set(by_class)), sorted(set(by_class) - class_set)
            if missing:
                raise DataError(f"split {name!r} ({root / folder_of[name]}) has no folder for class(es) "
                                f"{', '.join(map(repr, missing))}")
            if extra:
                raise DataError(f"split {name!r} ({root / folder_of[name]}) has class(es) "
                                f"{', '.join(map(repr, extra))} that train lacks")
    # Class identities are NFC names (one class, whatever Unicode form a folder or data.classes spells it in).
    keys = tuple(sorted(next(iter(layout.values()))))
    shown = _display_names(root if None in layout else root / folder_of["train"])
    class_names = tuple(shown.get(k, k) for k in keys)
    if classes is not None:
        expected = tuple(str(c) for c in classes)
        if len({nfc(c) for c in expected}) != len(expected):
            raise ValueError(f"classes has duplicate names: {expected}")
        for s, by_class in layout.items():
            where = root if s is None else root / folder_of[s]
            names = _display_names(where)
            extra = [name for name in sorted(by_class) if name not in {nfc(c) for c in expected}]
            if extra:
                raise DataError(f"{where}: class folder(s) {', '.join(repr(str(where / names[e])) for e in extra)} "
                                f"not in the expected classes ({', '.join(expected)}); fix the folder name or "
                                "data.classes")
            missing = [name for name in expected if nfc(name) not in by_class]
            if missing:
                raise DataError(f"{where}: no folder for expected class(es) {', '.join(map(repr, missing))}")
        keys, class_names = tuple(nfc(c) for c in expected), expected
    _check_classes(class_names, np.arange(len(class_names)), str(root))
    paths, labels, split_of = [], [], []
    for s, by_class in layout.items():
        for c, key in enumerate(keys):
            paths += by_class[key]
            labels += [c] * len(by_class[key])
            split_of += [-1 if s is None else SPLIT_NAMES.index(s)] * len(by_class[key])
    # One file under two names (a link into another class or split) never gets two labels.
    one = merge_linked_files(paths, labels, split_of, class_names, SPLIT_NAMES)
    paths, labels, split_of = [paths[i] for i in one], [labels[i] for i in one], [split_of[i] for i in one]
    ids = [p.relative_to(root).as_posix() for p in paths]
    keep = _drop_bad(paths, ids, skip_bad, skipped)
    paths = [p for p, k in zip(paths, keep) if k]
    ids = [i for i, k in zip(ids, keep) if k]
    labels = np.asarray(labels, dtype=np.int64)[keep]
    split_arr = np.asarray(split_of, dtype=np.int64)[keep]
    for s in layout:
        where = str(root if s is None else root / folder_of[s])
        sel = np.ones(len(labels), dtype=bool) if s is None else split_arr == SPLIT_NAMES.index(s)
        _check_classes(class_names, labels[sel], where)
    return build_splits(class_names, labels, ids, paths, None, split_arr if split_dirs else None, size, seed,
                        val_fraction, test_fraction, skipped)


# -- CSV manifests -----------------------------------------------------------------------------------------------

def _label_order(label: str) -> tuple[int, int | str]:
    """Sort key for class labels: integer labels numerically ("2" before "10"), then the others as text."""
    try:
        return 0, int(label)
    except ValueError:
        return 1, label


def load_csv(manifest: str | os.PathLike, size: int, seed: int, val_fraction: float = 0.15,
             test_fraction: float = 0.2, skip_bad: bool = False, root: str | os.PathLike | None = None, *,
             classes: Sequence[str] | None = None) -> Splits:
    """Load the images listed in a CSV manifest with columns ``path,label`` and optional ``split``, ``patient_id``.

    Header names are matched case-insensitively. ``path`` is relative to ``root`` when given, else to the
    manifest's folder (absolute paths are used as they are). ``split`` takes train / val / test (also training,
    valid, validation, testing); with a ``split`` column every row needs one, and a missing val split is carved
    from train. Without it, rows are split with target fractions ``(1 - val - test, val, test)`` stratified by
    class and grouped by ``patient_id`` (see `assign_splits`); with both columns, a patient in two splits is an
    error. Class names are ``classes`` when given (labels outside it are errors), else the sorted distinct labels
    (integer labels in numeric order).
    Sample ids are the manifest's paths.

    Args:
        manifest: CSV file.
        size: Images are resized to ``(size, size)``.
        seed: Seed for the split assignment.
        val_fraction: Target validation fraction, in (0, 1).
        test_fraction: Target test fraction, in (0, 1); ``val_fraction + test_fraction < 1``.
        skip_bad: Skip missing or unreadable files with a `DataWarning`, recording them in `Splits.skipped`.
        root: Folder the paths are relative to (default: the manifest's folder).
        classes: The expected class names, in label order.

    Returns:
        `Splits` of lazily loaded `ImageSet` items ``(1, size, size)`` float32 in [0, 1], with ``patient_ids``
        when the manifest has them.

    Raises:
        DataError: Missing manifest or root, missing columns, empty or duplicate rows, unknown labels or split
            names, a patient in two splits, missing or bad files (unless ``skip_bad``), fewer than two classes,
            a class without images, a split missing a class.
        TypeError, ValueError: Bad ``size``, ``seed`` or fractions.
    """
    size = check_int(size, "size", 1, 4096)
    seed = check_int(seed, "seed", 0)
    val_fraction, test_fraction = check_fractions(val_fraction, test_fraction)
    manifest = Path(manifest)
    if not manifest.is_file():
        raise DataError(f"manifest {manifest} does not exist" if not manifest.exists()
                        else f"manifest {manifest} is not a file")
    # Paths are resolved against the manifest's real location (or root's), whatever form data.path has, so a
    # file listed once relative and once absolute is one file.
    base = (manifest.parent if root is None else Path(root)).resolve()
    if not base.is_dir():
        raise DataError(f"data root {base} does not exist or is not a folder")
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"manifest {manifest}: cannot be read as UTF-8 CSV ({e})") from e
    if not rows:
        raise DataError(f"manifest {manifest} is empty; expected a header with columns path,label")
    header = [h.strip().lower() for h in rows[0]]
    for required in ("path", "label"):
        if required not in header:
            raise DataError(f"manifest {manifest} has no {required!r} column (columns: {', '.join(rows[0])})")
    dup = [h for h, k in Counter(header).items() if k > 1 and h]
    if dup:
        raise DataError(f"manifest {manifest} repeats column(s) {', '.join(dup)}")
    col = {name: header.index(name) for name in ("path", "label", "split", "patient_id") if name in header}
    records = []
    shown: dict[str, str] = {}
    seen: dict[str, tuple[int, str]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise DataError(f"{manifest} line {line}: {len(row)} fields, header has {len(header)}")
        rec = {name: row[i].strip() for name, i in col.items()}
        for name, value in rec.items():
            if not value:
                raise DataError(f"{manifest} line {line}: empty {name!r}")
        # Two spellings of one file (img/a.png, ./img/a.png, an absolute path) would give one id to two rows and
        # could put the image in two splits: compare the normalised paths.
        given = rec["path"]
        rec["path"] = posixpath.normpath(given)
        rec["file"] = find_on_disk(base / rec["path"])  # an NFC path finds a file stored NFD, and the reverse
        key = file_key(rec["file"])
        if key in seen:
            first_line, first = seen[key]
            same = "" if first == given else f" as {first!r} (the same file)"
            raise DataError(f"{manifest} line {line}: path {given!r} already listed on line {first_line}{same}; "
                            f"list each image once")
        seen[key] = (line, given)
        if "split" in rec:
            alias = _SPLIT_ALIASES.get(rec["split"].lower())
            if alias is None:
                raise DataError(f"{manifest} line {line}: unknown split {rec['split']!r}; expected train, val or test")
            rec["split"] = alias
        rec["line"] = line
        shown.setdefault(nfc(rec["label"]), rec["label"])  # the first spelling of a label is the one shown
        rec["label"] = nfc(rec["label"])
        records.append(rec)
    if not records:
        raise DataError(f"manifest {manifest} lists no images")
    if classes is not None:
        class_names = tuple(str(c) for c in classes)
        keys = tuple(nfc(c) for c in class_names)
        if len(set(keys)) != len(class_names):
            raise ValueError(f"classes has duplicate names: {class_names}")
        for rec in records:
            if rec["label"] not in keys:
                raise DataError(f"{manifest} line {rec['line']}: unknown label {shown[rec['label']]!r}; expected "
                                f"one of {', '.join(class_names)}")
    else:
        keys = tuple(sorted({rec["label"] for rec in records}, key=_label_order))
        class_names = tuple(shown[k] for k in keys)
    _check_classes(class_names, np.unique([keys.index(r["label"]) for r in records]), str(manifest))
    has_split, has_patient = "split" in col, "patient_id" in col
    if has_split and has_patient:
        where: dict[str, tuple[str, int]] = {}
        for rec in records:
            first = where.setdefault(rec["patient_id"], (rec["split"], rec["line"]))
            if first[0] != rec["split"]:
                raise DataError(f"{manifest}: patient {rec['patient_id']!r} is in split {first[0]!r} (line {first[1]}) "
                                f"and in split {rec['split']!r} (line {rec['line']})")
    paths = [r["file"] for r in records]
    ids = [Path(r["path"]).as_posix() for r in records]
    skipped: list[tuple[str, str]] = []
    keep = _drop_bad(paths, ids, skip_bad, skipped)
    records = [r for r, k in zip(records, keep) if k]
    paths = [p for p, k in zip(paths, keep) if k]
    ids = [i for i, k in zip(ids, keep) if k]
    labels = np.array([keys.index(r["label"]) for r in records], dtype=np.int64)
    _check_classes(class_names, labels, str(manifest))
    patients = [r["patient_id"] for r in records] if has_patient else None
    split_of = np.array([SPLIT_NAMES.index(r["split"]) for r in records], dtype=np.int64) if has_split else None
    if split_of is not None:
        for s in ("train", "test"):
            if not (split_of == SPLIT_NAMES.index(s)).any():
                raise DataError(f"manifest {manifest}: split column lists no {s!r} images")
    return build_splits(class_names, labels, ids, paths, patients, split_of, size, seed, val_fraction,
                        test_fraction, skipped)
