"""One input, one identity: Unicode spellings of one name, two spellings of one path, links to one file or folder."""

import os
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from drift.data import DataError
from drift.data.real import DataWarning, load_csv, load_folder

NAME = "Pleural_effusion_é"
NFC, NFD = unicodedata.normalize("NFC", NAME), unicodedata.normalize("NFD", NAME)


def _png(path: Path, rng) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(path)


def _folder(root: Path, rng, classes=("normal", NFC), n=None) -> dict[str, int]:
    counts = {}
    for cls in classes:
        counts[cls] = n or int(rng.integers(3, 7))
        for i in range(counts[cls]):
            _png(root / cls / f"{i}.png", rng)
    return counts


@pytest.fixture
def nrng(rng):
    return np.random.default_rng(int(rng.initial_seed()))


def test_two_unicode_spellings_of_a_class_folder_are_refused_naming_both(tmp_path, nrng):
    assert NFC != NFD
    _folder(tmp_path, nrng, ("normal", NFC, NFD))
    with pytest.raises(DataError) as e:
        load_folder(tmp_path, 8, 0)
    assert str(tmp_path / NFC) in str(e.value) and str(tmp_path / NFD) in str(e.value)


def test_data_classes_match_folders_in_any_unicode_form(tmp_path, nrng):
    counts = _folder(tmp_path, nrng, ("normal", NFD))
    s = load_folder(tmp_path, 8, 0, classes=["normal", NFC])  # typed composed, stored decomposed
    assert s.test.class_names == ("normal", NFC)
    n = sum(np.bincount(part.labels, minlength=2) for part in (s.train, s.val, s.test))
    assert n.tolist() == [counts["normal"], counts[NFD]]
    s = load_folder(tmp_path, 8, 0)
    assert s.test.class_names == (NFD, "normal")  # sorted, in the folder's own spelling


def test_csv_labels_in_two_forms_are_one_class_and_nfc_paths_find_nfd_files(tmp_path, nrng):
    n = int(nrng.integers(4, 8))
    rows = ["path,label"]
    for i in range(n):
        for cls in ("normal", NFD):
            _png(tmp_path / "img" / f"{cls}_{i}.png", nrng)  # stored decomposed
            label = cls if cls == "normal" else (NFC if i % 2 else NFD)
            rows.append(f"img/{unicodedata.normalize('NFC', cls)}_{i}.png,{label}")  # listed composed
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    s = load_csv(tmp_path / "m.csv", 8, 0)
    assert len(s.test.class_names) == 2 and unicodedata.normalize("NFC", s.test.class_names[0]) == NFC
    assert sum(np.bincount(p.labels, minlength=2) for p in (s.train, s.val, s.test)).tolist() == [n, n]


def test_csv_relative_and_absolute_paths_are_one_file_whatever_the_data_path(tmp_path, nrng, monkeypatch):
    for cls in ("a", "b"):
        for i in range(4):
            _png(tmp_path / "d" / cls / f"{i}.png", nrng)
    k = int(nrng.integers(0, 4))
    rows = ["path,label"] + [f"{c}/{i}.png,{c}" for c in ("a", "b") for i in range(4)]
    rows.append(f"{tmp_path / 'd' / 'b' / f'{k}.png'},b")
    (tmp_path / "d" / "m.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.chdir(tmp_path)
    for manifest in ("d/m.csv", "./d/../d/m.csv", tmp_path / "d" / "m.csv"):
        with pytest.raises(DataError, match=f"line 10: path .*already listed on line {k + 6}"):
            load_csv(manifest, 8, 0)


def test_a_class_folder_linked_to_another_or_to_the_root_is_refused(tmp_path, nrng):
    root = tmp_path / "data"
    _folder(root, nrng, ("a", "b"))
    for target in (root / "a", root):
        link = root / "c"
        link.symlink_to(target, target_is_directory=True)
        with pytest.raises(DataError) as e:
            load_folder(root, 8, 0)
        assert str(link) in str(e.value) and (str(root / "a") in str(e.value) or "data root" in str(e.value))
        link.unlink()
    assert load_folder(root, 8, 0).test.class_names == ("a", "b")


def test_a_file_linked_into_another_class_is_refused_and_into_its_own_merged(tmp_path, nrng):
    root = tmp_path / "data"
    counts = _folder(root, nrng, ("a", "b"), n=int(nrng.integers(4, 7)))
    (root / "b" / "linked.png").symlink_to(root / "a" / "1.png")
    with pytest.raises(DataError) as e:
        load_folder(root, 8, 0)
    assert "two labels" in str(e.value) and "linked.png" in str(e.value) and str(root / "a" / "1.png") in str(e.value)
    (root / "b" / "linked.png").unlink()
    os.link(root / "a" / "2.png", root / "a" / "z_hard.png")  # a hard link within its class: used once
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        s = load_folder(root, 8, 0)
    assert any(issubclass(x.category, DataWarning) and "z_hard.png" in str(x.message) for x in w)
    total = sum(np.bincount(p.labels, minlength=2) for p in (s.train, s.val, s.test))
    assert total.tolist() == [counts["a"], counts["b"]]
