"""A damaged archive is noticed: checksums per commit and on the root attributes, Fletcher32 on arrays; the reader
names the damaged entry and its commit; schema-3 archives read unverified and are upgraded on resume."""

import json

import h5py
import numpy as np
import pytest
import torch

from drift import integrity
from drift.archive import SCHEMA_VERSION, Archive, ArchiveError, ArchiveReader, open_archive
from drift.h5tree import write_tree
from drift.integrity import SEAL_BYTES, group_digest, seal_state


def _flip_bit(path, needle: bytes, bit: int = 0) -> None:
    """Flip one bit of the only occurrence of ``needle`` in the file (a stored value, as the disk holds it)."""
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0, "the value must occur once in the file"
    data[at + bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(data))


def _archive(tmp_path, rng):
    """An archive with two commits: a model's test results (an accuracy attribute, logits) and a data group."""
    path = tmp_path / "archive.h5"
    n, c = (int(v) for v in torch.randint(3, 40, (2,), generator=rng))
    logits = torch.randn(n, c, generator=rng).numpy().astype(np.float32)
    accuracy = float(torch.rand(1, generator=rng))
    a = Archive(path, "seed = 1\n", "h", {"versions": {"torch": torch.__version__}})
    with a.commit("data", replace=("data",)) as f:
        write_tree(f.require_group("data"), {"test": {"ids": np.asarray([f"img-{i}.png" for i in range(n)])}})
        f["data"].attrs["class_names"] = json.dumps([f"class {k}" for k in range(c)])
    with a.commit("models/r/transfer", replace=("models/r/transfer",)) as f:
        write_tree(f.require_group("models/r/transfer"), {"test": {"logits": logits, "accuracy": accuracy}})
    return path, logits, accuracy


def test_every_commit_records_digests_and_arrays_carry_fletcher32(tmp_path, rng):
    path, logits, accuracy = _archive(tmp_path, rng)
    r = open_archive(path)
    assert r.attrs["schema_version"] == SCHEMA_VERSION and not r.integrity_note
    with h5py.File(path) as f:
        assert f["models/r/transfer/test/logits"].fletcher32
        for c in r.commits:  # the recorded digest is the sha256 of the group as stored (an independent read)
            assert c["digest"] == {p: group_digest(f[p]) for p in c["digest"]} and c["digest"]
        assert c["versions"] == {"torch": torch.__version__}
    np.testing.assert_array_equal(r.read("models/r/transfer/test/logits"), logits)
    assert r.read("models/r/transfer/test")["accuracy"] == accuracy


def test_a_flipped_bit_in_an_attribute_is_named_with_its_commit(tmp_path, rng):
    path, _, accuracy = _archive(tmp_path, rng)
    _flip_bit(path, np.float64(accuracy).tobytes(), bit=int(torch.randint(0, 52, (1,), generator=rng)))
    r = open_archive(path)
    assert r.read("data/test")["ids"].shape  # an intact commit still reads
    with pytest.raises(ArchiveError, match=r"models/r/transfer \(commit 'models/r/transfer'\) is damaged: "
                                           "checksum mismatch"):
        r.read("models/r/transfer/test")
    with pytest.raises(ArchiveError, match="is damaged"):
        open_archive(path).read("/")


def test_a_flipped_bit_in_an_array_is_named_never_returned(tmp_path, rng):
    path, logits, _ = _archive(tmp_path, rng)
    k = int(torch.randint(0, logits.size, (1,), generator=rng))
    _flip_bit(path, logits.reshape(-1)[k:k + 2].tobytes(), bit=30)  # an exponent bit: -0.2 would read as -7e37
    with pytest.raises(ArchiveError, match=r"models/r/transfer.*\(commit 'models/r/transfer'\) is damaged"):
        open_archive(path).read("models/r/transfer/test/logits")
    assert Archive(path, "seed = 1\n", "h").damaged("models/r/transfer")  # a resume recomputes it
    assert Archive(path, "seed = 1\n", "h").damaged("data") is None


def test_damaged_root_attributes_or_strings_are_named(tmp_path, rng):
    path, _, _ = _archive(tmp_path, rng)
    _flip_bit(path, b"seed = 1\n", bit=9)  # the stored config text
    with pytest.raises(ArchiveError, match="root attributes .* damaged: checksum mismatch"):
        ArchiveReader(path)
    (tmp_path / "b").mkdir()
    path2, _, _ = _archive(tmp_path / "b", rng)
    _flip_bit(path2, b"img-1.png", bit=2)  # a string dataset: no Fletcher32, the digest notices
    with pytest.raises(ArchiveError, match=r"data \(commit 'data'\) is damaged"):
        open_archive(path2).read("data/test/ids")


def test_a_schema_3_archive_reads_unverified_and_is_upgraded_on_resume(tmp_path, rng):
    path, logits, _ = _archive(tmp_path, rng)
    with h5py.File(path, "a") as f:  # what version 3 wrote: no checksums
        commits = [{k: v for k, v in c.items() if k != "digest"} for c in json.loads(f.attrs["commits"])]
        f.attrs["commits"] = json.dumps(commits)
        f.attrs["schema_version"] = 3
        del f.attrs["digest"]
    r = open_archive(path)
    assert "read unverified" in r.integrity_note and "schema version 3" in r.integrity_note
    np.testing.assert_array_equal(r.read("models/r/transfer/test/logits"), logits)
    Archive(path, "seed = 1\n", "h")  # a resume upgrades it in place
    r = open_archive(path)
    assert r.attrs["schema_version"] == SCHEMA_VERSION and not r.integrity_note
    with h5py.File(path) as f:
        assert [c["digest"] for c in r.commits] == [{c["name"]: group_digest(f[c["name"]])} for c in r.commits]
    np.testing.assert_array_equal(r.read("models/r/transfer/test/logits"), logits)


SYNTHETIC = [
    'run.archs=["resnet10t"]', "run.progress=false", "data.image_size=64", "data.n_train=12", "data.n_val=6",
    "data.n_test=6", "model.weights=none", "train.transfer.epochs=1", "train.finetune.epochs=1",
    "train.transfer.batch_size=6", "train.finetune.batch_size=6", "fisher.enabled=false", "report.enabled=false",
    "metrics.n_boot=10",
]


def test_summary_report_compare_stop_on_a_damaged_value_and_a_resume_recomputes_it(tmp_path, capsys, rng):
    import contextlib
    import io

    from drift import config
    from drift.cli import main
    from drift.pipeline import Pipeline

    cfg = config.load(None, [*SYNTHETIC, f'run.out="{tmp_path}"'])
    path = Pipeline(cfg).run(("data", "train"))
    name = "models/resnet10t/transfer"
    stored = open_archive(path).read(f"{name}/test")["accuracy"]
    with h5py.File(path, "a") as f:  # one changed value, as a flipped bit leaves it: 0.067 read as 0.063
        f[f"{name}/test"].attrs["accuracy"] = stored + float(torch.rand(1, generator=rng) + 0.01) / 100
    for argv in (["summary", str(path)], ["report", str(path), "--out", str(tmp_path / "rep")],
                 ["compare", str(path), str(path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert f"{name} (commit '{name}') is damaged: checksum mismatch" in err
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        Pipeline(cfg).run(("data", "train"))
    assert f"{name}: damaged in the archive ({name}: checksum mismatch" in buf.getvalue()
    assert "finetune: damaged" not in buf.getvalue()
    r = open_archive(path)
    assert r.read(f"{name}/test")["accuracy"] == stored  # recomputed: the same training gives the same value


def test_the_seal_is_the_sha256_of_the_bytes_after_the_user_block_and_an_intact_one_skips_the_probe(
        tmp_path, rng, monkeypatch):
    path, logits, _ = _archive(tmp_path, rng)
    raw = path.read_bytes()
    import hashlib

    assert raw[SEAL_BYTES:SEAL_BYTES + 8] == b"\x89HDF\r\n\x1a\n"  # HDF5's superblock after the user block
    assert hashlib.sha256(raw[SEAL_BYTES:]).hexdigest().encode() in raw[:SEAL_BYTES]
    assert seal_state(path) == "intact"

    def no_probe(*_):
        raise AssertionError("an intact seal needs no probe")

    monkeypatch.setattr(integrity, "probe", no_probe)
    monkeypatch.setattr("drift.archive.probe", no_probe)
    np.testing.assert_array_equal(open_archive(path).read("models/r/transfer/test/logits"), logits)
    data = bytearray(raw)
    data[int(torch.randint(0, len(data), (1,), generator=rng))] ^= 1 << int(torch.randint(0, 8, (1,), generator=rng))
    path.write_bytes(bytes(data))
    assert seal_state(path) == "broken"  # any flipped bit, in the seal or after it
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f.attrs["schema_version"] = 4
    assert seal_state(tmp_path / "plain.h5") == "unsealed"


@pytest.mark.parametrize("child, why", [("import time; time.sleep(60)", "did not finish parsing it within 1 s"),
                                        ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)",
                                         "crashed parsing it (signal 11)")])
def test_a_file_hdf5_cannot_parse_to_the_end_is_one_archive_error_not_a_hang(tmp_path, rng, monkeypatch, child, why):
    """The probe's verdicts, with the child replaced by one that hangs or crashes as HDF5 can on damaged metadata:
    the reader stops within the time limit with one ArchiveError naming the file; an undamaged file is read."""
    import time

    path, logits, _ = _archive(tmp_path, rng)
    data = bytearray(path.read_bytes())
    data[int(torch.randint(0, SEAL_BYTES - 100, (1,), generator=rng))] ^= 4  # a broken seal, HDF5's bytes intact
    path.write_bytes(bytes(data))
    np.testing.assert_array_equal(open_archive(path).read("models/r/transfer/test/logits"), logits)
    monkeypatch.setattr("drift.archive._PARSEABLE", set())  # forget that this file was found parseable
    monkeypatch.setattr(integrity, "_PROBE", child)
    monkeypatch.setattr(integrity, "PROBE_SECONDS", 1.0)
    t0 = time.perf_counter()
    with pytest.raises(ArchiveError) as err:
        open_archive(path)
    assert time.perf_counter() - t0 < 30
    assert str(path) in str(err.value) and why in str(err.value) and "restore a copy" in str(err.value)


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return np.array_equal(np.asarray(a), np.asarray(b))


def test_random_bit_flips_read_back_unchanged_or_stop_with_one_archive_error(tmp_path, rng, monkeypatch):
    """Any one flipped bit, anywhere in the file (the seal included): the reader returns exactly what was committed
    (a bit HDF5 never reads: free space, padding) or raises ArchiveError -- never another value, never a raw h5py
    error, never a hang (some bits in HDF5's global heap send the library into an endless loop: the probe's time
    limit ends those)."""
    monkeypatch.setattr(integrity, "PROBE_SECONDS", 5.0)
    path, _, _ = _archive(tmp_path, rng)
    good = open_archive(path).read("/")
    raw = path.read_bytes()
    outcomes = {"equal": 0, "error": 0}
    for _ in range(50):
        data = bytearray(raw)
        k = int(torch.randint(0, len(data), (1,), generator=rng))
        data[k] ^= 1 << int(torch.randint(0, 8, (1,), generator=rng))
        path.write_bytes(bytes(data))
        try:
            back = open_archive(path).read("/")
        except ArchiveError:
            outcomes["error"] += 1
            continue
        assert _same(back, good), f"a flipped bit at byte {k} read back as other data"
        outcomes["equal"] += 1
    assert outcomes["error"] > 0


@pytest.fixture(scope="module", autouse=True)
def _torch_references(reference_kernels):
    """Every test here, module fixtures included, on the kernels' torch references (tests/conftest.py)."""
