"""The HTML report in a real browser: headless Chromium loads it, every image decodes, nothing logs an error.

The report carries a small inline script that, on the page's load event, writes the number of images and of
decoded images (``img.complete && img.naturalWidth > 0``) into ``data-images-*`` attributes of <body>;
``--dump-dom`` prints the DOM after load, and ``--enable-logging=stderr`` puts console messages on stderr.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_report import full_report, parse_html

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"))
                 if p and Path(p).is_file()), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="cannot run: no Chromium browser found (looked for "
                                                          "/usr/bin/chromium and chromium on PATH)")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args], capture_output=True,
                          text=True, timeout=90)


def test_report_renders_in_chromium(tmp_path, tmp_path_factory):
    _, _, html_path = full_report(tmp_path_factory)
    n_figures = len(parse_html(html_path).imgs)
    assert n_figures >= 9
    url = html_path.resolve().as_uri()
    res = _chromium(tmp_path, "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom", url)
    assert res.returncode == 0, res.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", res.stdout)
    assert body, f"no <body> in the dumped DOM: {res.stdout[:500]!r}"
    total = re.search(r'data-images-total="(\d+)"', body.group(1))
    loaded = re.search(r'data-images-loaded="(\d+)"', body.group(1))
    assert total and loaded, f"the load script did not run: {body.group(0)!r}"
    assert int(total.group(1)) == n_figures
    assert int(loaded.group(1)) == n_figures, "some images did not decode"
    console = [ln for ln in res.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not console, "console messages:\n" + "\n".join(console)
    for sid in ("overview", "classification", "drift", "ranking", "examples", "fisher"):
        assert f'<section id="{sid}">' in res.stdout

    shot = tmp_path / "report.png"
    res = _chromium(tmp_path, "--hide-scrollbars", f"--screenshot={shot}", "--window-size=1280,2000", url)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        # a rendered page, not a blank one: many distinct colours (text, tables, figures)
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50


def test_a_broken_page_is_caught(tmp_path):
    """The same checks fail on a page with a broken image and a script error (the test can fail)."""
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head><script>window.addEventListener("load", function () {'
                    'var im = Array.prototype.slice.call(document.images);'
                    'document.body.setAttribute("data-images-loaded", String(im.filter(function (i) {'
                    'return i.complete && i.naturalWidth > 0; }).length)); });</script></head><body>'
                    '<img src="missing.png"><script>notDefined();</script></body></html>')
    res = _chromium(tmp_path, "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom",
                    page.as_uri())
    assert 'data-images-loaded="0"' in res.stdout
    assert any("CONSOLE" in ln and "notDefined" in ln for ln in res.stderr.splitlines())
