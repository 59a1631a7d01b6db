import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from drift.archive import SCHEMA_VERSION, Archive, ArchiveError, ArchiveReader, open_archive
from drift.h5tree import read_tree, write_tree


def test_tree_round_trip(tmp_path, rng):
    n = int(torch.randint(3, 40, (1,), generator=rng))
    tree = {"a": torch.rand(n, 7, generator=rng).numpy(), "b": {"c": np.arange(n), "s": "text", "x": 1.5,
            "ids": np.asarray([f"id{i}" for i in range(n)])}, "big": np.random.default_rng(0).random((300, 20))}
    a = Archive(tmp_path / "a.h5", "seed = 1\n", "h")
    with a.commit("one") as f:
        write_tree(f, tree)
    back = ArchiveReader(tmp_path / "a.h5").read("/")
    np.testing.assert_array_equal(back["a"], tree["a"])
    np.testing.assert_array_equal(back["b"]["c"], tree["b"]["c"])
    assert back["b"]["s"] == "text" and back["b"]["x"] == 1.5
    assert list(back["b"]["ids"]) == list(tree["b"]["ids"])
    np.testing.assert_array_equal(back["big"], tree["big"])
    with h5py.File(tmp_path / "a.h5") as f:
        assert f["big"].compression == "gzip"


def test_failed_commit_leaves_previous_version(tmp_path):
    a = Archive(tmp_path / "a.h5", "", "h")
    with a.commit("one") as f:
        write_tree(f, {"g": {"v": np.ones(3)}})
    with pytest.raises(RuntimeError):
        with a.commit("two") as f:
            write_tree(f, {"h": np.zeros(3)})
            raise RuntimeError("crash inside a commit")
    r = open_archive(tmp_path / "a.h5")
    assert [s["name"] for s in r.commits] == ["one"] and not r.has("h") and r.has("g/v")
    assert not (tmp_path / "a.h5.tmp").exists()


def test_resume_refuses_other_config(tmp_path):
    Archive(tmp_path / "a.h5", "", "hash-one")
    Archive(tmp_path / "a.h5", "", "hash-one")
    with pytest.raises(ArchiveError, match="another configuration"):
        Archive(tmp_path / "a.h5", "", "hash-two")


@pytest.mark.parametrize("content", [b"", b"definitely not hdf5" * 100])
def test_unreadable_files_are_named(tmp_path, content):
    p = tmp_path / "bad.h5"
    p.write_bytes(content)
    with pytest.raises(ArchiveError, match="bad.h5"):
        open_archive(p)
    with pytest.raises(ArchiveError, match="missing.h5"):
        open_archive(tmp_path / "missing.h5")


def test_hdf5_without_schema_is_refused(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(ArchiveError, match="schema_version"):
        open_archive(tmp_path / "other.h5")


WRITER = r"""
import sys, numpy as np
from drift.archive import Archive
from drift.h5tree import write_tree
a = Archive(sys.argv[1], "", "h")
rng = np.random.default_rng(0)
i = len(a.commits())
while True:
    with a.commit(f"s{i}") as f:
        for j in range(20):
            write_tree(f, {f"s{i}": {f"part{j}": rng.random((200, 200))}})
    print(i, flush=True)
    i += 1
"""


def test_kill_during_writes_never_corrupts(tmp_path):
    """SIGKILL a writer at random moments: the archive always opens and each commit is complete."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    path = tmp_path / "run.h5"
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    kills = 0
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, env=env)
        proc.stdout.readline()  # at least one commit made by this writer
        time.sleep(float(rng.uniform(0.0, 0.4)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        r = open_archive(path)
        names = [s["name"] for s in r.commits]
        assert names == [f"s{i}" for i in range(len(names))]
        for name in names:
            grp = r.read(name)
            assert sorted(grp) == sorted(f"part{j}" for j in range(20)), f"commit {name} incomplete"
        assert set(r.keys("/")) == set(names), "a commit's data is present without its record in the list of commits"
    assert kills == 4


def test_read_tree_of_dataset(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["d"] = np.arange(5)
        np.testing.assert_array_equal(read_tree(f["d"]), np.arange(5))


def test_commit_seconds_cover_the_computation(tmp_path):
    """A commit's recorded seconds start when its work began (``started``), not when the write opened."""
    a = Archive(tmp_path / "a.h5", "", "h")
    begun = time.perf_counter() - 2.5  # as if the step had computed for 2.5 s before writing
    with a.commit("work", started=begun) as f:
        write_tree(f, {"v": np.ones(2)})
    t = time.perf_counter()
    with a.commit("quick") as f:
        write_tree(f, {"w": np.ones(2)})
    elapsed = time.perf_counter() - t
    seconds = {s["name"]: s["seconds"] for s in ArchiveReader(tmp_path / "a.h5").commits}
    assert 2.5 <= seconds["work"] < 2.5 + 30
    assert seconds["quick"] <= elapsed + 1e-3


def test_version_2_archive_is_read_and_upgraded_in_place_on_resume(tmp_path, rng):
    """A version-2 archive (``stages`` for the commit list and the baselines' phases) reads as it is, and a run
    that resumes it renames those attributes atomically, keeping every dataset."""
    n = int(torch.randint(3, 30, (1,), generator=rng))
    values = torch.rand(n, 5, generator=rng).numpy()
    path = tmp_path / "old.h5"
    a = Archive(path, "seed = 1\n", "h")
    with a.commit("data") as f:
        write_tree(f, {"data": {"v": values}})
    with a.commit("baselines") as f:
        g = f.require_group("baselines/arch/resnet18")
        g.attrs["phases"] = '["finetune"]'
        f.require_group("baselines/ranking/finetune").attrs["phases"] = '["finetune"]'
    records = [{k: v for k, v in c.items() if k != "digest"} for c in ArchiveReader(path).commits]
    with h5py.File(path, "a") as f:  # what version 2 wrote: no checksums
        f.attrs["stages"] = json.dumps(records)
        del f.attrs["commits"], f.attrs["digest"]
        for g in ("baselines/arch/resnet18", "baselines/ranking/finetune"):
            f[g].attrs["stages"] = f[g].attrs["phases"]
            del f[g].attrs["phases"]
        f.attrs["schema_version"] = 2
    r = ArchiveReader(path)
    assert r.commits == records and [c["name"] for c in records] == ["data", "baselines"]
    a = Archive(path, "seed = 1\n", "h")
    assert a.commits() == ["data", "baselines"] and a.done("data")
    with h5py.File(path) as f:
        assert int(f.attrs["schema_version"]) == SCHEMA_VERSION and "stages" not in f.attrs
        for g in ("baselines/arch/resnet18", "baselines/ranking/finetune"):
            assert f[g].attrs["phases"] == '["finetune"]' and "stages" not in f[g].attrs
        np.testing.assert_array_equal(f["data/v"][()], values)
    assert not (tmp_path / "old.h5.tmp").exists()


def test_newer_schema_is_refused_with_its_version(tmp_path):
    path = tmp_path / "new.h5"
    Archive(path, "", "h")
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(ArchiveError, match="schema version 99"):
        ArchiveReader(path)
