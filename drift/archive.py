"""The run archive: one HDF5 file per run, written in commits so that a crash never corrupts it.

Schema (version 4) -- the one place it is documented. ``<arch>`` is a registry name, ``<phase>`` a training phase,
``transfer`` or ``finetune``, ``<method>`` an attribution method (``gradcam++``, ``gradcam++_tfkv``, ``layercam``,
...), ``<layer>`` a CAM layer preset (``block``, ``last-conv``, ``stride16``) or dotted module name, ``<score>`` the
differentiated score (``logit``, ``softmax``), ``<norm>`` the map normalisation before the metrics (``minmax``,
``sum``, ``none``), ``<upsample>`` the resampling of the maps before the metrics (``zoom-corners``,
``bilinear-halfpixel``, ``none``). A (layer, score, norm, upsample) tuple is a *cell* of the protocol grid
(:class:`Cell`); its group ``<norm>`` below ``<layer>/<score>`` is ``<norm>@<upsample>`` unless the resampling is
``bilinear-halfpixel`` (the only one before version 4), written ``<leaf>`` below. The primary cell is the config's
first layer, score, normalisation and resampling.

Root attributes
    schema_version      int, :data:`SCHEMA_VERSION`
    config              the run config as TOML text (of the newest commit, when a resume changed analysis settings)
    science_hash        hash of the settings the checkpoints depend on (resume refuses another hash)
    digest              sha256 over every other root attribute (drift.integrity.root_digest), rewritten by each
                        commit; checked by every reader and by a resume
    seed, data_seed, git_commit, device, created, versions (JSON: python, torch, timm, h5py, numpy, drift)
    commits             JSON list of the archive's commits, in order, one per unit of work a pipeline step
                        finished ("data", "models/<arch>/<phase>", "attributions/<arch>", "stats", ...), each
                        {"name", "seconds", "finished", "fingerprint", "inputs"}: the fingerprint hashes what the
                        work depends on (its step's settings, the data, and from training on the thread count,
                        device, precision, torch and timm versions, drift's version and commit: "inputs"); a
                        stale one is recomputed. "digest": {group path: sha256} of the groups the commit wrote
                        (drift.integrity.group_digest), checked when they are read; "versions": the package
                        versions (and drift's git commit) that computed it
data/                   class_names (attr, JSON), test/ids, test/labels, test/lung_masks, test/lesion_masks
                        (bool, synthetic only), test/marker_masks (bool, confounder on),
                        skipped/files, skipped/reasons (inputs skipped under skip_bad)
models/<arch>/<phase>/  history/{epoch, train_loss, val_loss, val_accuracy, val_auc, seconds}
                        test/{logits (N, C), labels, accuracy, macro_auc, f1 (C,), confusion (C, C)}
                        attrs: checkpoint (path), sha256, best_epoch, best_val_auc, bn_frozen, weights (origin),
                        seconds, precision, schedule, epochs, lr, batch_size (the phase's settings for this arch),
                        input_size (side of the images the backbone saw), seed (training seed), processes (how
                        many trained it: torchrun, drift.distributed), sync_bn (BatchNorm statistics over the
                        global batch), input_mean, input_std (JSON: the input normalisation; absent before
                        it was recorded)
attributions/<arch>/    attrs: target ("true"/"predicted"), eps, methods, scores (JSON), score_dtype ("float64": the
                        softmax score's dtype; absent before), n_saturated_<phase>; targets/<phase> (N,);
                        saturated/<phase> (N,) bool: float32 softmax(z)[target] exactly 1 or 0 (a float32 softmax
                        score would have a zero derivative there)
attributions/<arch>/<layer>/
                        attrs: module (dotted name), keras (the Keras counterpart, presets of study backbones), grid
    <score>/<phase>/<method>
                        raw maps (N, h, w) float32 at the layer's resolution, chunked, gzip
drift/<arch>/           attrs: sample_set, n_selected, upsample (JSON list), ties (top-k tie rule; absent: the
                        "fractional" rule of earlier versions, where zeros could enter a top set),
                        agreement_upsample
drift/<arch>/<layer>/<score>/agreement/<phase>/<m1 vs m2>
                        (N,) per-image Pearson r between two methods' maps of one checkpoint (method agreement)
drift/<arch>/<layer>/<score>/<leaf>/<method>/
                        per_sample/<metric> (N,) float over every test image, ids, labels, valid (neither map
                        degenerate), selected (metrics.sample_set); degenerate/{transfer, finetune} (N,) int codes
                        (0 ok, 1 non-finite, 2 zero, 3 constant), degenerate/topk_short/iou@XX (selected
                        valid pairs with a map of fewer positive pixels than k); summary/<metric>/{mean, lo, hi,
                        per_class,
                        n_per_class, class_used} and paired tests (over the selected, valid images)
stats/                  attrs: ranking_sample_set, n_ranked, n_ranked_per_class (JSON), min_per_class, verdict
                        (one sentence: does the reversal hold across the grid); ranked (N,) bool
stats/ranking/<layer>/<score>/<leaf>/<metric>/
                        rankings (JSON per method), means, kendall_tau, reverses, fully_reversed, p_reverse,
                        p_fully_reversed (paired bootstrap: one resample of images per replicate for every
                        method and architecture; descriptive: P(top differs | these checkpoints, image resampling))
stats/reversal/         the reversal tests behind the verdict (drift.verdicts.judge_reversals): columns cell, metric,
                        a, b, m1, m2, direction, d1/d2/interaction (+ _lo, _hi), n_images, p_value, p_holm,
                        supported; attrs scope, alpha, n_tests, untestable (JSON), collapsed (JSON)
stats/headline/         the run's headline numbers (drift.headline.compute), read by the summary, the report,
                        ``drift compare`` and asv; attrs n_boot, seed, cell (primary cell key), metrics (JSON:
                        the headline drift metrics)
    classification/<arch>/<phase>
                        attrs accuracy, macro_auc (stored test values), accuracy_lo/hi, macro_auc_lo/hi
                        (percentile bootstrap over test images), best_epoch (1-based), seconds
    drift/<arch>/<method>/<metric>
                        mean, lo, hi, n_per_class, class_used (primary cell, as in the drift summary)
    fisher/<arch>/<phase>
                        attrs n_spectra, top_share, mean_rank, area_high, area_complement, area_random, gap,
                        gap_lo, gap_hi, n_perturbed (the confidence gap, drift.headline.confidence_gap),
                        wilcoxon_p, kl_ratio
stats/examples/<arch>/  index (k,), ids (k,), images (k, H, W) float16 in [0, 1]: the test images the report
                        shows with their maps (drift.headline.examples)
fisher/<arch>/<phase>/  eigenvalues (N, r), rank (N,), probs (N, C), ids; components/{ids, x (float16), x_high,
                        x_low, k, energy_share}; perturbation/<arrays of the perturbation experiment>; summary attrs
fisher/<arch>/untrained/
                        the same for an untrained network of the architecture (``fisher.untrained``: the iFIM
                        controls' baseline; BatchNorm statistics of the training images)
replicas/<arch>/<phase>/seed<s>/
                        a seed replica of a phase (``baselines.seeds``): as models/<arch>/<phase>/, plus attrs seed
baselines/arch/<arch>/  attrs: seeds, phases, randomize (JSON), flag_alpha, flag_normalised, n_images
    seeds/<phase>/<layer>/<score>/<norm>/<method>/
                        attrs models (JSON: "run", "seed<s>", ...); fixed_vs_<model>/ (the other phase's maps vs a
                        replica) and <model>_vs_<model>/ (every pair of replicated models), each scored as
                        drift/<arch>/... scores TL vs FT (per_sample, degenerate, summary); the run's own TL vs FT is
                        the drift step's
    seeds/<phase>/<layer>/<score>/<norm>/<method>/systematic/<metric>/
                        raw_tl (M, N), raw_ft (M, M, N) metric values, d_tl, d_ft their squared-Euclidean
                        instabilities (NaN outside the drift table's sample), attrs: models, instability and the
                        drift.stats.systematic_drift result (estimate, low, high, noise_share, sigma2, drift, p_value,
                        se, se_images, se_models, df, n_images, n_models, models_resampled, ci)
    randomisation/      fractions, n_modules, spread (per cut), refused, labels (JSON), trained_spread, normalize;
                        <layer>/<score>/<method>/{cut<i>/{per_sample, mean, null_seed, null_images, null_cross,
                        test} (drift.randomisation.randomisation_scores), pearson_by_cut, normalised_by_cut,
                        p_by_cut, flagged}
baselines/ranking/<phase>/
                        systematic/<arch>/<method>/<metric> and ranking/<method>/<metric>/<a>/<b>: the verdicts'
                        results with Holm-adjusted p (drift.verdicts); reversal/ (finetune: the reversal tests with
                        fine-tuning seeds resampled, as stats/reversal); attrs: verdict (sentences), seeds, phases,
                        n_ranked, ranking_sample_set, alpha
baselines/chains/       pairs/<arch>/<method>/<metric>/raw_tt, raw_ff, raw_tf (R, R, N) between the chains' models;
                        energy/<arch> (energy test); tops/<metric>/<method> (JSON: most stable architecture per
                        chain); attrs: verdict, chains (JSON seeds, the run's first), cell, alpha
bench/                  benchmark records (see ``drift bench export``)
measure/<arch>/replicas/<layer>/<score>/<norm>/<method>/<metric>/
                        ``drift measure`` with replicas of model B (drift.measure): d_tl (R+1, N), d_ft
                        (R+1, R+1, N) instabilities; attrs origins (JSON), n_replicas, systematic
xarray/<arch>/metrics/, xarray/<arch>/maps/<layer>/
                        copies of drift/<arch> and attributions/<arch> as arrays with HDF5 dimension scales for
                        xarray's h5netcdf engine (drift.export)

A ``drift measure`` archive (drift.measure) has this layout with ``<arch>`` = ``measure.name``, model A in the
``transfer`` slot and model B in ``finetune``; models/<arch>/<phase> has no history and adds attrs role (A, B),
spec, kind (timm, factory, drift, module) and code_sha256.

Integrity (:mod:`drift.integrity`): numeric datasets written by :func:`drift.h5tree.write_tree` carry HDF5's
Fletcher32 checksum; each commit's groups and the root attributes carry sha256 digests. :class:`ArchiveReader` checks
the root digest on opening and a commit's digest the first time it reads below one of its groups; a mismatch is one
:class:`ArchiveError` naming the entry and the commit. A resume recomputes a damaged commit
(:meth:`Archive.damaged`). Archives of schema 3 have no digests: they are read unverified (the reader's
:attr:`ArchiveReader.integrity_note` says so) and upgraded to version 4 (digests of their current contents) when a
run resumes one.

The seal (:func:`drift.integrity.seal`): the archive's first 512 bytes are an HDF5 user block holding the sha256 of
the rest of the file, written by every commit. It is compared before HDF5 parses the file; a file whose seal does
not match (or an archive written before seals, which has none) is first parsed by a child process with a time
limit, so that bytes on which HDF5 itself would hang or crash are one :class:`ArchiveError`, not a hung reader.

Atomicity: each commit is one transaction (:meth:`Archive.commit`). The writer copies the archive to
``<name>.tmp``, writes the commit there, flushes and fsyncs it, and renames it over the archive (an atomic replace on
POSIX). Whatever kills the process, the file at the archive's path is the previous complete version or the new one.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np

from .h5tree import read_tree
from .integrity import (
    H5_ERRORS,
    ROOT_DIGEST,
    SEAL_BYTES,
    Damaged,
    check_commit,
    check_root,
    commit_digests,
    probe,
    root_digest,
    seal,
    seal_state,
)
from .safefile import exclusive_tmp, is_disk_full, tmp_path, write_error

SCHEMA_VERSION = 4
"""Version 4 added the resampling axis of the protocol grid (cell groups ``<norm>@<upsample>``; a group ``<norm>``
is a :data:`LEGACY_UPSAMPLE` cell, which every cell of a version-3 archive is), ``metrics`` attributes on
``drift/<arch>``, and checksums (root ``digest``, a ``digest`` per commit, Fletcher32 on numeric datasets); version 3
renamed two attributes (root ``stages`` -> ``commits``, ``stages`` -> ``phases`` on the ``baselines`` groups).
Version-2 and -3 archives are read as they are (unverified) and upgraded in place, atomically, when a run resumes
one."""
_RENAMED_V2 = {"stages": "commits"}
_RENAMED_V2_BASELINES = {"stages": "phases"}


LEGACY_UPSAMPLE = "bilinear-halfpixel"
"""The map resampling of every cell of archives before schema version 4, and of a cell group named ``<norm>``
without an ``@<upsample>`` suffix (:class:`Cell`)."""


class Cell(NamedTuple):
    """One cell of the protocol grid: CAM layer (preset or dotted name), differentiated score, map normalisation and
    the resampling of the maps before the metrics (``metrics.upsample``; :data:`LEGACY_UPSAMPLE` when not given,
    so a three-field cell is the cell of earlier archives)."""

    layer: str
    score: str
    norm: str
    upsample: str = LEGACY_UPSAMPLE

    @property
    def leaf(self) -> str:
        """The cell's last group name: ``<norm>``, or ``<norm>@<upsample>`` for another resampling than
        :data:`LEGACY_UPSAMPLE`."""
        return self.norm if self.upsample == LEGACY_UPSAMPLE else f"{self.norm}@{self.upsample}"

    @property
    def key(self) -> str:
        """The cell's group path below ``drift/<arch>`` and ``stats/ranking``: ``<layer>/<score>/<leaf>``."""
        return f"{self.layer}/{self.score}/{self.leaf}"

    @classmethod
    def parse(cls, key: str) -> Cell:
        """The cell of a :attr:`key` (``<layer>/<score>/<norm>[@<upsample>]``)."""
        parts = key.split("/")
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"a cell key is <layer>/<score>/<norm>[@<upsample>], got {key!r}")
        norm, _, up = parts[2].partition("@")
        return cls(parts[0], parts[1], norm, up or LEGACY_UPSAMPLE)

    def drift_path(self, arch: str) -> str:
        return f"drift/{arch}/{self.key}"

    def __str__(self) -> str:
        return f"{self.layer}, {self.score}, {self.norm}" + (
            "" if self.upsample == LEGACY_UPSAMPLE else f", upsampled {self.upsample}")


class ArchiveError(RuntimeError):
    """An archive that cannot be used: missing, not HDF5, corrupt, of another schema or another config."""


class OutputError(ArchiveError):
    """An output that cannot be written: ``--out`` is a file or read-only, another run holds the folder, the disk
    is full. The message is one line naming the path."""


_PARSEABLE: set[tuple] = set()
"""Files found safe for HDF5 to parse, by (device, inode, size, mtime): a commit replaces the file (a new inode),
so an entry never outlives the bytes it was found for."""


def _check_parseable(path: Path) -> None:
    """Refuse, before HDF5 parses it, a file whose bytes HDF5 could not parse to the end (:mod:`drift.integrity`,
    the seal): an intact seal passes at once; any other file is first parsed by a child process."""
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _PARSEABLE:
        return
    state = seal_state(path)
    if state != "intact":
        why = probe(path)
        if why is not None:
            seal_says = "it has no seal" if state == "unsealed" else "its seal does not match its bytes"
            raise ArchiveError(f"{path} is damaged: {seal_says} and {why}; the archive cannot be read (restore a "
                               "copy, or start over with --fresh)")
    if len(_PARSEABLE) > 256:
        _PARSEABLE.clear()
    _PARSEABLE.add(key)


def _open_checked(path: Path, mode: str = "r") -> h5py.File:
    if not path.is_file():
        raise ArchiveError(f"archive not found: {path}")
    _check_parseable(path)
    try:
        f = h5py.File(path, mode)
    except H5_ERRORS as exc:
        raise ArchiveError(f"{path} is not a readable HDF5 archive ({exc})") from None
    try:
        version = f.attrs.get("schema_version")
        version = None if version is None else int(version)
    except H5_ERRORS as exc:
        f.close()
        raise ArchiveError(f"{path}: root attributes damaged ({exc}); the archive cannot be trusted") from None
    if version is None:
        f.close()
        raise ArchiveError(f"{path} has no schema_version attribute: not a drift archive")
    if int(version) > SCHEMA_VERSION:
        f.close()
        raise ArchiveError(f"{path} has schema version {int(version)}; this drift reads up to {SCHEMA_VERSION}")
    try:
        check_root(f, str(path))
    except Damaged as exc:
        f.close()
        raise ArchiveError(f"{exc.entry} damaged: {exc.why}; the archive cannot be trusted (restore a copy, "
                           "or start over with --fresh)") from None
    return f


def commit_records(attrs: Mapping[str, Any]) -> list[dict]:
    """The ``commits`` records of root attributes ``attrs`` (``stages`` in a version-2 archive)."""
    return json.loads(attrs.get("commits", attrs.get("stages", "[]")))


def _rename_attrs(obj: h5py.HLObject, renames: Mapping[str, str]) -> None:
    for old, new in renames.items():
        if old in obj.attrs:
            obj.attrs[new] = obj.attrs[old]
            del obj.attrs[old]


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
        self._tmp = tmp_path(self.path)
        self._config_text = ""
        self._provenance = {k: v if isinstance(v, (str, int, float, bool)) else json.dumps(v)
                            for k, v in (provenance or {}).items()}
        if os.path.lexists(self._tmp):  # a commit that died mid-write (the archive is intact), or a planted link
            self._tmp.unlink()
        if self.path.exists():
            with _open_checked(self.path) as f:
                old = f.attrs.get("science_hash", "")
                version = int(f.attrs["schema_version"])
            if version in (2, 3):
                self._upgrade(version)
            elif version != SCHEMA_VERSION:
                raise ArchiveError(f"{self.path} has schema version {version}; this drift resumes version "
                                   f"{SCHEMA_VERSION} only: use another --out folder, or --fresh to start over")
            if science_hash and old and old != science_hash:
                raise ArchiveError(
                    f"{self.path} was written with another configuration (hash {old}, now {science_hash}); "
                    "use another --out folder, or --fresh to start over"
                )
            self._config_text = config_text
            return
        with self._transaction(new=True) as f:
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["config"] = config_text
            f.attrs["science_hash"] = science_hash
            f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            f.attrs["commits"] = "[]"
            f.attrs.update(self._provenance)

    def _commit(self) -> None:
        with open(self._tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self._tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @contextmanager
    def _transaction(self, new: bool = False) -> Iterator[h5py.File]:
        """Yield a copy of the archive (an empty file when ``new``) open for writing; on success it replaces the
        archive atomically, on any exception it is deleted and the archive stays as it was.

        The copy is created exclusively, never through a link (:func:`drift.safefile.exclusive_tmp`). A write
        that fails for want of space (in the copy, in HDF5's writes or its final flush) is one
        :class:`OutputError` naming the archive and "no space left on device"; HDF5's file is closed before the
        copy is removed, so no half-written state is ever touched again.
        """
        _, fd = exclusive_tmp(self.path)
        try:
            # HDF5 writes the commit into memory (h5py's file-object driver over a BytesIO) and Python writes the
            # result to the exclusive .tmp: a full disk is then a Python OSError on a plain write, never a failure
            # inside HDF5's own driver (which, on a full disk, ends in a segmentation fault when h5py frees the
            # file's objects). The cost is one copy of the archive in memory while a commit is written.
            with os.fdopen(fd, "wb") as fh:
                buf = io.BytesIO(b"" if new else self.path.read_bytes())
                with h5py.File(buf, "w", userblock_size=SEAL_BYTES) if new else h5py.File(buf, "r+") as f:
                    yield f
                    f.attrs[ROOT_DIGEST] = root_digest(f)  # last: it covers every other root attribute
                    f.flush()
                data = buf.getbuffer()
                seal(data)  # after HDF5 closed the file: the seal covers its final bytes (none before seals)
                fh.write(data)
                fh.flush()
            self._commit()
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            self._tmp.unlink(missing_ok=True)
            if is_disk_full(exc):
                raise write_error(self.path, exc, "archive") from None
            raise
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise

    def _upgrade(self, version: int) -> None:
        """Bring a version-2 or -3 archive to the current version, in one transaction: version 2's attributes
        renamed; a version-3 layout is already version 4's (its cells are :data:`LEGACY_UPSAMPLE` cells); the
        digests of its contents as they are now (what was stored before cannot be verified)."""
        with self._transaction() as f:
            if version == 2:
                _rename_attrs(f, _RENAMED_V2)
                if "baselines" in f:
                    f["baselines"].visititems(lambda _, g: _rename_attrs(g, _RENAMED_V2_BASELINES))
            # No checksums before version 4: the digests of the current contents (earlier states cannot be
            # verified).
            commits = commit_records(f.attrs)
            for entry in commits:
                entry["digest"] = commit_digests(f, (entry["name"],))
            f.attrs["commits"] = json.dumps(commits)
            f.attrs["schema_version"] = SCHEMA_VERSION

    def damaged(self, name: str) -> str | None:
        """Why commit ``name``'s stored groups cannot be trusted (a checksum mismatch, an unreadable entry), or
        None when they check out (or carry no digest)."""
        entry = self.entry(name)
        if entry is None:
            return None
        try:
            with _open_checked(self.path) as f:
                check_commit(f, entry)
        except Damaged as exc:
            return str(exc)
        return None

    def commits(self) -> list[str]:
        """Names of the commits, in order."""
        with _open_checked(self.path) as f:
            return [s["name"] for s in commit_records(f.attrs)]

    def entry(self, name: str) -> dict | None:
        """The ``commits`` record of ``name`` (name, seconds, finished, fingerprint, inputs), None if absent."""
        with _open_checked(self.path) as f:
            for s in commit_records(f.attrs):
                if s["name"] == name:
                    return s
        return None

    def done(self, name: str, fingerprint: str | None = None) -> bool:
        """Whether ``name`` is committed (and, given ``fingerprint``, was committed under that fingerprint)."""
        with _open_checked(self.path) as f:
            for s in commit_records(f.attrs):
                if s["name"] == name:
                    return fingerprint is None or s.get("fingerprint", fingerprint) == fingerprint
        return False

    @contextmanager
    def commit(self, name: str, replace: tuple[str, ...] = (), started: float | None = None,
              fingerprint: str = "", inputs: Mapping[str, Any] | None = None) -> Iterator[h5py.File]:
        """A transaction writing one unit of a step's work: yields the (copied) file; commits atomically on success.

        Args:
            name: what is committed (``data``, ``models/<arch>/<phase>``, ...), recorded in ``commits``.
            replace: group paths deleted before the commit writes (a forced re-run starts clean).
            started: ``time.perf_counter()`` when the work's computation began, so that the recorded
                ``seconds`` cover the work and not only the write (default: when the transaction opens).
            fingerprint: hash of the settings the results depend on (:meth:`drift.config.Config.step_hash`),
                recorded so that a resume under other settings recomputes them (:meth:`done`).
            inputs: the parts the fingerprint hashes (settings, data, threads, device, ...), recorded so that a
                resume can say which of them changed.
        """
        t0 = time.perf_counter() if started is None else started
        with self._transaction() as f:
            for g in replace:
                if g in f:
                    del f[g]
            yield f
            commits = [s for s in commit_records(f.attrs) if s["name"] != name]
            entry = {"name": name, "seconds": round(time.perf_counter() - t0, 3),
                     "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
            if fingerprint:
                entry["fingerprint"] = fingerprint
            if inputs:
                entry["inputs"] = dict(inputs)
            versions = getattr(self, "_provenance", {}).get("versions")
            if versions:
                entry["versions"] = json.loads(versions)
            entry["digest"] = commit_digests(f, (*replace, name))
            commits.append(entry)
            f.attrs["commits"] = json.dumps(commits)
            if self._config_text:
                # A resume under changed analysis settings: the root config is the one of the newest commit.
                f.attrs["config"] = self._config_text
            # The root provenance (versions, git commit, device) says what computed the newest commit; each
            # commit's own record keeps the versions that computed it.
            f.attrs.update(getattr(self, "_provenance", {}))


class ArchiveReader:
    """Read access to an archive without knowing h5py paths.

    Every method opens the file briefly, so a reader never holds it open while a run writes a new version.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with _open_checked(self.path) as f:
            try:
                self.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            except H5_ERRORS as exc:
                raise ArchiveError(f"{self.path}: root attributes damaged ({exc}); the archive cannot be trusted"
                                   ) from None
        self._verified: set[str] = set()

    @property
    def integrity_note(self) -> str:
        """Empty for an archive whose checksums are verified on reading; else a sentence saying its contents are
        not (schema 3 or older, written before checksums)."""
        version = int(self.attrs.get("schema_version", 0))
        if version >= 4:
            return ""
        return (f"{self.path} has schema version {version}, written before archives carried checksums: its "
                "contents are read unverified (a resumed run upgrades it)")

    def _verify(self, f: h5py.File, path: str) -> None:
        """Check the digest of every commit whose groups overlap ``path`` (each once per reader)."""
        p = path.strip("/")
        for entry in self.commits:
            name = entry["name"]
            if name in self._verified:
                continue
            groups = list((entry.get("digest") or {}).keys())
            if not any(not p or p == g or p.startswith(g + "/") or g.startswith(p + "/") for g in groups):
                continue
            try:
                check_commit(f, entry)
            except Damaged as exc:
                raise ArchiveError(f"{self.path}: {exc.entry} (commit {name!r}) is damaged: {exc.why}; "
                                   "re-run the run to recompute it, or restore a copy of the archive") from None
            self._verified.add(name)

    def _owner(self, path: str) -> str:
        p = path.strip("/")
        for entry in reversed(self.commits):
            if any(p == g or p.startswith(g + "/") for g in (entry.get("digest") or {entry["name"]: ""})):
                return entry["name"]
        return "none"

    # ---- provenance
    @property
    def config_text(self) -> str:
        return str(self.attrs.get("config", ""))

    @property
    def config(self):
        from .config import from_toml_text

        return from_toml_text(self.config_text)

    @property
    def commits(self) -> list[dict]:
        """The commits' records (name, seconds, finished, fingerprint, inputs), in order."""
        return commit_records(self.attrs)

    def has(self, path: str) -> bool:
        with _open_checked(self.path) as f:
            try:
                return path in f
            except H5_ERRORS as exc:
                raise self._damaged(path, exc) from None

    def _damaged(self, path: str, exc: BaseException) -> ArchiveError:
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return ArchiveError(f"{self.path}: {path} (commit {self._owner(path)!r}) is damaged: {why}")

    def read(self, path: str = "/") -> Any:
        """Everything below ``path`` as nested dicts of numpy arrays and attributes."""
        with _open_checked(self.path) as f:
            if not self.has(path):
                raise KeyError(f"{self.path}: no {path!r} in the archive (committed: "
                               f"{[s['name'] for s in self.commits]})")
            self._verify(f, path)
            try:
                return read_tree(f[path])
            except H5_ERRORS as exc:  # damage HDF5 notices (Fletcher32, headers)
                raise self._damaged(path, exc) from None

    def keys(self, path: str = "/") -> list[str]:
        with _open_checked(self.path) as f:
            try:
                return list(f[path].keys()) if path in f else []
            except H5_ERRORS as exc:
                raise self._damaged(path, exc) from None

    # ---- study views
    @property
    def class_names(self) -> list[str]:
        return json.loads(self.read("data").get("class_names", "[]"))

    def archs(self) -> list[str]:
        return self.keys("models")

    def evaluation(self, arch: str, phase: str) -> dict:
        return self.read(f"models/{arch}/{phase}/test")

    def history(self, arch: str, phase: str) -> dict:
        return self.read(f"models/{arch}/{phase}/history")

    # ---- the protocol grid: maps per (layer, score), drift and rankings per cell (layer, score, normalisation)
    def _stored_cells(self) -> list[Cell]:
        out: list[Cell] = []
        for arch in self.keys("drift"):
            for layer in self.keys(f"drift/{arch}"):
                for score in self.keys(f"drift/{arch}/{layer}"):
                    for leaf in self.keys(f"drift/{arch}/{layer}/{score}"):
                        cell = Cell.parse(f"{layer}/{score}/{leaf}")
                        if leaf != "agreement" and cell not in out:
                            out.append(cell)
        return out

    def cells(self) -> list[Cell]:
        """Every scored cell (layer, score, normalisation), the primary one first."""
        out = self._stored_cells()
        primary = self.primary_cell()
        return [primary, *[c for c in out if c != primary]] if primary in out else out

    def primary_cell(self) -> Cell:
        """The cell of the summary's main tables: the config's first layer, score and normalisation (or, when the
        archive holds no drift for that cell, the first cell it holds)."""
        try:
            cfg = self.config
            cell = Cell(cfg.attribution.layers[0], cfg.attribution.scores[0], cfg.metrics.normalize[0],
                        cfg.metrics.upsample[0])
        except Exception:  # a config this version cannot read
            cell = None
        stored = self._stored_cells()
        if cell is None:
            return stored[0] if stored else Cell("block", "logit", "none")
        if cell in stored or not stored:
            return cell
        near = ([c for c in stored if c[:3] == cell[:3]] or [c for c in stored if c[:2] == cell[:2]]
                or [c for c in stored if c.layer == cell.layer] or stored)
        return near[0]

    def _cell(self, cell: Cell | None) -> Cell:
        return self.primary_cell() if cell is None else Cell(*cell)  # a 3-tuple is a LEGACY_UPSAMPLE cell

    def layers(self, arch: str) -> list[str]:
        return [k for k in self.keys(f"attributions/{arch}") if k not in ("targets", "saturated")]

    def layer_info(self, arch: str, layer: str) -> dict:
        """Attributes of a CAM layer of ``arch``: module (dotted name), keras (counterpart name), grid (h, w)."""
        return {k: v for k, v in self.read(f"attributions/{arch}/{layer}").items() if not isinstance(v, dict)}

    def maps(self, arch: str, phase: str, method: str, layer: str | None = None, score: str | None = None
             ) -> np.ndarray:
        """Raw attribution maps (N, h, w) as float32 (primary layer and score unless given)."""
        c = self.primary_cell()
        return self.read(f"attributions/{arch}/{layer or c.layer}/{score or c.score}/{phase}/{method}"
                         ).astype(np.float32)

    def methods(self, arch: str, cell: Cell | None = None) -> list[str]:
        return self.keys(self._cell(cell).drift_path(arch))

    def drift(self, arch: str, method: str, cell: Cell | None = None) -> dict:
        """Per-sample drift metrics of (arch, method) in ``cell`` (default primary): {metric: (N,) array, 'ids',
        'labels', 'valid', 'selected', 'ranked'}."""
        return self.read(f"{self._cell(cell).drift_path(arch)}/{method}/per_sample")

    def drift_summary(self, arch: str, method: str, cell: Cell | None = None) -> dict:
        return self.read(f"{self._cell(cell).drift_path(arch)}/{method}/summary")

    def agreement(self, arch: str, layer: str, score: str) -> dict:
        """Per-image Pearson r between the maps of two methods of one checkpoint: {phase: {"m1 vs m2": (N,)}}."""
        path = f"drift/{arch}/{layer}/{score}/agreement"
        return self.read(path) if self.has(path) else {}

    def ranking(self, cell: Cell | None = None) -> dict:
        """Rank reversal results per ranking metric in ``cell`` (default primary)."""
        path = f"stats/ranking/{self._cell(cell).key}"
        return self.read(path) if self.has(path) else {}

    def stats_attrs(self) -> dict:
        """The statistics step's attributes (ranking sample, its size and per-class counts, the grid's verdict)."""
        return {k: v for k, v in self.read("stats").items() if not isinstance(v, dict)} if self.has("stats") else {}

    def fisher(self, arch: str, phase: str) -> dict:
        return self.read(f"fisher/{arch}/{phase}")

    def bench(self) -> dict:
        return self.read("bench") if self.has("bench") else {}


def open_archive(path: str | os.PathLike) -> ArchiveReader:
    """Open an archive for reading (validates it first)."""
    return ArchiveReader(path)


def open_h5(path: str | os.PathLike) -> h5py.File:
    """The archive as an h5py file, read-only, after the checks every reader makes (the seal or the probe, the
    schema version, the root digest); for code that walks the whole tree (:func:`drift.export.tidy_rows`)."""
    return _open_checked(Path(path))
