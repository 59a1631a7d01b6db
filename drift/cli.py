"""Command line: ``drift run | attribute | metrics | fisher | summary | report | compare | bench``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EPILOG = """examples:
  drift run                                   the demo study (synthetic data, three backbones, CPU-sized)
  drift run --config configs/smoke.toml       seconds-long run for a first check
  drift run --config configs/paper.toml --set data.path=/data/cxr --out runs/paper
  drift run --set train.finetune.lr=1e-5 --set run.archs='["densenet201"]'
  drift summary runs/demo/archive.h5          print the headline tables of an archive
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

    p = sub.add_parser("run", help="run the whole study (resumes after the last finished stage)",
                       description="Data -> two-stage training -> attributions -> drift metrics -> iFIM -> "
                                   "statistics -> report, all into <out>/archive.h5. Re-running with the same "
                                   "config skips finished stages.")
    _add_run_args(p)
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

    p = sub.add_parser("summary", help="print the headline tables of an archive")
    p.add_argument("archive")
    p = sub.add_parser("report", help="write the HTML and Markdown report of an archive")
    p.add_argument("archive")
    p.add_argument("--out", help="folder (default: <archive folder>/report)")
    p = sub.add_parser("compare", help="compare the headline numbers of two archives")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--out", help="also write the comparison as a Markdown file here")
    p = sub.add_parser("bench", help="benchmark records")
    bsub = p.add_subparsers(dest="bench_command", metavar="ACTION")
    q = bsub.add_parser("export", help="write asv or pytest-benchmark results into an HDF5 file")
    q.add_argument("source", help="asv results folder (results/asv) or a pytest-benchmark JSON file")
    q.add_argument("--out", default="results/bench.h5", help="HDF5 file to write (default results/bench.h5); "
                                                              "a run archive gets a bench/ group")
    return parser


def _config(args):
    from . import config

    overrides = list(args.set)
    if args.out:
        overrides.append(f'run.out="{args.out}"')
    if args.device:
        overrides.append(f'run.device="{args.device}"')
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

    try:
        return _dispatch(args)
    except (ConfigError, ArchiveError, FileNotFoundError, ValueError) as exc:
        print(f"drift {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"drift {args.command}: interrupted; finished stages are kept in the archive", file=sys.stderr)
        return 130


def _dispatch(args) -> int:
    if args.command in ("run", "attribute", "metrics", "fisher"):
        from .pipeline import ALL_STEPS, Pipeline
        from .summary import print_summary

        cfg = _config(args)
        steps = getattr(args, "steps", ALL_STEPS)
        force = () if args.command == "run" else (steps[-1],) + (("stats",) if args.command == "metrics" else ())
        t0 = time.perf_counter()
        pipe = Pipeline(cfg, fresh=args.fresh, force=force)
        path = pipe.run(steps)
        print_summary(path)
        print(f"\narchive: {path}")
        if "train" in steps:
            print(f"data and training: {pipe.timings['data+training']:.0f} s")
        print(f"wall time: {time.perf_counter() - t0:.0f} s")
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
        from .benchio import export

        print(export(args.source, args.out))
        return 0
    return 2
