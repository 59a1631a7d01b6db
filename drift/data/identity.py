"""One input, one identity: class names, labels and paths compared in one Unicode form, files and folders by
where they really are.

A class name typed on one system and stored on another may arrive composed (NFC, ``é`` one code point) or
decomposed (NFD, ``e`` + combining accent); they are one name. A file reached through a symbolic link, or listed
once relative and once absolute, is one file. :mod:`drift.data.real` compares names in NFC (:func:`nfc`, the
original spelling kept for display), files by :func:`file_key`, and refuses (or, where nothing changes, merges
with a warning) what would otherwise give two classes or two labels to one input.
"""

from __future__ import annotations

import os
import unicodedata
import warnings
from collections.abc import Sequence
from pathlib import Path

from drift.data.base import DataError


def nfc(text: str) -> str:
    """``text`` in Unicode normal form C: the form names are compared in."""
    return unicodedata.normalize("NFC", str(text))


def find_on_disk(path: Path) -> Path:
    """``path`` as the file system spells it: ``path`` itself when it exists, else its NFC or NFD spelling when
    only that one exists (a manifest written on one system for files stored on another)."""
    if os.path.lexists(path):
        return path
    for form in ("NFC", "NFD"):
        alt = Path(unicodedata.normalize(form, str(path)))
        if os.path.lexists(alt):
            return alt
    return path


def file_key(path: Path) -> str:
    """The identity of a file: its absolute real path (links resolved, ``.`` and ``..`` removed) in NFC."""
    return nfc(os.path.realpath(path))


def check_class_folders(dirs: Sequence[Path], root: Path) -> None:
    """Refuse class folders that are one class under two names: two spellings of one name (NFC / NFD), two
    folders that are one folder (a symbolic link to another class folder), or a folder that holds another
    class folder or the data root itself (a link to the root would make a class of every image).

    Raises:
        DataError: one line naming both folders.
    """
    seen: dict[str, Path] = {}
    for d in dirs:
        first = seen.setdefault(nfc(d.name), d)
        if first is not d:
            raise DataError(f"class folders {str(first)!r} and {str(d)!r} are one class name in two Unicode "
                            "spellings (composed and decomposed); move their files into one folder")
    real = {d: Path(os.path.realpath(d)) for d in dirs}
    root_real = Path(os.path.realpath(root))
    for d in dirs:
        if root_real == real[d] or root_real.is_relative_to(real[d]):
            raise DataError(f"class folder {str(d)!r} is a link to {str(real[d])!r}, which holds the data root "
                            f"{str(root)!r}: it would make a class of every image; remove the link")
    for i, a in enumerate(dirs):
        for b in dirs[i + 1:]:
            if real[a] == real[b] or real[a].is_relative_to(real[b]) or real[b].is_relative_to(real[a]):
                raise DataError(f"class folders {str(a)!r} and {str(b)!r} are the same folder (or one holds the "
                                f"other) through a symbolic link ({str(real[a])!r}, {str(real[b])!r}); remove "
                                "the link")


def merge_linked_files(paths: Sequence[Path], labels: Sequence[int], split_of: Sequence[int],
                       class_names: Sequence[str], split_names: Sequence[str]) -> list[int]:
    """The indices of ``paths`` to keep when some are one file under two names (a hard or symbolic link).

    Two names of one file with the same class and split are merged (the first kept) with a warning; with
    another class or split they are refused, as the image would carry two labels or be in two splits.

    Raises:
        DataError: one line naming both paths and their classes (or splits).
    """
    first: dict[str, int] = {}
    keep: list[int] = []
    for i, p in enumerate(paths):
        key = file_key(p)
        try:
            st = os.stat(p)
            key = f"{st.st_dev}:{st.st_ino}" if st.st_ino else key  # hard links too
        except OSError:
            pass
        j = first.setdefault(key, i)
        if j == i:
            keep.append(i)
            continue
        if labels[j] != labels[i]:
            raise DataError(f"{str(paths[j])!r} (class {class_names[labels[j]]!r}) and {str(p)!r} (class "
                            f"{class_names[labels[i]]!r}) are one file under two names: it would carry two labels;"
                            " remove the link")
        if split_of[j] != split_of[i]:
            where = [split_names[s] if s >= 0 else "unsplit" for s in (split_of[j], split_of[i])]
            raise DataError(f"{str(paths[j])!r} ({where[0]}) and {str(p)!r} ({where[1]}) are one file under two "
                            "names in two splits; remove the link")
        from drift.data.real import DataWarning

        warnings.warn(f"{str(p)!r} is another name of {str(paths[j])!r} (same file, same class): used once",
                      DataWarning, stacklevel=3)
    return keep
