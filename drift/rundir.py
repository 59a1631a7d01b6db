"""The run's folder and what it records about the run: the log, provenance, the output folder, its lock."""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
import threading
import time
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


@functools.lru_cache(maxsize=1)
def drift_version() -> str:
    """drift's version, with the git commit when drift runs from a checkout (``0.3.0+<commit>``): part of every
    step's fingerprint, so results computed by other code are recomputed on resume. Read once per process: the
    code a process runs is the code it imported."""
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
        "device": f"{device} ({dev_name})",
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "timm": timm.__version__,
                     "h5py": h5py.__version__, "numpy": np.__version__, "drift": drift_version()},
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


LOCK_HEARTBEAT_S = 30.0
"""How often a run refreshes its lock (the lock file's modification time)."""
LOCK_TIMEOUT_S = 600.0
"""A lock whose heartbeat is older than this is taken over whoever its owner was (another machine, another PID
namespace: owners whose death cannot be proven from here)."""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """The start time of process ``pid`` in clock ticks since boot (field 22 of /proc/<pid>/stat), '' if unknown:
    with the pid it tells a process from a later one that reuses its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return ""


def lock_owner() -> dict:
    """Who this process is, as a lock records it: host name, boot id, PID namespace, pid, process start time."""
    return {"host": platform.node(), "boot_id": _boot_id(), "pid_ns": _pid_namespace(), "pid": os.getpid(),
            "start": _start_time(os.getpid())}


class RunLock:
    """``<out>/.lock``: who writes the folder (:func:`lock_owner`, as JSON), refreshed by a heartbeat thread every
    :data:`LOCK_HEARTBEAT_S` seconds while the run lives.

    A second run is refused while the owner may live. The lock is taken over, with a log line saying why, only
    when its owner is provably gone -- same host, boot and PID namespace, and its process absent (or its pid
    now belongs to a process started later) -- or when its heartbeat is older than ``timeout`` seconds
    (:data:`LOCK_TIMEOUT_S`; the owner may be on another machine or in another container). A lock of an earlier
    drift holding only a pid is judged by the pid on this host.

    One process may hold it several times over (pipelines built one after the other in one session).
    """

    def __init__(self, path: Path, timeout: float = LOCK_TIMEOUT_S, heartbeat: float = LOCK_HEARTBEAT_S):
        self.path = path
        self.held = False
        self.timeout = timeout
        self.heartbeat = heartbeat
        self._stop: threading.Event | None = None

    def acquire(self) -> None:
        me = lock_owner()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and self._same(owner, me):
                    self.held = True
                    return
                gone = self._gone(owner, me)
                if gone is None:
                    who = self._describe(owner)
                    raise OutputError(f"output folder {self.path.parent} is in use by another drift run ({who}, "
                                      f"lock {self.path}); wait for it to finish or use another --out") from None
                log(f"{self.path}: taking over the lock of {self._describe(owner)}: {gone}")
                self.path.unlink(missing_ok=True)
                continue
            except OSError as exc:
                raise OutputError(f"output folder {self.path.parent} is not writable: {exc.strerror or exc}") from None
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(me) + "\n")
            self.held = True
            self._start_heartbeat()
            return
        raise OutputError(f"cannot take the lock {self.path}: other runs keep creating it")

    @staticmethod
    def _same(owner: dict, me: dict) -> bool:
        return (owner.get("pid") == me["pid"] and owner.get("host", me["host"]) == me["host"]
                and owner.get("boot_id", me["boot_id"]) == me["boot_id"]
                and owner.get("pid_ns", me["pid_ns"]) == me["pid_ns"])

    @staticmethod
    def _describe(owner: dict | None) -> str:
        if owner is None:
            return "an unreadable lock"
        host = f" on host {owner['host']}" if owner.get("host") else ""
        return f"pid {owner.get('pid')}{host}"

    def _gone(self, owner: dict | None, me: dict) -> str | None:
        """Why the lock's owner is certainly gone (the log line's reason), or None while it may live."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return "the lock vanished"
        if owner is None:
            if age > self.timeout:
                return f"unreadable, last written {age:.0f} s ago (timeout {self.timeout:.0f} s)"
            return None
        pid = owner.get("pid")
        local = (owner.get("host", me["host"]) == me["host"] and owner.get("pid_ns", me["pid_ns"]) == me["pid_ns"])
        if local and owner.get("boot_id", me["boot_id"]) != me["boot_id"]:
            return "this machine has restarted since it was taken"
        if local and isinstance(pid, int):
            if not _alive(pid):
                return "its process no longer exists (same host)"
            if owner.get("start") and _start_time(pid) and _start_time(pid) != owner["start"]:
                return "its process no longer exists (the pid now belongs to a later process)"
        if age > self.timeout:
            return f"its heartbeat is {age:.0f} s old (timeout {self.timeout:.0f} s)"
        return None

    def _owner(self) -> dict | None:
        try:
            text = self.path.read_text()
        except OSError:
            return None
        try:
            owner = json.loads(text)
        except ValueError:
            owner = None
        if isinstance(owner, dict):
            return owner
        try:  # an earlier drift's lock: the pid alone, of a process on this host
            return {"pid": int(text.split()[0])}
        except (ValueError, IndexError):
            return None

    def _start_heartbeat(self) -> None:
        stop = self._stop = threading.Event()
        path, every = self.path, self.heartbeat

        def beat() -> None:
            while not stop.wait(every):
                try:
                    os.utime(path)
                except OSError:
                    pass

        threading.Thread(target=beat, name="drift-lock-heartbeat", daemon=True).start()

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None
        owner = self._owner()
        if self.held and owner is not None and self._same(owner, lock_owner()):
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
