"""The wheel's package list covers every package in the source tree (a non-editable install would miss one)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    dirs = cfg.get("package-dir", {})
    found = set()
    for top, where in [("drift", "drift"), *((name, path) for name, path in dirs.items())]:
        for init in (ROOT / where).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / where)
            found.add(".".join((top, *rel.parts)))
    assert found - listed == set(), f"packages missing from pyproject.toml [tool.setuptools] packages: {found - listed}"
    assert listed - found == set(), f"pyproject.toml lists packages that do not exist: {listed - found}"
