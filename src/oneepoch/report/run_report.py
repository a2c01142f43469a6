"""The report of one or several training runs: curves, verdicts, boundary table, config.

    >>> build_report(["runs/demo/dnn", "runs/demo/lr"], out_dir="runs/demo")   # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from oneepoch.analysis import one_epoch_verdict
from oneepoch.metrics import bucket_names
from oneepoch.report import html as H
from oneepoch.report.figures import plot_bucket_curves, plot_curves
from oneepoch.runfolder import read_metrics


def _run_label(run_dir: Path) -> str:
    cfg_path = run_dir / "config.yaml"
    if cfg_path.exists():
        cfg = yaml.safe_load(cfg_path.read_text()) or {}
        model = cfg.get("model")
        mtype = model.get("type") if isinstance(model, dict) else None
        if not mtype:  # e.g. a run of oneepoch.monitor with the user's own settings
            return run_dir.name
        return run_dir.name if run_dir.name == mtype else f"{run_dir.name} ({mtype})"
    return run_dir.name


def build_report(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None,
                 title: str = "", extra_sections: Sequence[tuple[str, str]] = ()) -> Path:
    """Write ``curves.png`` and ``report.html`` for the runs into ``out_dir`` (default: the
    single run's folder). Returns the report's path."""
    dirs = [Path(d) for d in run_dirs]
    for d in dirs:
        if not (d / "metrics.parquet").exists():
            raise FileNotFoundError(f"{d}: not a run folder (no metrics.parquet)")
    out = Path(out_dir) if out_dir else dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    runs = [(_run_label(d), read_metrics(d)) for d in dirs]
    curves = plot_curves(runs, out / "curves.png", "auc",
                         title or "Test and train AUC against epochs")
    sections: list[tuple[str, str]] = []
    verdict_rows, boundary_rows = [], []
    lines = []
    for (label, rows), d in zip(runs, dirs, strict=True):
        cfg_file = d / "config.yaml"
        cfg = yaml.safe_load(cfg_file.read_text()) if cfg_file.exists() else {}
        v = one_epoch_verdict([r["epoch"] for r in rows], [r["test_auc"] for r in rows],
                              [r["step"] for r in rows], float(cfg.get("min_drop", 0.005)))
        lines.append(H.verdict_box(f"{label}: {v.line()}"))
        summ = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
        last = rows[-1]
        verdict_rows.append([label, v.best_auc, round(v.best_epoch, 2), v.best_step,
                             last["test_auc"], round(last["epoch"], 2), v.drop,
                             summ.get("seconds", float("nan")),
                             summ.get("samples_per_s", float("nan"))])
        for b in v.boundaries:
            boundary_rows.append([label, b.epoch, b.auc_at_boundary, b.auc_at_window_end,
                                  b.min_after, b.drop, b.change_before])
    sections.append(("Verdict", "".join(lines)))
    sections.append(("Curves", H.img(curves, "AUC curves") +
                     "<p>Solid: test split; dashed: a fixed train subsample. Dotted lines mark "
                     "epoch boundaries.</p>"))
    buckets = plot_bucket_curves(runs, out / "buckets.png")
    if buckets is not None:
        sections.append(("AUC per ID-frequency bucket", H.img(buckets, "AUC per bucket") +
                         f"<p>{H.esc(_bucket_note(dirs))}</p>"))
    sections.append(("Summary", H.table(
        ["run", "best test AUC", "at epoch", "at step", "final test AUC", "final epoch",
         "largest drop", "seconds", "samples/s (incl. eval)"], verdict_rows)))
    if boundary_rows:
        sections.append(("Around each epoch boundary", H.table(
            ["run", "end of epoch", "AUC at boundary", "AUC 10% later", "lowest in next 10%",
             "drop", "change over the 10% before"], boundary_rows) +
            "<p>A one-epoch jump is a drop right after the boundary much larger than the trend "
            "going in.</p>"))
    sections.extend(extra_sections)
    cfg_html = "".join(
        f"<h3>{H.esc(label)}</h3><pre>{H.esc((d / 'config.yaml').read_text())}</pre>"
        for (label, _), d in zip(runs, dirs, strict=True) if (d / "config.yaml").exists())
    sections.append(("Configuration", cfg_html))
    return H.write_page(out / "report.html", title or "oneepoch report", sections)


def _bucket_note(dirs: Sequence[Path]) -> str:
    """How the runs bucketed test rows (from their config.yaml's eval section)."""
    seen = []
    for d in dirs:
        p = d / "config.yaml"
        ev = (yaml.safe_load(p.read_text()) or {}).get("eval", {}) if p.exists() else {}
        b = ev.get("bucket_bounds")
        if b:
            bounds = sorted(int(x) for x in b)
            names = bucket_names(len(bounds))
            lows = [1] + [x + 1 for x in bounds]
            parts = [f"{n} = {lo}-{hi}" for n, lo, hi in zip(names[1:], lows, bounds, strict=False)]
            text = (f"field {ev.get('bucket_field', 'auto')}: unseen = 0, {', '.join(parts)}, "
                    f"head > {bounds[-1]} training occurrences")
            if text not in seen:
                seen.append(text)
    return ("Test rows bucketed by the training count of their ID (auto = the single-ID field "
            "with the largest vocabulary); the legend gives each bucket's rows. "
            + "; ".join(seen))


def report_json(run_dir: str | Path) -> dict[str, Any]:
    d = Path(run_dir)
    return json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
