"""Real-data loaders: formats, folder and CSV layouts, patient-grouped stratified splits, bad input."""

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from drift.data import DataError, DataWarning, assign_splits, decode_image, load_csv, load_folder, read_image


def _seed(rng: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=rng))


def _u8(rng: torch.Generator, *shape: int) -> np.ndarray:
    return torch.randint(0, 256, shape, generator=rng, dtype=torch.uint8).numpy()


def _save(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def _make_classes(root: Path, rng: torch.Generator, counts: dict[str, int], shape=(9, 7)) -> dict[str, np.ndarray]:
    """Write ``counts[c]`` random 8-bit PNGs into ``root/c/``; returns ``{relative path: pixels}``."""
    arrays = {}
    for c, k in counts.items():
        for i in range(k):
            a = _u8(rng, *shape)
            _save(root / c / f"img{i:03d}.png", a)
            arrays[f"{c}/img{i:03d}.png"] = a
    return arrays


def _truncated_png(path: Path, rng: torch.Generator) -> Path:
    _save(path, _u8(rng, 31, 29))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _all(splits):
    return [splits.train, splits.val, splits.test]


# -- formats -----------------------------------------------------------------------------------------------------

def test_8bit_png_native_and_resized_against_pil(rng, tmp_path):
    a = _u8(rng, 19, 23)
    p = _save(tmp_path / "x.png", a)
    np.testing.assert_array_equal(decode_image(p), a.astype(np.float32) / 255)
    # Antialiased bilinear resize matches PIL's own BILINEAR resize of the float image (a triangle filter).
    for size in (11, 29):
        ref = np.asarray(Image.fromarray(a.astype(np.float32) / 255).resize((size, size), Image.BILINEAR))
        np.testing.assert_allclose(read_image(p, size), ref, atol=2e-6)


def test_16bit_png_scaled_by_65535(rng, tmp_path):
    a = torch.randint(0, 65536, (17, 13), generator=rng, dtype=torch.int32).numpy().astype(np.uint16)
    a[0, 0], a[0, 1] = 0, 65535
    p = _save(tmp_path / "x16.png", a)
    out = decode_image(p)
    np.testing.assert_allclose(out, a.astype(np.float64) / 65535.0, rtol=1e-6, atol=0)
    assert out.dtype == np.float32 and out[0, 1] == 1.0


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P"])
def test_colour_modes_use_pil_conversion(rng, tmp_path, mode):
    channels = {"RGB": 3, "RGBA": 4, "LA": 2, "P": 3}[mode]
    a = _u8(rng, 15, 21, channels)
    im = Image.fromarray(a)
    if mode == "P":
        im = im.quantize(colors=37)
    assert im.mode == mode
    p = tmp_path / f"x_{mode}.png"
    im.save(p)
    out = decode_image(p)
    ref = np.asarray(Image.open(p).convert("L")).astype(np.float32) / 255
    np.testing.assert_array_equal(out, ref)
    if mode in ("RGB", "RGBA"):
        luma = (0.299 * a[..., 0] + 0.587 * a[..., 1] + 0.114 * a[..., 2]) / 255  # ITU-R 601-2, alpha ignored
        np.testing.assert_allclose(out, luma, atol=1 / 255 + 1e-6)


def test_jpeg_decodes_like_pil(rng, tmp_path):
    a = _u8(rng, 33, 27, 3)
    p = _save(tmp_path / "x.jpg", a, quality=90)
    ref = np.asarray(Image.open(p).convert("L")).astype(np.float32) / 255
    np.testing.assert_array_equal(decode_image(p), ref)


def test_bad_files_are_named(rng, tmp_path):
    truncated = _truncated_png(tmp_path / "cut.png", rng)
    with pytest.raises(DataError, match="cut.png"):
        decode_image(truncated)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(DataError, match=r"notes\.png.*not an image"):
        decode_image(text)
    with pytest.raises(DataError, match="nowhere.png.*not found"):
        decode_image(tmp_path / "nowhere.png")


def test_dicom_without_pydicom_names_file_and_extra(tmp_path, monkeypatch):
    p = tmp_path / "scan.dcm"
    p.write_bytes(b"\0" * 132)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # makes `import pydicom` raise ImportError
    with pytest.raises(DataError, match=r"scan\.dcm.*pip install drift-cxr\[dicom\]"):
        decode_image(p)


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_dicom_rescale_and_inversion(rng, tmp_path, monkeypatch, photometric):
    raw = torch.randint(0, 4096, (13, 11), generator=rng).numpy().astype(np.uint16)
    slope, intercept = 0.5 + float(torch.rand(1, generator=rng)), -1024.0
    fake = types.ModuleType("pydicom")
    fake.dcmread = lambda path: types.SimpleNamespace(pixel_array=raw, RescaleSlope=slope,
                                                      RescaleIntercept=intercept, PhotometricInterpretation=photometric)
    monkeypatch.setitem(sys.modules, "pydicom", fake)
    p = tmp_path / "scan.dcm"
    p.write_bytes(b"\0" * 132)
    hu = raw * slope + intercept
    ref = (hu - hu.min()) / (hu.max() - hu.min())
    if photometric == "MONOCHROME1":
        ref = 1 - ref
    np.testing.assert_allclose(decode_image(p), ref, atol=1e-6)


# -- folders -----------------------------------------------------------------------------------------------------

def test_folder_split_is_complete_stratified_and_seeded(rng, tmp_path):
    counts = {"normal": 31, "effusion": 23, "nodule": 17}
    arrays = _make_classes(tmp_path, rng, counts)
    seed = _seed(rng)
    splits = load_folder(tmp_path, 9, seed)
    assert splits.class_names == ("effusion", "nodule", "normal") and splits.skipped == []
    ids = [i for s in _all(splits) for i in s.ids]
    assert sorted(ids) == sorted(arrays)
    for s, frac in zip(_all(splits), (0.65, 0.15, 0.2)):
        assert s.lung_masks is None and s.patient_ids is None
        for c, name in enumerate(splits.class_names):
            n_c = counts[name]
            got = (s.labels == c).sum()
            assert got >= 1 and abs(got - frac * n_c) <= 1.0, (name, got, frac * n_c)
        assert all(s.class_names[lab] == i.split("/")[0] for lab, i in zip(s.labels, s.ids))
    # Lazy items carry the file's pixels (size 9 = native height; width 7 is stretched).
    k = 0
    image, _ = splits.test[k]
    ref = np.asarray(Image.fromarray(arrays[splits.test.ids[k]].astype(np.float32) / 255).resize((9, 9),
                                                                                                  Image.BILINEAR))
    np.testing.assert_allclose(image[0].numpy(), ref, atol=2e-6)
    again = load_folder(tmp_path, 9, seed)
    assert [s.ids for s in _all(again)] == [s.ids for s in _all(splits)]
    others = [load_folder(tmp_path, 9, seed + k).test.ids for k in range(1, 4)]
    assert any(sorted(o) != sorted(splits.test.ids) for o in others)


def test_16bit_and_rgba_through_the_folder_loader(rng, tmp_path):
    a16 = torch.randint(0, 65536, (12, 12), generator=rng, dtype=torch.int32).numpy().astype(np.uint16)
    rgba = _u8(rng, 12, 12, 4)
    for c in ("a", "b"):
        for i in range(3):
            _save(tmp_path / c / f"w{i}.png", a16)
            _save(tmp_path / c / f"c{i}.png", rgba)
    splits = load_folder(tmp_path, 12, 0)
    for s in _all(splits):
        for i, name in enumerate(s.ids):
            ref = a16 / 65535.0 if "/w" in name else np.asarray(Image.open(tmp_path / name).convert("L")) / 255.0
            np.testing.assert_allclose(s[i][0][0].numpy(), ref, rtol=1e-6, atol=1e-7)
        assert torch.equal(s.images(), torch.stack([s[i][0] for i in range(len(s))]))
        assert s.subset([-1]).ids == s.ids[-1:] and s.subset([-1]).paths == s.paths[-1:]


def test_bad_file_raises_or_is_skipped_with_a_warning(rng, tmp_path):
    _make_classes(tmp_path, rng, {"a": 7, "b": 5})
    _truncated_png(tmp_path / "a" / "broken.png", rng)
    (tmp_path / "b" / "readme.txt").write_text("hello")
    with pytest.raises(DataError, match=r"2 bad input file.*broken\.png.*readme\.txt.*skip_bad"):
        load_folder(tmp_path, 8, 0)
    with pytest.warns(DataWarning) as record:
        splits = load_folder(tmp_path, 8, 0, skip_bad=True)
    messages = " ".join(str(w.message) for w in record)
    assert "broken.png" in messages and "readme.txt" in messages
    assert sorted(f for f, _ in splits.skipped) == ["a/broken.png", "b/readme.txt"]
    assert all("truncated" in why or "not an image" in why for _, why in splits.skipped)
    ids = [i for s in _all(splits) for i in s.ids]
    assert len(ids) == 12 and "a/broken.png" not in ids


def test_file_damaged_after_validation_fails_naming_it(rng, tmp_path):
    _make_classes(tmp_path, rng, {"a": 5, "b": 5})
    splits = load_folder(tmp_path, 8, 0)
    victim = tmp_path / splits.train.ids[0]
    victim.write_bytes(victim.read_bytes()[:20])
    with pytest.raises(DataError, match=victim.name):
        splits.train[0]


def test_structural_problems_raise_even_with_skip_bad(rng, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_folder(tmp_path / "missing", 8, 0)
    _make_classes(tmp_path / "one", rng, {"only": 6})
    with pytest.raises(DataError, match="only 1 class"):
        load_folder(tmp_path / "one", 8, 0, skip_bad=True)
    _make_classes(tmp_path / "empty", rng, {"a": 6, "b": 6})
    (tmp_path / "empty" / "c").mkdir()
    with pytest.raises(DataError, match="'c'.*no image files"):
        load_folder(tmp_path / "empty", 8, 0, skip_bad=True)
    _make_classes(tmp_path / "allbad", rng, {"a": 6})
    (tmp_path / "allbad" / "b").mkdir()
    (tmp_path / "allbad" / "b" / "x.png").write_text("junk")
    with pytest.warns(DataWarning), pytest.raises(DataError, match="'b'.*no usable images"):
        load_folder(tmp_path / "allbad", 8, 0, skip_bad=True)
    _make_classes(tmp_path / "few", rng, {"a": 9, "b": 2})
    with pytest.raises(DataError, match="'b' has only 2 images"):
        load_folder(tmp_path / "few", 8, 0)
    with pytest.raises(ValueError, match="val_fraction"):
        load_folder(tmp_path / "few", 8, 0, val_fraction=0.0)
    with pytest.raises(ValueError, match="test_fraction"):
        load_folder(tmp_path / "few", 8, 0, val_fraction=0.5, test_fraction=0.5)


def test_pre_split_folders(rng, tmp_path):
    layout = {"train": {"x": 5, "y": 7}, "val": {"x": 2, "y": 1}, "test": {"x": 3, "y": 3}}
    for split, counts in layout.items():
        _make_classes(tmp_path / split, rng, counts)
    splits = load_folder(tmp_path, 8, 0)
    for s, name in zip(_all(splits), ("train", "val", "test")):
        assert all(i.startswith(f"{name}/") for i in s.ids)
        assert len(s) == sum(layout[name].values())
        assert [s.class_names[lab] for lab in s.labels] == [i.split("/")[1] for i in s.ids]
    # Without val, val is carved out of train.
    no_val = tmp_path / "noval"
    for split in ("train", "test"):
        _make_classes(no_val / split, rng, {"x": 11, "y": 13})
    splits = load_folder(no_val, 8, 0, val_fraction=0.25)
    assert all(i.startswith("train/") for i in splits.val.ids + splits.train.ids)
    assert not set(splits.val.ids) & set(splits.train.ids)
    assert len(splits.val) + len(splits.train) == 24 and len(splits.val) == 6
    # A split without a class, and a mixed layout.
    bad = tmp_path / "bad"
    _make_classes(bad / "train", rng, {"x": 4, "y": 4})
    _make_classes(bad / "test", rng, {"x": 4})
    with pytest.raises(DataError, match="'test'.*'y'"):
        load_folder(bad, 8, 0)
    _make_classes(bad / "test", rng, {"y": 2})
    (bad / "z").mkdir()
    with pytest.raises(DataError, match="mixes split folders"):
        load_folder(bad, 8, 0)


@pytest.mark.parametrize("val_name", ["valid", "validation"])
def test_split_folders_valid_and_validation_are_val(rng, tmp_path, val_name):
    # The common train/valid/test layout (e.g. NIH chest X-ray exports): "valid" / "validation" is the val split.
    counts = {"train": {"a": 4, "b": 5}, val_name: {"a": 2, "b": 3}, "test": {"a": 3, "b": 2}}
    arrays = {}
    for split, c in counts.items():
        arrays.update({f"{split}/{k}": v for k, v in _make_classes(tmp_path / split, rng, c, (9, 9)).items()})
    splits = load_folder(tmp_path, 9, _seed(rng))
    assert sorted(splits.val.ids) == sorted(k for k in arrays if k.startswith(f"{val_name}/"))
    assert len(splits.train) == 9 and len(splits.test) == 5
    # Labels follow the class folder, pixels the file (native size: no resampling).
    for i, lab in zip(splits.val.ids, splits.val.labels):
        assert splits.val.class_names[lab] == i.split("/")[1]
    x = splits.val.images(np.arange(len(splits.val))).numpy()[:, 0]
    ref = np.stack([arrays[i] for i in splits.val.ids]).astype(np.float32) / 255
    np.testing.assert_allclose(x, ref, atol=2e-6)
    # Two folders naming one split are refused, naming both.
    _make_classes(tmp_path / "val", rng, {"a": 1, "b": 1})
    with pytest.raises(DataError, match=f"'val' and '{val_name}'|'{val_name}' and 'val'"):
        load_folder(tmp_path, 9, 0)


# -- CSV manifests -----------------------------------------------------------------------------------------------

def _write_manifest(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _patients(tmp_path: Path, rng: torch.Generator, n_patients: int):
    """Random patients with 1-4 images each, one label per patient; files under tmp_path/img/."""
    rows, truth = [], {}
    classes = ("normal", "effusion", "nodule")
    for p in range(n_patients):
        label = classes[int(torch.randint(0, 3, (1,), generator=rng))]
        for k in range(int(torch.randint(1, 5, (1,), generator=rng))):
            rel = f"img/p{p:03d}_{k}.png"
            _save(tmp_path / rel, _u8(rng, 6, 6))
            rows.append(f"{rel},{label},P{p:03d}")
            truth[rel] = (label, f"P{p:03d}")
    return rows, truth


def test_csv_patient_grouping_and_stratification(rng, tmp_path):
    rows, truth = _patients(tmp_path, rng, 61)
    manifest = _write_manifest(tmp_path / "m.csv", "path,label,patient_id", rows)
    seed = _seed(rng)
    splits = load_csv(manifest, 6, seed)
    seen = {}
    for k, s in enumerate(_all(splits)):
        assert len(set(s.labels)) == 3
        for i, pid in zip(s.ids, s.patient_ids):
            assert truth[i][1] == pid
            assert seen.setdefault(pid, k) == k, f"patient {pid} in two splits"
        assert [s.class_names[lab] for lab in s.labels] == [truth[i][0] for i in s.ids]
    assert sorted(i for s in _all(splits) for i in s.ids) == sorted(truth)
    n = len(truth)
    for s, frac in zip(_all(splits), (0.65, 0.15, 0.2)):
        assert abs(len(s) / n - frac) < 0.08
    assert [s.ids for s in _all(load_csv(manifest, 6, seed))] == [s.ids for s in _all(splits)]


def test_csv_split_column_root_and_patient_leak(rng, tmp_path):
    data = tmp_path / "data"
    rows = []
    for i, (label, split) in enumerate([("a", "train"), ("b", "train"), ("a", "train"), ("b", "Train"),
                                        ("a", "val"), ("b", "validation"), ("a", "test"), ("b", "test")]):
        _save(data / f"{i}.png", _u8(rng, 5, 5))
        rows.append(f"{i}.png,{label},{split},P{i}")
    (tmp_path / "lists").mkdir()
    manifest = _write_manifest(tmp_path / "lists" / "m.csv", "Path,Label,Split,Patient_ID", rows)
    splits = load_csv(manifest, 5, 0, root=data)
    assert splits.train.ids == ["0.png", "1.png", "2.png", "3.png"]
    assert splits.val.ids == ["4.png", "5.png"] and splits.test.ids == ["6.png", "7.png"]
    leak = _write_manifest(tmp_path / "lists" / "leak.csv", "path,label,split,patient_id",
                           rows[:-1] + ["7.png,b,test,P0"])
    with pytest.raises(DataError, match="patient 'P0'.*'train'.*'test'"):
        load_csv(leak, 5, 0, root=data)
    odd = _write_manifest(tmp_path / "lists" / "odd.csv", "path,label,split", ["0.png,a,holdout"])
    with pytest.raises(DataError, match="line 2.*'holdout'"):
        load_csv(odd, 5, 0, root=data)


def test_csv_bad_rows(rng, tmp_path):
    for i in range(12):
        _save(tmp_path / f"{i}.png", _u8(rng, 5, 5))
    rows = [f"{i}.png,{'ab'[i % 2]}" for i in range(12)]
    with pytest.raises(DataError, match="does not exist"):
        load_csv(tmp_path / "none.csv", 5, 0)
    with pytest.raises(DataError, match="'label' column"):
        load_csv(_write_manifest(tmp_path / "m1.csv", "path,class", rows), 5, 0)
    with pytest.raises(DataError, match="line 3.*unknown label 'b'"):
        load_csv(_write_manifest(tmp_path / "m2.csv", "path,label", rows), 5, 0, classes=("a", "c"))
    with pytest.raises(DataError, match="'c'.*no usable images"):
        load_csv(_write_manifest(tmp_path / "m2b.csv", "path,label", rows), 5, 0, classes=("a", "b", "c"))
    missing = _write_manifest(tmp_path / "m3.csv", "path,label", [*rows, "ghost.png,a"])
    with pytest.raises(DataError, match="ghost.png.*not found"):
        load_csv(missing, 5, 0)
    with pytest.warns(DataWarning, match="ghost.png"):
        splits = load_csv(missing, 5, 0, skip_bad=True)
    assert [f for f, _ in splits.skipped] == ["ghost.png"]
    with pytest.raises(DataError, match="line 14.*already listed on line 2"):
        load_csv(_write_manifest(tmp_path / "m4.csv", "path,label", [*rows, "0.png,a"]), 5, 0)
    with pytest.raises(DataError, match="line 3.*empty 'label'"):
        load_csv(_write_manifest(tmp_path / "m5.csv", "path,label", [rows[0], "1.png,"]), 5, 0)
    with pytest.raises(DataError, match="only 1 class"):
        load_csv(_write_manifest(tmp_path / "m6.csv", "path,label", [f"{i}.png,a" for i in range(6)]), 5, 0)


def test_csv_integer_labels_sort_numerically(rng, tmp_path):
    rows = []
    for i in range(18):
        _save(tmp_path / f"{i}.png", _u8(rng, 4, 4))
        rows.append(f"{i}.png,{(2, 10, 1)[i % 3]}")
    splits = load_csv(_write_manifest(tmp_path / "m.csv", "path,label", rows), 4, 0)
    assert splits.class_names == ("1", "2", "10")
    for s in _all(splits):
        assert [s.class_names[lab] for lab in s.labels] == [str((2, 10, 1)[int(i[:-4]) % 3]) for i in s.ids]


# -- the split assignment itself ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n_groups", [17, 123])
def test_assign_splits_groups_strata_and_fractions(rng, n_groups):
    sizes = torch.randint(1, 5, (n_groups,), generator=rng).numpy()
    # At least 5 patients per class, so every split can get every class.
    group_label = (torch.randperm(n_groups, generator=rng) % 3).numpy()
    groups = np.repeat([f"g{k}" for k in range(n_groups)], sizes)
    labels = np.repeat(group_label, sizes)
    # A few images carry another label than their patient's majority (multi-finding patients).
    flip = torch.rand(len(labels), generator=rng).numpy() < 0.1
    labels[flip] = (labels[flip] + 1) % 3
    fractions = (0.6, 0.15, 0.25)
    split = assign_splits(labels, list(groups), fractions, _seed(rng), ("a", "b", "c"))
    for g in np.unique(groups):
        assert len(set(split[groups == g])) == 1
    for s in range(3):
        assert set(labels[split == s]) == {0, 1, 2}
        for c in range(3):
            n_c = (labels == c).sum()
            got = ((split == s) & (labels == c)).sum()
            # Greedy by largest deficit: each split is off by at most a few patients' worth of images.
            assert abs(got - fractions[s] * n_c) <= 3 * sizes.max() + 0.15 * n_c
    one_each = assign_splits(labels, None, fractions, 0, ("a", "b", "c"))
    for s in range(3):
        assert abs((one_each == s).sum() - fractions[s] * len(labels)) <= 3


def test_assign_splits_rejects_bad_arguments():
    labels = np.array([0, 1, 0, 1, 0, 1])
    with pytest.raises(ValueError, match="fractions"):
        assign_splits(labels, None, (0.5, 0.2, 0.2), 0, ("a", "b"))
    with pytest.raises(ValueError, match="labels must lie"):
        assign_splits(labels + 1, None, (0.6, 0.2, 0.2), 0, ("a", "b"))
    with pytest.raises(ValueError, match="groups has 2"):
        assign_splits(labels, ["p", "q"], (0.6, 0.2, 0.2), 0, ("a", "b"))


# -- nothing silently wrong ----------------------------------------------------------------------------------------

def test_csv_two_spellings_of_one_path_are_rejected_naming_both_rows(rng, tmp_path):
    for c in ("a", "b"):
        for i in range(4):
            _save(tmp_path / "img" / f"{c}{i}.png", _u8(rng, 5, 5))
    rows = [f"img/{c}{i}.png,{c}" for c in "ab" for i in range(4)]
    for twin in ("./img/a0.png", "img//a0.png", "img/../img/a0.png", str(tmp_path / "img" / "a0.png")):
        with pytest.raises(DataError, match=rf"line 10: path '{twin}' already listed on line 2 as 'img/a0.png'"):
            load_csv(_write_manifest(tmp_path / "m.csv", "path,label", [*rows, f"{twin},b"]), 5, 0)
    splits = load_csv(_write_manifest(tmp_path / "ok.csv", "path,label", [f"./{r}" for r in rows]), 5, 0)
    assert sorted(i for s in _all(splits) for i in s.ids) == sorted(r.split(",")[0] for r in rows)


def test_folder_classes_reject_a_typo_folder_and_fix_the_order(rng, tmp_path):
    _make_classes(tmp_path, rng, {"covid": 5, "normal": 5, "Covid": 3})
    with pytest.raises(DataError, match=r"class folder\(s\) '.*/Covid' not in the expected classes"):
        load_folder(tmp_path, 8, 0, classes=("normal", "covid"))
    with pytest.raises(DataError, match="no folder for expected class.*'effusion'"):
        load_folder(tmp_path, 8, 0, classes=("normal", "covid", "Covid", "effusion"))
    splits = load_folder(tmp_path, 8, 0, classes=("normal", "covid", "Covid"), test_fraction=0.25)
    assert splits.class_names == ("normal", "covid", "Covid")
    assert {i.split("/")[0] for s in _all(splits) for i, label in zip(s.ids, s.labels) if label == 0} == {"normal"}


def test_csv_label_typo_is_an_error_naming_the_row(rng, tmp_path):
    for i in range(8):
        _save(tmp_path / f"{i}.png", _u8(rng, 5, 5))
    rows = [f"{i}.png,{'covid' if i % 2 else 'normal'}" for i in range(7)] + ["7.png,Covid"]
    with pytest.raises(DataError, match="line 9: unknown label 'Covid'"):
        load_csv(_write_manifest(tmp_path / "m.csv", "path,label", rows), 5, 0, classes=("normal", "covid"))


def test_broken_symlinks_are_warned_and_recorded(rng, tmp_path):
    _make_classes(tmp_path, rng, {"a": 5, "b": 5})
    (tmp_path / "a" / "dangling.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "b" / "loop1.png").symlink_to(tmp_path / "b" / "loop2.png")
    (tmp_path / "b" / "loop2.png").symlink_to(tmp_path / "b" / "loop1.png")
    (tmp_path / "b" / "up").symlink_to(tmp_path)  # a folder loop, never followed
    (tmp_path / "a" / "good.png").symlink_to(tmp_path / "a" / "img000.png")  # a working link is an image
    with pytest.warns(DataWarning) as caught:
        splits = load_folder(tmp_path, 8, 0, test_fraction=0.25)
    text = " ".join(str(w.message) for w in caught)
    assert "dangling" in text and "loop" in text
    assert sorted(f for f, _ in splits.skipped) == ["a/dangling.png", "b/loop1.png", "b/loop2.png", "b/up"]
    assert "a/good.png" in {i for s in _all(splits) for i in s.ids}


def test_bad_file_message_gives_the_cli_spelling(rng, tmp_path):
    _make_classes(tmp_path, rng, {"a": 5, "b": 5})
    _truncated_png(tmp_path / "a" / "bad.png", rng)
    with pytest.raises(DataError, match=r"--set data\.skip_bad=true"):
        load_folder(tmp_path, 8, 0)
