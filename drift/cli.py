"""Command line: ``drift run | pretrain | attribute | metrics | fisher | measure | export | summary | report | compare
| bench``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EPILOG = """examples:
  drift run                                   the demo study (synthetic data, three backbones, CPU-sized)
  drift run --config configs/smoke.toml       seconds-long run for a first check
  drift pretrain                              pretrain the demo's backbones on the synthetic source task once
  drift run --config configs/paper.toml --set data.path=/data/cxr --out runs/paper
  drift run --set train.finetune.lr=1e-5 --set run.archs='["densenet201"]'
  drift summary runs/demo/archive.h5          print the headline tables of an archive
  drift measure --model-a timm:convnext_atto --weights-a before.safetensors --weights-b after.safetensors \
      --data /data/cxr --out runs/mine        drift between two checkpoints of your own model
  drift export runs/mine/archive.h5 --format parquet   the per-image metrics as one tidy table
"""


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="TOML config (default: the built-in demo, same as configs/demo.toml)")
    p.add_argument("--out", "-o", help="output folder (archive.h5, checkpoints/, report/); overrides run.out")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.finetune.lr=1e-5 (repeatable)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (overrides run.device; default auto)")
    p.add_argument("--fresh", action="store_true", help="delete an existing archive in --out and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drift",
        description="Semantic drift of attribution maps between transfer learning and fine-tuning, and the "
                    "input-dependent Fisher information of chest X-ray classifiers.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="run the whole study (resumes after the last commit)",
                       description="Data -> two-phase training (transfer, then fine-tuning) -> attributions -> "
                                   "drift metrics -> iFIM -> statistics -> report, all into <out>/archive.h5. "
                                   "Re-running with the same config skips what is committed.")
    _add_run_args(p)
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="start N processes on this machine with torchrun (one per GPU on CUDA, gloo on the CPU); "
                        "same as `torchrun --standalone --nproc_per_node N -m drift run ...`")
    p = sub.add_parser("pretrain", help="pretrain the config's backbones on the synthetic source task and cache them",
                       description="Make the synthetic-source weights of every backbone in run.archs (what "
                                   "model.weights = \"synthetic-source\" loads) and cache them under "
                                   "<model.cache_dir>/source/, so that `drift run` with the same config finds them. "
                                   "Backbones already cached are only checked.")
    p.add_argument("--config", "-c", help="TOML config (default: the built-in demo, same as configs/demo.toml)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set source.n_train=1000 (repeatable)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (overrides run.device; default auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(out=None)
    for name, steps, text in (
        ("attribute", ("data", "train", "attributions"), "compute attribution maps of both checkpoints again"),
        ("metrics", ("data", "train", "attributions", "drift", "stats"), "compute drift metrics and statistics "
                                                                        "again from the archived maps"),
        ("fisher", ("data", "train", "fisher"), "run the iFIM analysis again on the checkpoints"),
    ):
        q = sub.add_parser(name, help=text, description=f"{text[0].upper()}{text[1:]} (trains first only if the "
                                                        "checkpoints of the same config are missing).")
        _add_run_args(q)
        q.set_defaults(steps=steps)

    _add_measure_parsers(sub)
    p = sub.add_parser("summary", help="print the headline tables of an archive")
    p.add_argument("archive")
    p = sub.add_parser("report", help="write the HTML and Markdown report of an archive")
    p.add_argument("archive")
    p.add_argument("--out", help="folder (default: <archive folder>/report)")
    p = sub.add_parser("compare", help="compare the headline numbers of two archives")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--out", help="also write the comparison as a Markdown file here")
    p = sub.add_parser("calibrate", help="measure every verdict's false-positive rate and power on simulated studies",
                       description="Simulate studies with known answers, judge them with the code that judges "
                       "archives, and print (and write, with --out) the false-positive rate of every verdict under "
                       "each null and its power under each planted effect. Exit 1 when a false-positive rate exceeds "
                       "alpha by more than 2 Monte Carlo standard errors.")
    p.add_argument("--quick", action="store_true", help="the null scenarios only, fewer and smaller studies "
                   "(under a minute on two CPU cores; what the test suite runs)")
    p.add_argument("--studies", type=int, help="simulated studies per scenario (default 1000, --quick 150)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the table as Markdown here (e.g. docs/calibration.md)")
    p = sub.add_parser("known-answer", help="judge a planted-shift study against its null twin; dose response",
                       description="The known-answer verdicts (drift.known_answer): a planted study (configs/"
                       "planted.toml) must show the planted evidence shift against its null twin (configs/null.toml); "
                       "a placebo (the twin's recipe with another seed) must not. With --dose, one row per archive "
                       "of a strength series; with --calibrate, the verdicts' false-positive rates and power on "
                       "simulated studies. Exit 1 when some method misses the planted shift or detects the placebo "
                       "(or, with --calibrate, when a false-positive rate exceeds alpha by more than 2 Monte Carlo "
                       "standard errors).")
    p.add_argument("planted", nargs="?", help="archive of the planted study")
    p.add_argument("twin", nargs="?", help="archive of its null twin")
    p.add_argument("--placebo", help="archive of a study without the marker (the twin's recipe, another seed)")
    p.add_argument("--dose", nargs="+", default=[], metavar="ARCHIVE", help="archives of a strength series")
    p.add_argument("--arch", help="architecture (default: the archive's first)")
    p.add_argument("--layer", help="CAM layer of the verdict (default: the config's first, attribution.layers)")
    p.add_argument("--out", help="also write the verdicts (and dose table) as Markdown here")
    p.add_argument("--figure", help="write the dose-response figure (PNG) here")
    p.add_argument("--calibrate", type=int, metavar="N", help="simulate N study triples per effect instead")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("bench", help="benchmark records")
    bsub = p.add_subparsers(dest="bench_command", metavar="ACTION")
    q = bsub.add_parser("export", help="write asv or pytest-benchmark results into an HDF5 file")
    q.add_argument("source", help="asv results folder (results/asv) or a pytest-benchmark JSON file")
    q.add_argument("--out", default="results/bench.h5", help="HDF5 file to write (default results/bench.h5); "
                                                              "a run archive gets a bench/ group")
    return parser


def _add_measure_parsers(sub) -> None:
    p = sub.add_parser("measure", help="drift between two checkpoints you bring (timm name or module:function)",
                       description="The outputs of `drift run` for two given models: model A (before) and model "
                                   "B (after) on labelled images from a folder or CSV manifest. A model is a timm "
                                   "name (or timm:<name>) with a state-dict file, or a module:function / "
                                   "file.py:function factory returning an nn.Module, with an optional state-dict "
                                   "file (.safetensors, or .pth read with weights_only=True; never unpickled).")
    _add_run_args(p)
    p.add_argument("--model-a", required=True, metavar="SPEC", help="model A (before the update)")
    p.add_argument("--weights-a", default="", metavar="FILE", help="model A's state-dict file")
    p.add_argument("--model-b", default="", metavar="SPEC", help="model B (default: the spec of model A)")
    p.add_argument("--weights-b", default="", metavar="FILE", help="model B's state-dict file")
    p.add_argument("--replica", action="append", default=[], metavar="FILE",
                   help="a replica of model B (retrained with another seed): the retraining-noise floor "
                        "(repeatable)")
    p.add_argument("--data", metavar="PATH", help="image folder (root/<class>/ or root/{train,valid,test}/<class>/) "
                                                  "or CSV manifest; overrides data.path")
    p.add_argument("--name", help="the name the archive files the pair under (measure.name)")
    p = sub.add_parser("export", help="write an archive's per-image metrics as one tidy table (CSV or Parquet)")
    p.add_argument("archive")
    p.add_argument("--format", choices=("csv", "parquet"), default="csv")
    p.add_argument("--out", help="file to write (default: <archive folder>/metrics.<format>)")


def _measure(args) -> int:
    from .measure import run_measure
    from .summary import print_summary

    extra = [f'measure.model_a="{args.model_a}"', f'measure.weights_a="{args.weights_a}"',
             f'measure.model_b="{args.model_b}"', f'measure.weights_b="{args.weights_b}"']
    if args.replica:
        extra.append("measure.replicas_b=[" + ", ".join(f'"{r}"' for r in args.replica) + "]")
    if args.data:
        src = "csv" if args.data.lower().endswith(".csv") else "folder"
        extra += [f'data.source="{src}"', f'data.path="{args.data}"']
    if args.name:
        extra.append(f'measure.name="{args.name}"')
    args.set = [*args.set, *extra]
    cfg = _config(args)
    t0 = time.perf_counter()
    path = run_measure(cfg, fresh=args.fresh)
    print_summary(path)
    print(f"\narchive: {path}")
    print(f"wall time: {time.perf_counter() - t0:.0f} s")
    return 0


def _known_answer(args) -> int:
    from . import known_answer as ka

    if args.calibrate:
        t0 = time.perf_counter()
        rates = ka.calibrate(args.calibrate, seed=args.seed)
        text = ka.calibration_markdown(rates, seconds=time.perf_counter() - t0)
        bad = ka.calibration_failures(rates)
        print(text + "".join(f"\nFAIL: {b}" for b in bad))
        if args.out:
            Path(args.out).write_text(text)
        return 1 if bad else 0
    if not (args.planted and args.twin):
        raise ValueError("known-answer needs the planted study's and its null twin's archives (or --calibrate N)")
    def study(path, layer=args.layer):
        return ka.read_study(path, args.arch, layer=layer) if path else None

    planted, twin, placebo = study(args.planted), study(args.twin), study(args.placebo)
    res = ka.judge(planted, twin, placebo)
    text = ka.verdict_markdown(res)
    # Every layer all the studies hold, so the record says how much the verdict depends on the layer.
    layers = [la for la in planted.info["layers"] if all(la in s.info["layers"] for s in (twin, placebo) if s)]
    if len(layers) > 1:
        readings = {la: res if la == planted.info["layer"] else
                    ka.judge(study(args.planted, la), study(args.twin, la), study(args.placebo, la))
                    for la in layers}
        text += f"\nThe verdict at every CAM layer of the archives (above: {planted.info['layer']}):\n\n"
        text += ka.layers_markdown(readings)
    if args.dose:
        rows = ka.dose_response([twin if a == args.twin else study(a) for a in args.dose], twin)
        text += "\n" + ka.dose_markdown(rows)
        if args.figure:
            from .figures import dose_figure, to_png

            Path(args.figure).write_bytes(to_png(dose_figure(rows), dpi=110))
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0 if all(res["detected"].values()) and not any(res["placebo_detected"].values()) else 1


def _config(args):
    from . import config

    overrides = list(args.set)
    # Option values are taken literally: a path such as 'runs\\new' is a path, never a TOML escape sequence.
    if args.out:
        overrides.append(f"run.out={config.toml_string(args.out)}")
    if args.device:
        overrides.append(f"run.device={config.toml_string(args.device)}")
    if args.no_progress:
        overrides.append("run.progress=false")
    return config.load(args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .archive import ArchiveError
    from .config import ConfigError
    from .distributed import RankFailed

    if getattr(args, "nproc", 1) != 1:
        return _launch(args.nproc, sys.argv[1:] if argv is None else list(argv))
    previous = _on_sigterm(_terminate)
    try:
        return _dispatch(args)
    except (ConfigError, ArchiveError, FileNotFoundError, ValueError, RankFailed) as exc:
        print(f"drift {args.command}: error: {printable(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # a read-only or full output folder met outside the pipeline (report, compare, bench)
        where = f": {exc.filename}" if exc.filename else ""
        print(f"drift {args.command}: error: {printable(f'{exc.strerror or exc}{where}')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"drift {args.command}: {how}; what was committed is kept in the archive", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        _on_sigterm(previous)


def printable(text: str) -> str:
    """``text`` as one printable line: control characters (newline, tab, escape, ...) in names from the user or
    the data are shown escaped (``\\n``, ``\\x1b``), so a message is one line and cannot move the terminal."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


class Terminated(KeyboardInterrupt):
    """SIGTERM as an exception: it unwinds like Ctrl-C, so an open archive transaction removes its ``.tmp`` and
    the output folder's lock is released."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def _on_sigterm(handler):
    """Install ``handler`` for SIGTERM; returns the previous one (None outside the main thread, where Python
    cannot install handlers)."""
    import signal
    import threading

    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def _dispatch(args) -> int:
    if args.command == "known-answer":
        return _known_answer(args)
    if args.command == "calibrate":
        from .calibrate import main as calibrate

        return calibrate(quick=args.quick, out=args.out, n_studies=args.studies, seed=args.seed)
    if args.command in ("run", "attribute", "metrics", "fisher"):
        from . import distributed

        cfg = _config(args)
        distributed.check_batch_sizes(cfg)  # under torchrun: before the (slow) imports of the pipeline
        from .pipeline import ALL_STEPS, Pipeline
        from .summary import print_summary

        steps = getattr(args, "steps", ALL_STEPS)
        force = () if args.command == "run" else (steps[-1],) + (("stats",) if args.command == "metrics" else ())
        t0 = time.perf_counter()
        pipe = Pipeline(cfg, fresh=args.fresh, force=force)
        path = pipe.run(steps)
        reports = distributed.is_main()
        distributed.shutdown()
        if not reports:  # several processes: rank 0 reports
            return 0
        print_summary(path)
        print(f"\narchive: {path}")
        if "train" in steps:
            print(f"data and training: {pipe.timings['data+training']:.0f} s")
        print(f"wall time: {time.perf_counter() - t0:.0f} s")
        return 0
    if args.command == "pretrain":
        return _pretrain(_config(args))
    if args.command == "measure":
        return _measure(args)
    if args.command == "export":
        from .export import export_table

        print(export_table(args.archive, args.format, args.out))
        return 0
    if args.command == "summary":
        from .summary import print_summary

        print_summary(args.archive)
        return 0
    if args.command == "report":
        from .report import write_report

        out = Path(args.out) if args.out else Path(args.archive).parent / "report"
        print(write_report(args.archive, out))
        return 0
    if args.command == "compare":
        from .report import compare

        print(compare(args.a, args.b, args.out))
        return 0
    if args.command == "bench":
        if args.bench_command != "export":
            print("drift bench: choose an action: export", file=sys.stderr)
            return 2
        # The benchmark tooling lives beside the package, in the checkout's bench/ folder.
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        try:
            from bench.benchio import export
        except ImportError as exc:
            print(f"drift bench export needs the source checkout's bench/benchio.py: {exc}", file=sys.stderr)
            return 2

        print(export(args.source, args.out))
        return 0
    return 2


def _launch(nproc: int, argv: list[str]) -> int:
    """``drift run --nproc N ...``: the same command under ``torchrun --standalone --nproc_per_node N``."""
    import os
    import subprocess

    if nproc < 1:
        print(f"drift run: error: --nproc must be >= 1, got {nproc}", file=sys.stderr)
        return 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("drift run: error: --nproc inside a torchrun process; give the process count to torchrun only",
              file=sys.stderr)
        return 2
    rest, skip = [], False
    for a in argv:  # the command without --nproc
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "drift", *rest]
    print(" ".join(cmd), flush=True)
    return subprocess.run(cmd).returncode


def _pretrain(cfg) -> int:
    import torch

    from . import source_weights
    from .train import resolve_device

    if cfg.model.weights != "synthetic-source":
        print(f"note: this config's model.weights is {cfg.model.weights!r}; `drift run` with it will not load "
              "these weights (set model.weights = \"synthetic-source\")")
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    device = resolve_device(cfg.run.device)
    t0 = time.perf_counter()
    for arch in cfg.run.archs:
        t = time.perf_counter()
        meta = source_weights.backbone(cfg, arch, device)["meta"]
        print(f"{arch}: {meta['task']} held-out accuracy {meta['source_accuracy']:.3f} "
              f"({meta['input_size']} px; pretraining took {meta['seconds']:.0f} s when made), "
              f"{time.perf_counter() - t:.0f} s now; {source_weights.cache_path(cfg, arch)}")
    print(f"wall time: {time.perf_counter() - t0:.0f} s")
    return 0
