"""The run's folder and what it records about the run: the log, provenance, the output folder, its lock."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from . import __version__, distributed
from .archive import ArchiveError, ArchiveReader, OutputError
from .config import Config


def log(msg: str) -> None:
    if distributed.is_main():  # one log for a run of several processes
        print(msg, flush=True)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, text=True,
                             capture_output=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def drift_version() -> str:
    """drift's version, with the git commit when drift runs from a checkout (``0.3.0+<commit>``): part of every
    step's fingerprint, so results computed by other code are recomputed on resume."""
    commit = git_commit()
    return __version__ if commit == "unknown" else f"{__version__}+{commit[:12]}"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def setting_changes(old: Config, new: Config, sections: tuple[str, ...]) -> list[str]:
    """The settings of ``sections`` that differ between two configs, as ``key: old -> new`` (only those the
    fingerprints hash, :meth:`drift.config.Config.hashed_settings`)."""
    a, b = _flat(old.hashed_settings(*sections)), _flat(new.hashed_settings(*sections))
    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def stored_config(path: Path) -> Config | None:
    """The config recorded in the archive at ``path`` (None when there is none this drift can read)."""
    try:
        return ArchiveReader(path).config
    except Exception:  # unreadable or foreign: Archive() reports it
        return None


def science_hash_to_resume(path: Path, cfg: Config) -> str:
    """The science hash a run resumes ``path`` with: its own, or the archive's when the two differ but no
    setting the checkpoints depend on does (a hash of an earlier drift that still hashed paths, the device
    name). When settings do differ: one line naming each, old and new value.

    Raises:
        drift.archive.ArchiveError: the archive's checkpoints were trained under other settings.
    """
    from .config import STEP_SECTIONS

    new = cfg.science_hash()
    try:
        old = str(ArchiveReader(path).attrs.get("science_hash", ""))
    except Exception:
        return new
    if not old or old == new:
        return new
    old_cfg = stored_config(path)
    if old_cfg is None:
        return new  # Archive() refuses it naming the hashes
    changes = setting_changes(old_cfg, cfg, STEP_SECTIONS["train"])
    if not changes:
        return old
    raise ArchiveError(f"{path} was written with other settings the checkpoints depend on ({'; '.join(changes)}); "
                       "use another --out folder, or --fresh to start over")


def provenance(cfg: Config, device: torch.device) -> dict:
    import h5py
    import timm

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "seed": cfg.run.seed,
        "data_seed": cfg.data_seed,
        "git_commit": git_commit(),
        "drift": drift_version(),
        "device": f"{device} ({dev_name})",
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "timm": timm.__version__,
                     "h5py": h5py.__version__, "numpy": np.__version__, "drift": __version__},
    }


def make_out(out: Path) -> None:
    """Create the output folder, or say in one line why it cannot be (a file in the way, no permission)."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"output folder (--out / run.out) {out} is a file, not a folder")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise OutputError(f"cannot create the output folder {out}: {blocker} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {out}: {exc.strerror or exc}") from None


def nothing_finished(path: Path) -> bool:
    """Whether the archive at ``path`` records no commit (a readable drift archive only)."""
    try:
        reader = ArchiveReader(path)
    except Exception:  # unreadable or foreign: Archive() reports it
        return False
    return not reader.commits


class RunLock:
    """``<out>/.lock`` holding the pid of the run writing the folder: a second run is refused while that process
    lives; the lock of a process that no longer exists (killed, machine restarted) is taken over.

    One process may hold it several times over (pipelines built one after the other in one session).
    """

    def __init__(self, path: Path):
        self.path = path
        self.held = False

    def acquire(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid = self._owner()
                if pid == os.getpid():
                    self.held = True
                    return
                if pid is not None and _alive(pid):
                    raise OutputError(f"output folder {self.path.parent} is in use by another drift run (pid {pid}, "
                                      f"lock {self.path}); wait for it to finish or use another --out") from None
                log(f"{self.path}: taking over the stale lock of a run that no longer exists (pid {pid})")
                self.path.unlink(missing_ok=True)
                continue
            except OSError as exc:
                raise OutputError(f"output folder {self.path.parent} is not writable: {exc.strerror or exc}") from None
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{os.getpid()}\n")
            self.held = True
            return
        raise OutputError(f"cannot take the lock {self.path}: other runs keep creating it")

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def release(self) -> None:
        if self.held and self._owner() == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    return True
