"""Every kind of HTML report, opened in a real browser (headless Chromium, from Debian's
packages): each figure decodes, each table has rows, nothing is fetched from outside the file.
Skips, saying why, where no Chromium is installed (``apt-get install chromium``)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome")
                if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium installed (Debian: "
                                "apt-get install chromium); the reports were not opened")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--virtual-time-budget=5000"]

# run in the page after load: how many images decoded, how many tables have data rows
PROBE = """<script>window.addEventListener('load', function () {
  var imgs = Array.from(document.images), tabs = Array.from(document.querySelectorAll('table'));
  var r = {images: imgs.length,
           decoded: imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length,
           tables: tabs.length,
           filled: tabs.filter(function (t) {
             return Array.from(t.rows).filter(function (x) { return x.querySelector('td'); })
               .length > 0; }).length};
  var pre = document.createElement('pre'); pre.id = 'browser-check';
  pre.textContent = JSON.stringify(r); document.body.appendChild(pre);
});</script>"""


def _browser(args: list[str], url: str) -> str:
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run([BROWSER, *FLAGS, f"--user-data-dir={profile}", *args, url],
                             capture_output=True, text=True, timeout=120)
    return out.stdout


def check_in_browser(page: Path) -> dict[str, int]:
    """Open a copy of ``page`` with :data:`PROBE` added; the counts the browser reports."""
    html = page.read_text()
    external = re.findall(r"""(?:src|href)\s*=\s*["']?(?!data:|#)([a-z]+:[^"' >]*|//[^"' >]*)""",
                          html, re.I)
    assert not external, f"{page}: refers to outside files {external[:3]} (must open offline)"
    probe = page.with_name(page.stem + ".probe.html")
    probe.write_text(html.replace("</body>", PROBE + "</body>"))
    dom = _browser(["--dump-dom"], probe.as_uri())
    m = re.search(r'<pre id="browser-check">(.*?)</pre>', dom)
    assert m, f"{page}: the browser did not run the page's load event:\n{dom[:500]}"
    r = json.loads(m.group(1).replace("&quot;", '"'))
    assert r["decoded"] == r["images"], f"{page}: {r['images'] - r['decoded']} figure(s) " \
        "did not load"
    assert r["filled"] == r["tables"], f"{page}: {r['tables'] - r['filled']} empty table(s)"
    return r


def _png(path: Path) -> Path:
    from oneepoch.report.figures import plot_mean_std

    x = np.linspace(0, 2, 9)
    return plot_mean_std({"a": (x, 0.7 + 0.01 * x, 0.001 + 0 * x)}, path, "test AUC", "t")


def test_run_report(tmp_path: Path) -> None:
    from oneepoch.monitor import Monitor

    x = torch.randn(200, 3)
    y = (x[:, 0] + torch.randn(200) > 0).float()
    mon = Monitor(tmp_path / "run", 5, {"test": [(x, y)], "train": [(x, y)]},
                  predict=lambda b: b[:, 0], keep_best="none", epochs=2, per_epoch=5)
    for _ in range(10):
        mon.step(0.5)
    mon.finish()
    r = check_in_browser(tmp_path / "run" / "report.html")
    assert r["images"] >= 1 and r["tables"] >= 2


def test_sweep_report(tmp_path: Path) -> None:
    from oneepoch.recipes.sweep import PointSummary, write_summary

    pts = [PointSummary(f"p{i}", [], {k: (0.7, 0.01) for k in (
        "best_auc", "best_epoch", "auc_epoch1", "drop_epoch2", "auc_epoch2", "final_auc")},
        [0.0, 1.0, 2.0], [0.6, 0.7, 0.68], [0.01, 0.01, 0.01], 2) for i in range(2)]
    files = write_summary(pts, tmp_path, "sweep: test")
    r = check_in_browser(files["html"])
    assert r["images"] == 1 and r["tables"] == 1


def test_zhang2022_report_and_its_check_marks(tmp_path: Path) -> None:
    from oneepoch.recipes.zhang2022 import write_report

    d = tmp_path / "fig3"
    d.mkdir()
    (d / "result.json").write_text(json.dumps({
        "figure": "3", "title": "Train vs test AUC", "claim": "a claim", "verdict": "mixed",
        "checks": [{"text": "test AUC drops", "numbers": "0.012", "passed": True},
                   {"text": "train AUC jumps", "numbers": "0.001", "passed": False}],
        "images": [str(_png(d / "fig3.png"))], "table": {"header": ["a", "b"],
                                                          "rows": [["x", 1.0]]},
        "seconds": 1.0, "preset": "quick"}))
    page = write_report(tmp_path)
    html = page.read_text()
    assert "PASS" in html and "FAIL" in html
    assert not re.search("[\u2700-\u27bf\U0001f300-\U0001faff]", html), "emoji glyphs left"
    r = check_in_browser(page)
    assert r["images"] == 1 and r["tables"] == 2
    shot = tmp_path / "shot.png"
    _browser([f"--screenshot={shot}", "--window-size=1000,700"], page.as_uri())
    assert shot.exists() and shot.stat().st_size > 5000


def test_hsu2024_report(tmp_path: Path) -> None:
    from oneepoch.recipes import hsu2024 as H

    rng = np.random.default_rng(0)

    def point() -> dict[str, dict[str, float]]:
        return {p: {"auc": 0.7 + 0.01 * rng.random(), "hit3": 0.2 + 0.01 * rng.random(),
                    "epoch": 1.0} for p in ("best", "last")}

    methods = ("no_id", "random_id", "single_stage", "frozen", "finetune")
    res = {"seeds": 2, "uv_auc": {"homefeed": [0.6, 0.61]},
           "surfaces": {"homefeed": {m: [point(), point()] for m in methods}}}
    page = H._table1_report(tmp_path, res, H.Preset(surfaces=None))  # type: ignore[arg-type]
    r = check_in_browser(page)
    assert r["tables"] >= 2


def test_compare_report(tmp_path: Path) -> None:
    from oneepoch.recipes.compare import ArmResult, write_outputs
    from oneepoch.runfolder import write_metrics

    runs = {}
    arms = []
    for k, name in enumerate(("early-stop", "meda")):
        d = tmp_path / "runs" / name / "seed-0"
        d.mkdir(parents=True)
        write_metrics(d, [{"step": s, "epoch": s / 4, "test_auc": 0.6 + 0.01 * s + 0.01 * k}
                          for s in range(9)])
        runs[name] = [d]
        arms.append(ArmResult(name, "what it does", 1, [0.7], [1.0], {1: [0.7], 2: [0.69]},
                              {1: [0.01]}, [3.0], [100.0], [0.01] if k else []))
    files = write_outputs(tmp_path, arms, runs, 2, "none does here", "compare: test")
    r = check_in_browser(files["html"])
    assert r["images"] == 1 and r["tables"] == 2
