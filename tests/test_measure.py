"""drift measure: two given checkpoints (a user-defined nn.Module through a factory, timm families outside the
registry) through the run's steps; their archive, replicas, xarray views and tidy export."""

import hashlib
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from drift.archive import ArchiveReader
from drift.cli import main
from drift.export import COLUMNS, export_table
from drift.measure import measure
from drift.stats import euclidean_instability, systematic_drift, systematic_form

FAST = ["run.progress=false", "metrics.n_boot=20", "fisher.enabled=false", "metrics.min_per_class=1",
        'metrics.sample_set="all"', "report.enabled=false"]

NET = '''
import torch
from torch import nn


class SmallNet(nn.Module):
    """Not a timm model: three conv blocks, global average pool, a linear head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 5, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(5, 7, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(7, 6, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def make():
    return SmallNet()
'''


def _net_module(tmp_path: Path):
    path = tmp_path / "smallnet.py"
    path.write_text(NET)
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib

        mod = importlib.import_module("smallnet")
        return path, importlib.reload(mod)
    finally:
        sys.path.remove(str(tmp_path))


def _folder(root: Path, rng: torch.Generator, size: int, counts: dict[str, dict[str, int]]) -> None:
    for split, by_class in counts.items():
        for c, k in by_class.items():
            (root / split / c).mkdir(parents=True)
            for i in range(k):
                a = torch.randint(0, 256, (size, size), generator=rng, dtype=torch.uint8).numpy()
                Image.fromarray(a).save(root / split / c / f"{i}.png")


def _gradcam_by_hand(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor, t: torch.Tensor):
    """Grad-CAM (Selvaraju et al. 2017): relu(sum_k mean_ij(dz_t/dA_kij) A_k), with autograd on a hooked layer."""
    store = {}
    h = layer.register_forward_hook(lambda m, i, o: store.setdefault("A", o))
    try:
        z = model(x)
    finally:
        h.remove()
    A = store["A"]
    g, = torch.autograd.grad(z.gather(1, t[:, None]).sum(), A)
    return torch.relu((g.mean((2, 3), keepdim=True) * A).sum(1)).detach()


def test_measure_cli_on_a_user_module_factory_and_a_train_valid_test_folder(tmp_path, rng):
    from safetensors.torch import save_file

    path, mod = _net_module(tmp_path)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
    a, b = mod.make(), mod.make()
    save_file(a.state_dict(), str(tmp_path / "a.safetensors"))
    torch.save(b.state_dict(), tmp_path / "b.pth")
    data = tmp_path / "cxr"
    _folder(data, rng, 33, {"train": {"x": 2, "y": 2, "z": 2}, "valid": {"x": 1, "y": 1, "z": 1},
                            "test": {"x": 3, "y": 2, "z": 4}})
    out = tmp_path / "out"
    argv = ["measure", "--model-a", f"{path}:make", "--weights-a", str(tmp_path / "a.safetensors"),
            "--weights-b", str(tmp_path / "b.pth"), "--data", str(data), "--out", str(out), "--name", "smallnet",
            "--set", 'attribution.methods=["gradcam", "layercam"]', "--set", 'attribution.layers=["auto"]',
            "--set", "data.image_size=33"]
    for s in FAST:
        argv += ["--set", s]
    argv[argv.index("report.enabled=false")] = "report.enabled=true"
    assert main(argv) == 0
    r = ArchiveReader(out / "archive.h5")
    ids = list(r.read("data/test/ids").astype(str))
    assert len(ids) == 9 and all(i.startswith("test/") for i in ids)  # the test folder is what is measured
    for phase, model, file in (("transfer", a, "a.safetensors"), ("finetune", b, "b.pth")):
        g = r.read(f"models/smallnet/{phase}")
        assert g["role"] == {"transfer": "A", "finetune": "B"}[phase] and g["kind"] == "factory"
        assert g["sha256"] == hashlib.sha256((tmp_path / file).read_bytes()).hexdigest()
        assert g["code_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        # The archived maps are Grad-CAM of the given weights at the last map layer: the outermost module that
        # returns it (features, whose last child is features.7), 8 x 8.
        assert r.layer_info("smallnet", "auto")["module"] == "backbone.features"
        x = torch.stack([torch.from_numpy(np.asarray(Image.open(data / i), np.float32) / 255)[None] for i in ids])
        t = torch.as_tensor(r.read(f"attributions/smallnet/targets/{phase}"))
        ref = _gradcam_by_hand(model.eval(), model.features, x, t)
        got = r.maps("smallnet", phase, "gradcam", "auto", "logit")
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-6 * float(ref.abs().max()))
        np.testing.assert_allclose(r.evaluation("smallnet", phase)["logits"], model(x).detach().numpy(),
                                   rtol=1e-5, atol=1e-6)
    # Pearson r per image against NumPy on the archived maps, upsampled and min-max normalised.
    up = [F.interpolate(torch.as_tensor(r.maps("smallnet", p, "layercam", "auto", "logit"))[:, None], size=(33, 33),
                        mode="bilinear", align_corners=False)[:, 0].numpy().reshape(9, -1)
          for p in ("transfer", "finetune")]
    per = r.drift("smallnet", "layercam")
    for k in range(9):
        if per["valid"][k]:
            np.testing.assert_allclose(per["pearson"][k], np.corrcoef(up[0][k], up[1][k])[0, 1], atol=1e-5)
    assert (out / "report" / "report.html").is_file()
    assert "factory: " in (out / "report" / "report.md").read_text()


@pytest.fixture(scope="module")
def timm_pair(tmp_path_factory):
    """Two checkpoints of each of two timm families outside the registry, one replica of B, measured from Python."""
    import timm
    from safetensors.torch import save_file

    tmp = tmp_path_factory.mktemp("timm")
    g = torch.Generator().manual_seed(int(np.random.SeedSequence().entropy % 2**31))
    x = torch.rand(7, 1, 48, 48, generator=g)
    y = torch.randint(0, 3, (7,), generator=g)
    y[:3] = torch.tensor([0, 1, 2])
    runs = {}
    # The first family with a replica of B and a 2 x 2 protocol grid (layers x normalisations); the second lean.
    settings = {"mobilenetv3_small_050": ['attribution.layers=["block", "stride16"]',
                                          'metrics.normalize=["minmax", "sum"]',
                                          'attribution.methods=["gradcam++", "layercam"]'],
                "regnetx_002": ['attribution.layers=["block"]', 'metrics.normalize=["sum"]',
                                'attribution.methods=["layercam"]']}
    for fam, extra in settings.items():
        files = []
        n_files = 3 if fam == "mobilenetv3_small_050" else 2
        for k in range(n_files):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
            net = timm.create_model(fam, pretrained=False, num_classes=3)
            f = tmp / f"{fam}-{k}.{'safetensors' if k != 1 else 'pth'}"
            (save_file(net.state_dict(), str(f)) if k != 1 else torch.save(net.state_dict(), f))
            files.append(f)
        out = tmp / fam
        arch = measure(f"timm:{fam}", None, x, y.numpy(), weights_a=str(files[0]), weights_b=str(files[1]),
                       replicas_b=[str(f) for f in files[2:]], class_names=["a", "b", "c"], out=out,
                       overrides=[*FAST, *extra, f'measure.name="{fam}"'])
        runs[fam] = (arch, files, x, y)
    return runs


def test_measure_api_on_two_timm_families_with_a_replica(timm_pair):
    import timm

    for fam, (path, files, x, _) in timm_pair.items():
        r = ArchiveReader(path)
        assert r.archs() == [fam]
        spec = timm.create_model(fam, pretrained=False, num_classes=3)
        mean = torch.tensor(spec.pretrained_cfg["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(spec.pretrained_cfg["std"]).view(1, 3, 1, 1)
        for phase, f in (("transfer", files[0]), ("finetune", files[1])):
            if f.suffix == ".pth":
                spec.load_state_dict(torch.load(f, weights_only=True))
            else:
                from safetensors.torch import load_file

                spec.load_state_dict(load_file(str(f)))
            ref = spec.eval()((x.expand(-1, 3, -1, -1) - mean) / std).detach().numpy()
            np.testing.assert_allclose(r.evaluation(fam, phase)["logits"], ref, rtol=1e-4, atol=1e-5)
            assert r.read(f"models/{fam}/{phase}")["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
        # block = the last feature_info stage (stride 32), stride16 = the feature_info stage at reduction 16.
        info = {e["reduction"]: e for e in list(spec.feature_info)}
        assert r.layer_info(fam, "block")["module"] == "backbone." + list(spec.feature_info)[-1]["module"]
        assert tuple(r.maps(fam, "transfer", "layercam", "block", "logit").shape) == (7, 2, 2)
        if not r.has(f"measure/{fam}/replicas"):
            assert fam == "regnetx_002"
            continue
        assert r.layer_info(fam, "stride16")["module"] == "backbone." + info[16]["module"]
        assert tuple(r.maps(fam, "transfer", "layercam", "stride16", "logit").shape) == (7, 3, 3)
        # Replicas: d_tl[0] is A vs B as the drift step scored it; d_ft holds B vs the replica both ways.
        rep = r.read(f"measure/{fam}/replicas/block/logit/sum/layercam")
        per = r.drift(fam, "layercam", ("block", "logit", "sum"))
        for metric in ("iou@20", "pearson", "centroid_shift"):
            d_tl, d_ft = rep[metric]["d_tl"], rep[metric]["d_ft"]
            assert d_tl.shape == (2, 7) and d_ft.shape == (2, 2, 7)
            want = np.where(per["valid"], euclidean_instability(metric, per[metric]), np.nan)
            np.testing.assert_allclose(d_tl[0], want, atol=1e-6)
            assert np.isnan(d_ft[0, 0]).all() and np.isnan(d_ft[1, 1]).all()
            np.testing.assert_allclose(d_ft[0, 1], d_ft[1, 0], atol=1e-6)  # symmetric metrics
            # the stored estimate is the estimator on the stored arrays (two models: no model resampling)
            est = rep[metric]["systematic"]
            ref = systematic_drift(d_tl, d_ft, per["labels"], min_per_class=r.config.metrics.min_per_class,
                                   form=systematic_form(metric))
            assert est["n_models"] == 2 and not est["models_resampled"]
            assert est["estimate"] == pytest.approx(ref.estimate, rel=1e-9, nan_ok=True)
        assert 1 - per["pearson"][0] == pytest.approx(rep["pearson"]["d_tl"][0, 0], abs=1e-6, nan_ok=True)


def test_xarray_views_and_tidy_export_match_the_archive(timm_pair, tmp_path):
    xr = pytest.importorskip("xarray", reason="xarray views need the interop extra (xarray, h5netcdf)")
    pytest.importorskip("h5netcdf", reason="xarray views need the interop extra (xarray, h5netcdf)")
    fam, (path, _, _, y) = next(iter(timm_pair.items()))  # the family with the 2 x 2 grid
    r = ArchiveReader(path)
    ds = xr.open_dataset(path, engine="h5netcdf", group=f"xarray/{fam}/metrics")
    assert ds["pearson"].dims == ("layer", "score", "normalization", "method", "image")
    assert list(ds["layer"].values) == ["block", "stride16"] and list(ds["normalization"].values) == ["minmax", "sum"]
    assert list(ds["class_name"].values) == ["a", "b", "c"]
    np.testing.assert_array_equal(ds["label"].values, y.numpy())
    for la in ("block", "stride16"):
        for no in ("minmax", "sum"):
            per = r.drift(fam, "gradcam++", (la, "logit", no))
            sel = ds.sel({"layer": la, "score": "logit", "normalization": no, "method": "gradcam++"})
            np.testing.assert_array_equal(sel["iou@20"].values, per["iou@20"])
            np.testing.assert_array_equal(sel["valid"].values.astype(bool), per["valid"])
    maps = xr.open_dataset(path, engine="h5netcdf", group=f"xarray/{fam}/maps/stride16")
    assert maps["cam"].dims == ("phase", "score", "method", "image", "y", "x")
    np.testing.assert_array_equal(maps["cam"].sel({"phase": "finetune", "score": "logit", "method": "layercam"}).values,
                                  r.maps(fam, "finetune", "layercam", "stride16", "logit"))
    # The tidy table: one row per (image, arch, layer, score, normalization, method, metric), values as archived.
    csv_path = export_table(path, "csv", tmp_path / "m.csv")
    import csv

    rows = list(csv.DictReader(open(csv_path)))
    assert tuple(rows[0]) == COLUMNS
    n_metrics = sum(1 for k in ds.data_vars if ds[k].dims[0] == "layer") - 4  # less valid/selected/degenerate
    assert len(rows) == 7 * 2 * 1 * 2 * 2 * n_metrics
    keyed = {(w["image"], w["layer"], w["normalization"], w["method"], w["metric"]): float(w["value"]) for w in rows}
    ids = list(ds["image"].values)
    for k in range(7):
        got = keyed[(ids[k], "stride16", "sum", "layercam", "centroid_shift")]
        want = r.drift(fam, "layercam", ("stride16", "logit", "sum"))["centroid_shift"][k]
        assert got == pytest.approx(want, rel=1e-12, nan_ok=True)
    pytest.importorskip("pyarrow", reason="Parquet export needs pyarrow (interop extra)")
    import pyarrow.parquet as pq

    table = pq.read_table(export_table(path, "parquet", tmp_path / "m.parquet"))
    assert table.num_rows == len(rows) and tuple(table.column_names) == COLUMNS
    with h5py.File(path, "r") as f:  # the views are copies beside the schema's groups, not in them
        assert "xarray" in f and "image" not in f[f"drift/{fam}"]


def test_bad_models_are_refused_naming_the_file(tmp_path, rng):
    path, mod = _net_module(tmp_path)
    x = torch.rand(4, 1, 33, 33, generator=rng)
    y = np.array([0, 1, 2, 0])
    pickled = tmp_path / "whole.pth"
    torch.save(mod.make(), pickled)  # a pickled module, not a state dict: never unpickled
    with pytest.raises(ValueError, match="whole.pth"):
        measure(f"{path}:make", None, x, y, weights_a=str(pickled), out=tmp_path / "o1", overrides=FAST)
    with pytest.raises(ValueError, match="no callable 'nope'"):
        measure(f"{path}:nope", None, x, y, out=tmp_path / "o2", overrides=FAST)
    with pytest.raises(ValueError, match="does not fit"):
        other = tmp_path / "other.pth"
        torch.save({"w": torch.zeros(2)}, other)
        measure(f"{path}:make", None, x, y, weights_a=str(other), out=tmp_path / "o3", overrides=FAST)
    import drift

    with pytest.raises(ValueError, match="gives 3 logits; the images have 4 classes"):  # drift.measure(...) calls
        drift.measure(mod.make(), mod.make(), x, np.array([0, 1, 2, 3]), out=tmp_path / "o4", overrides=FAST)
    # A module given as an object is identified by its state dict's sha256: equal weights, equal hash.
    import copy

    from drift.measure import state_sha256

    net = mod.make()
    twin = copy.deepcopy(net)
    assert state_sha256(net) == state_sha256(twin)
    with torch.no_grad():
        twin.head.bias[1] += 1e-7
    assert state_sha256(net) != state_sha256(twin)
    with pytest.raises(ValueError, match=r"images must be .* got \(4, 2, 33, 33\)"):
        measure(mod.make(), mod.make(), torch.rand(4, 2, 33, 33), y, out=tmp_path / "o5", overrides=FAST)


@pytest.fixture(scope="module", autouse=True)
def _torch_references(reference_kernels):
    """Every test here, module fixtures included, on the kernels' torch references (tests/conftest.py)."""
