"""``drift bench export`` (bench/benchio.py): asv and pytest-benchmark records into HDF5, read back through
ArchiveReader.bench().

The inputs are produced by the tools themselves: a pytest-benchmark JSON from a real ``pytest --benchmark-json``
run in a subprocess, and asv result files written by asv's own ``Results.save``. Every exported number is
compared with the JSON read independently.
"""

import itertools
import json
import math
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from asv.results import Results
from asv.runner import BenchmarkResult

from bench.benchio import STATUS_FAILED, STATUS_OK, STATUS_SKIPPED, export, read_source
from drift.archive import SCHEMA_VERSION, Archive, ArchiveReader
from drift.cli import main
from drift.h5tree import write_tree

PYTEST_STATS = ("min", "max", "mean", "stddev", "median", "iqr", "q1", "q3", "ld15iqr", "hd15iqr", "ops", "total",
                "rounds", "iterations", "iqr_outliers", "stddev_outliers")


# ------------------------------------------------------------------------------------------------ producers


@pytest.fixture(scope="module")
def pytest_benchmark_json(tmp_path_factory):
    """A real pytest-benchmark JSON: three tiny benchmarks (one parametrised, one with numeric extra_info)."""
    root = tmp_path_factory.mktemp("pbench")
    n = [int(v) for v in np.random.default_rng().integers(5, 200, size=2)]
    print(f"sorted lengths {n}")
    (root / "pytest.ini").write_text("[pytest]\n")
    (root / "test_tiny.py").write_text(
        "import pytest\n\n"
        "def test_sum(benchmark):\n"
        "    benchmark.extra_info['max_error'] = 0.125\n"
        "    benchmark.extra_info['device'] = 'cpu'\n"
        "    assert benchmark(sum, range(1000)) == 499500\n\n"
        f"@pytest.mark.parametrize('n', {n})\n"
        "def test_sorted(benchmark, n):\n"
        "    assert benchmark(sorted, list(range(n, 0, -1)))[0] == 1\n"
    )
    out = root / "bench.json"
    cmd = [sys.executable, "-m", "pytest", "test_tiny.py", "-q", "-p", "no:cacheprovider", "-c", "pytest.ini",
           "--rootdir", str(root), "--benchmark-enable", f"--benchmark-json={out}", "--benchmark-min-rounds=3",
           "--benchmark-max-time=0.005", "--benchmark-warmup=off"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def asv_results(root, rng, machine="bench-box", commit=None):
    """asv results written by asv itself: <root>/<machine>/<commit8>-<env>.json plus a benchmarks.json.

    Benchmarks: a parametrised timing (3 x 5 combinations, one failed and one skipped), an unparametrised
    peak-memory one and a parametrised track with its own unit. Returns (result file, benchmarks metadata).
    """
    commit = commit or "".join(f"{int(v):x}" for v in torch.randint(0, 16, (40,), generator=rng))
    impls, sizes = ["'reference'", "'kernel'", "'other'"], [str(v) for v in range(5)]
    bench = {
        "time_kernels.FisherGram.time_fisher_gram": dict(
            name="time_kernels.FisherGram.time_fisher_gram", type="time", unit="seconds",
            param_names=["impl", "size"], params=[impls, sizes], version="v1"),
        "time_pipeline.Cams.peakmem_cams": dict(
            name="time_pipeline.Cams.peakmem_cams", type="peakmemory", unit="bytes", param_names=[], params=[],
            version="v2"),
        "track_science.track_iou20": dict(
            name="track_science.track_iou20", type="track", unit="IoU", param_names=["arch"],
            params=[["'resnet10t'", "'resnet18'"]], version="v3"),
    }
    res = Results({"machine": machine, "cpu": "test cpu", "num_cpu": "2", "python": "3.11"},
                  {"torch": "2.14.1", "numpy": "2.1"}, commit, 1_700_000_000_000, "3.11", "virtualenv-py3.11", {})
    for b in bench.values():
        P = math.prod(len(p) for p in b["params"]) if b["params"] else 1
        values = (torch.rand(P, generator=rng, dtype=torch.float64) * 1e-3).tolist()
        samples, number = [None] * P, [None] * P
        if b["type"] == "time":
            values[1], values[4] = None, math.nan  # a failure and a skip (asv's NotImplementedError)
            samples = [None if v is None or math.isnan(v) else [v * (1 + 0.01 * k) for k in range(5)]
                       for v in values]
            number = [None if s is None else 1 for s in samples]
        res.add_result(b, BenchmarkResult(result=values, samples=samples, number=number, errcode=0, stderr="",
                                          profile=None), duration=1.5)
    res.save(str(root))
    (root / "benchmarks.json").write_text(json.dumps({**bench, "version": 2}))
    (root / machine / "machine.json").write_text(json.dumps({"machine": machine, "version": 1}))
    return root / machine / f"{commit[:8]}-virtualenv-py3.11.json", bench


# ------------------------------------------------------------------------------------------------ round trips


def test_pytest_benchmark_json_round_trip(tmp_path, pytest_benchmark_json):
    src = json.loads(pytest_benchmark_json.read_text())
    out = tmp_path / "bench.h5"
    msg = export(pytest_benchmark_json, out)
    assert str(out) in msg and "3 benchmarks" in msg

    with h5py.File(out) as f:
        assert int(f.attrs["schema_version"]) == SCHEMA_VERSION
    bench = ArchiveReader(out).bench()
    machine = src["machine_info"]["node"]
    (record,) = bench["pytest"][machine].values()
    assert record["commit"] == src["commit_info"]["id"]
    assert record["machine"] == machine
    assert record["datetime"] == src["datetime"]
    versions = json.loads(record["versions"])
    assert versions == {"python": src["machine_info"]["python_version"], "pytest-benchmark": src["version"]}
    assert len(src["benchmarks"]) == 3
    for b in src["benchmarks"]:
        node = record[b["fullname"].replace("/", ".")]
        assert node["name"] == b["name"] and node["unit"] == "seconds"
        assert json.loads(node["params"]) == b["params"]
        for s in PYTEST_STATS:
            assert node[s] == b["stats"][s], s  # copied, not recomputed
        np.testing.assert_array_equal(node["data"], np.asarray(b["stats"]["data"], dtype=np.float64))
        assert json.loads(node["extra_info"]) == b["extra_info"]
    summed = record["test_tiny.py::test_sum"]
    assert summed["extra"] == {"max_error": 0.125}  # numeric extra_info only


def test_asv_results_round_trip(tmp_path, rng):
    results = tmp_path / "results"
    path, bench = asv_results(results, rng)
    (results / "html" / "graphs").mkdir(parents=True)  # asv publish output: a web page, skipped silently
    (results / "html" / "index.json").write_text("{}")
    (results / "html" / "info.json").write_text("{}")
    (results / "notes.json").write_text(json.dumps({"note": "not a result"}))  # left out, and said so
    raw = json.loads(path.read_text())
    cols = raw["result_columns"]

    out = tmp_path / "bench.h5"
    msg = export(results, out)
    assert "left out 1 other JSON file" in msg
    rec = ArchiveReader(out).bench()["asv"]["bench-box"][path.stem]
    assert rec["commit"] == raw["commit_hash"] and rec["machine"] == "bench-box"
    assert rec["env_name"] == "virtualenv-py3.11" and rec["python"] == "3.11"
    assert json.loads(rec["versions"]) == {"python": "3.11", "torch": "2.14.1", "numpy": "2.1"}
    assert json.loads(rec["machine_info"])["cpu"] == "test cpu"
    assert rec["date"].startswith("2023-11-14T22:13:20")

    for name, meta in bench.items():
        row = dict(zip(cols, raw["results"][name]))
        node = rec[name]
        assert node["unit"] == meta["unit"] and node["type"] == meta["type"]
        assert json.loads(node["param_names"]) == meta["param_names"]
        expected = [math.nan if v is None else v for v in row["result"]]
        np.testing.assert_array_equal(node["value"], np.asarray(expected, dtype=np.float64))
        status = [STATUS_FAILED if v is None else STATUS_SKIPPED if math.isnan(v) else STATUS_OK
                  for v in row["result"]]
        np.testing.assert_array_equal(node["status"], status)
        combos = list(itertools.product(*meta["params"]))
        for i, pn in enumerate(meta["param_names"]):
            assert list(node["params"][pn]) == [c[i] for c in combos]
        if meta["type"] == "time":
            assert (node["status"] == STATUS_FAILED).sum() == 1 and (node["status"] == STATUS_SKIPPED).sum() == 1
            for s in ("ci_99_a", "ci_99_b", "q_25", "q_75", "number", "repeat"):
                want = [math.nan if v is None else v for v in row[f"stats_{s}"]]
                np.testing.assert_array_equal(node["stats"][s], np.asarray(want, dtype=np.float64))
        else:
            assert "stats" not in node

    # The machine folder and the file itself give the same record.
    for src in (results / "bench-box", path):
        other = tmp_path / f"{src.name}.h5"
        export(src, other)
        again = ArchiveReader(other).bench()["asv"]["bench-box"][path.stem]
        for name in bench:
            np.testing.assert_array_equal(again[name]["value"], rec[name]["value"])


def test_units_inferred_without_benchmarks_json(tmp_path, rng):
    path, bench = asv_results(tmp_path / "results", rng)
    (tmp_path / "results" / "benchmarks.json").unlink()
    out = tmp_path / "b.h5"
    export(path, out)
    rec = ArchiveReader(out).bench()["asv"]["bench-box"][path.stem]
    assert rec["time_kernels.FisherGram.time_fisher_gram"]["unit"] == "seconds"
    assert rec["time_pipeline.Cams.peakmem_cams"]["unit"] == "bytes"
    assert json.loads(rec["time_kernels.FisherGram.time_fisher_gram"]["param_names"]) == ["param1", "param2"]


def test_export_into_run_archive_keeps_it_and_replaces_records(tmp_path, rng, pytest_benchmark_json):
    run = tmp_path / "archive.h5"
    archive = Archive(run, "seed = 3\n", "hash-1", {"seed": 3})
    maps = torch.rand(5, 7, 7, generator=rng).numpy()
    with archive.commit("attributions/resnet18") as f:
        write_tree(f.require_group("attributions/resnet18/transfer"), {"layercam": maps})

    first, _ = asv_results(tmp_path / "results", rng, commit="a" * 40)
    export(tmp_path / "results", run)
    second, _ = asv_results(tmp_path / "results", rng, commit="b" * 40)
    export(tmp_path / "results", run)  # both commits now; the first exported again, replaced not duplicated
    export(pytest_benchmark_json, run)

    reader = ArchiveReader(run)
    assert reader.attrs["science_hash"] == "hash-1" and reader.config_text == "seed = 3\n"
    np.testing.assert_array_equal(reader.read("attributions/resnet18/transfer/layercam"), maps)
    assert [s["name"] for s in reader.commits] == ["attributions/resnet18", "bench"]
    bench = reader.bench()
    assert sorted(bench) == ["asv", "pytest"]
    assert sorted(bench["asv"]["bench-box"]) == sorted([first.stem, second.stem])
    fresh = json.loads(second.read_text())["results"]["track_science.track_iou20"][0]
    np.testing.assert_array_equal(bench["asv"]["bench-box"][second.stem]["track_science.track_iou20"]["value"],
                                  fresh)
    assert Archive(run, science_hash="hash-1")  # still resumable by the run that wrote it


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_sources_name_the_file(tmp_path, rng):
    missing = tmp_path / "nowhere" / "results"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        export(missing, tmp_path / "b.h5")
    text = tmp_path / "notes.json"
    text.write_text("this is not json")
    with pytest.raises(ValueError, match="notes.json is not valid JSON"):
        export(text, tmp_path / "b.h5")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"benchmarks": []}))
    with pytest.raises(ValueError, match="other.json is neither an asv result file"):
        export(other, tmp_path / "b.h5")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "index.json").write_text("{}")
    with pytest.raises(ValueError, match="empty holds no benchmark results"):
        export(empty, tmp_path / "b.h5")
    with pytest.raises(TypeError, match="source must be a path"):
        export(3, tmp_path / "b.h5")
    with pytest.raises(TypeError, match="out must be a path"):
        export(text, None)
    assert not (tmp_path / "b.h5").exists()  # nothing written on a failure

    path, _ = asv_results(tmp_path / "results", rng)
    data = json.loads(path.read_text())
    old = dict(data, version=1)
    path.write_text(json.dumps(old))
    with pytest.raises(ValueError, match=f"{path.name}: asv result format version 1"):
        read_source(path)
    broken = dict(data)
    name = "time_kernels.FisherGram.time_fisher_gram"
    broken["results"] = {name: [[0.5, 0.25]] + data["results"][name][1:]}
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=f"{path.name}: benchmark '{name}': 15 parameter combinations but 2"):
        read_source(path)


def test_bad_out_is_refused_and_left_alone(tmp_path, pytest_benchmark_json):
    with pytest.raises(ValueError, match="is a folder"):
        export(pytest_benchmark_json, tmp_path)
    foreign = tmp_path / "foreign.h5"
    foreign.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(ValueError, match="foreign.h5"):
        export(pytest_benchmark_json, foreign)
    assert foreign.read_bytes() == b"not an hdf5 file at all"
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(ValueError, match="plain.h5.*not a drift archive"):
        export(pytest_benchmark_json, plain)


def test_cli_bench_export(tmp_path, capsys, pytest_benchmark_json):
    out = tmp_path / "cli.h5"
    assert main(["bench", "export", str(pytest_benchmark_json), "--out", str(out)]) == 0
    assert f"into {out}" in capsys.readouterr().out
    assert ArchiveReader(out).bench()["pytest"]
    assert main(["bench", "export", str(tmp_path / "missing.json"), "--out", str(out)]) == 2
    assert "missing.json" in capsys.readouterr().err
