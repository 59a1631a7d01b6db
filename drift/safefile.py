"""Writing files inside the run folder safely: temporary files created exclusively, never through a link, and a
failed write (disk full, quota, read-only) reported as one line naming the file, with no partial file left.

Every writer of the run folder (the archive's commits, checkpoints, the report) creates its ``<name>.tmp`` with
:func:`exclusive_tmp` and renames it over ``<name>`` when complete, so a planted ``<name>.tmp`` link can never make
drift write outside the folder, and whatever stops a write, ``<name>`` is the old complete file or the new one.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def tmp_path(path: str | os.PathLike) -> Path:
    """The temporary name of ``path`` while it is written: ``<name>.tmp`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def exclusive_tmp(path: str | os.PathLike) -> tuple[Path, int]:
    """Create ``<path>.tmp`` exclusively (``O_CREAT | O_EXCL | O_NOFOLLOW``) and return it with an open
    read-write descriptor.

    A leftover ``.tmp`` (a killed run's, or a symbolic link planted there) is removed first: ``unlink`` removes
    the link itself, never its target, and the exclusive create then fails rather than follow a link that
    appears in between.
    """
    tmp = tmp_path(path)
    if os.path.lexists(tmp):
        tmp.unlink()
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
    except OSError as exc:
        raise write_error(path, exc) from None
    return tmp, fd


def reason(exc: BaseException) -> str:
    """Why a write failed, in words: "no space left on device" for ENOSPC wherever it is met (also when a
    library wraps it: torch's zip writer, HDF5), else the error's own text, on one line."""
    err = getattr(exc, "errno", None)
    if err in _SPACE:
        return _SPACE[err]
    text = str(exc)
    if "No space left on device" in text or "errno = 28" in text or "error 28" in text:
        return _SPACE[errno.ENOSPC]
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    lines = text.strip().splitlines()
    return lines[-1] if lines else type(exc).__name__


def is_disk_full(exc: BaseException) -> bool:
    return reason(exc) in _SPACE.values()


def write_error(path: str | os.PathLike, exc: BaseException, what: str = "") -> Exception:
    """The one-line :class:`drift.archive.OutputError` for a failed write of ``path``."""
    from .archive import OutputError

    return OutputError(f"cannot write {what + ' ' if what else ''}{path}: {reason(exc)}")


class RecordingWriter:
    """A binary file's ``write`` and ``flush`` that remember the first OSError they meet: a library that turns a
    failed write into its own error (torch's zip writer: "enforce fail at inline_container.cc") is then still
    reported with the real reason (:func:`reason` of :attr:`error`)."""

    def __init__(self, fh):
        self._fh = fh
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._fh.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        try:
            self._fh.flush()
        except OSError as exc:
            self.error = self.error or exc
            raise


def write_atomic(path: str | os.PathLike, data: bytes, what: str = "") -> None:
    """Write ``data`` to ``path`` through an exclusive ``<path>.tmp`` and an atomic rename; on failure the
    temporary file is removed and one :class:`~drift.archive.OutputError` names ``path`` and the reason."""
    path = Path(path)
    tmp, fd = exclusive_tmp(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc, what) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
