"""``oneepoch compare``: remedies side by side against early stopping, on the same splits.

Every arm (the baseline ``early-stop`` and each remedy of :mod:`oneepoch.remedies.catalog`)
trains ``epochs`` epochs with ``seeds`` seeds on the same data, with the same validation split
(the data set's ``valid`` split, else a fixed 10% carved out of train), and selects its point
on validation (``early_stop.metric=auc``; with ``patience`` 0 nothing stops, so the curves
cover every epoch). Runs are resumable and parallel like ``sweep``
(``OUT/runs/<arm>/seed-k``). Every arm is checked (settings, data, hooks) before any trains.

Per arm, mean +/- std over seeds: the selected test AUC and where it was, the test AUC at
each epoch end and the drop right after each boundary (the verdict's rule), the gain over
the early-stopped baseline (paired by seed) and how many seeds beat it, train time and peak
RSS. The last line names the remedies that beat early stopping beyond seed noise, or says
that none does: a remedy beats it when the mean paired gain is at least :data:`MIN_GAIN`
(0.1 AUC points) and exceeds ``t x std / sqrt(n)`` (one-sided 95% Student t for n seeds; with
one seed nothing can).

    >>> res = run_compare("data/ml100k", ["meda", "freq-lr"], epochs=4, seeds=3)  # doctest: +SKIP
    >>> print(res.line)                                                            # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from oneepoch.analysis import one_epoch_verdict
from oneepoch.config import TrainConfig, load_config
from oneepoch.data.dataset import load_ctr
from oneepoch.io import atomic_write_json, atomic_write_text
from oneepoch.recipes.sweep import RunSpec, markdown_table, mean_curve, run_specs
from oneepoch.remedies import hooks_from_config
from oneepoch.remedies.catalog import BASELINE, REMEDIES, RemedyError, remedy_overrides
from oneepoch.runfolder import read_metrics, read_summary

# one-sided 95% Student t by degrees of freedom (n - 1)
T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860,
       9: 1.833}
VALID_SHARE = 0.1
MIN_GAIN = 0.001  # 0.1 AUC points: a gain below this is not worth a remedy, however steady


def t95(n: int) -> float:
    return T95.get(n - 1, 1.645 if n > 30 else 1.8)


@dataclass
class ArmResult:
    """One arm over its seeds (lists are per seed, in seed order)."""

    name: str
    what: str
    seeds: int
    selected_auc: list[float]
    selected_epoch: list[float]
    epoch_end_auc: dict[int, list[float]]
    boundary_drop: dict[int, list[float]]
    seconds: list[float]
    peak_rss_mib: list[float]
    gain: list[float] = field(default_factory=list)  # paired with the baseline's seeds
    beats_noise: bool = False

    def row(self) -> dict[str, Any]:
        return {"arm": self.name, "seeds": self.seeds,
                "selected_auc": ms(self.selected_auc), "selected_epoch": ms(self.selected_epoch),
                "epoch_end_auc": {k: ms(v) for k, v in self.epoch_end_auc.items()},
                "boundary_drop": {k: ms(v) for k, v in self.boundary_drop.items()},
                "gain": ms(self.gain), "seeds_beating": sum(g > 0 for g in self.gain),
                "beats_noise": self.beats_noise, "seconds": ms(self.seconds),
                "peak_rss_mib": ms(self.peak_rss_mib)}


@dataclass
class CompareResult:
    out: Path
    arms: list[ArmResult]
    line: str
    files: dict[str, Path]
    seconds: float


def ms(v: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (0 for one value; NaN for none)."""
    a = np.asarray([x for x in v if x is not None and not math.isnan(x)], dtype=float)
    if len(a) == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _fmt(m: tuple[float, float], d: int = 4, sign: bool = False) -> str:
    if math.isnan(m[0]):
        return "-"
    return f"{m[0]:{'+' if sign else ''}.{d}f} ± {m[1]:.{d}f}"


def validation_overrides(data_dir: Path, valid: str | None) -> list[str]:
    """``valid``: a split name, ``share:F`` (carved out of train at random), ``order:F`` (the
    last rows of train) or ``None`` (the data set's ``valid`` split, else ``share:0.1``)."""
    from oneepoch.data.schema import load_schema

    splits = load_schema(data_dir).splits
    if valid is None:
        valid = "valid" if "valid" in splits else f"share:{VALID_SHARE}"
    if valid == "none":
        raise RemedyError(f"{BASELINE}: needs a validation split or a carve-out; it never "
                          "selects on the test split (--valid SPLIT | share:0.1 | order:0.1)")
    kind, _, share = valid.partition(":")
    if kind in ("share", "order") and share:
        return [f"data.valid_share={float(share)}",
                f"data.valid_by={'random' if kind == 'share' else 'order'}"]
    if valid not in splits:
        raise RemedyError(f"--valid {valid}: no such split in {data_dir / 'schema.yaml'} "
                          f"(splits: {', '.join(splits)}); or use share:0.1")
    return [f"data.valid_split={valid}"]


def arm_stats(name: str, run_dirs: Sequence[Path], epochs: int, min_drop: float) -> ArmResult:
    """Read one arm's finished runs."""
    sel, sel_ep, secs, rss = [], [], [], []
    ends: dict[int, list[float]] = {k: [] for k in range(1, epochs + 1)}
    drops: dict[int, list[float]] = {k: [] for k in range(1, epochs)}
    for d in run_dirs:
        rows, summ = read_metrics(d), read_summary(d)
        if not rows or not summ.get("finished"):
            continue
        s = summ.get("selected", {})
        sel.append(float(s.get("test_auc", math.nan)))
        sel_ep.append(float(s.get("epoch", math.nan)))
        secs.append(float(summ.get("seconds", math.nan)))
        rss.append(float(summ.get("peak_rss_mib", math.nan)))
        ep = np.array([r["epoch"] for r in rows], dtype=float)
        auc = np.array([r["test_auc"] for r in rows], dtype=float)
        for k in ends:
            at = np.flatnonzero(np.abs(ep - k) < 1e-9)
            ends[k].append(float(auc[at[-1]]) if len(at) else math.nan)
        v = one_epoch_verdict(ep, auc, [r["step"] for r in rows], min_drop)
        got = {b.epoch: b.drop for b in v.boundaries}
        for k in drops:
            drops[k].append(got.get(k, math.nan))
    return ArmResult(name, REMEDIES[name].what, len(sel), sel, sel_ep, ends, drops, secs, rss)


def honest_line(arms: Sequence[ArmResult]) -> str:
    """Which remedies beat early stopping beyond seed noise (see the module doc)."""
    base = next(a for a in arms if a.name == BASELINE)
    winners = []
    for a in arms:
        if a.name == BASELINE:
            continue
        n = min(len(a.selected_auc), len(base.selected_auc))
        a.gain = [a.selected_auc[i] - base.selected_auc[i] for i in range(n)]
        m, s = ms(a.gain)
        a.beats_noise = bool(n >= 2 and m >= MIN_GAIN and m > t95(n) * s / math.sqrt(n))
        if a.beats_noise:
            winners.append(f"{a.name} ({m * 100:+.2f} pt, {sum(g > 0 for g in a.gain)}/{n} "
                           "seeds)")
    if winners:
        return ("beats early stopping beyond seed noise: " + ", ".join(winners))
    return "none does here: no remedy beats early stopping beyond seed noise"


HEADER = ["arm", "seeds", "selected test AUC", "selected at epoch", "gain vs early-stop (pt)",
          "seeds beating"]


def table_rows(arms: Sequence[ArmResult], epochs: int) -> tuple[list[str], list[list[str]]]:
    header = [*HEADER, *(f"AUC end of ep {k}" for k in range(1, epochs + 1)),
              *(f"drop after ep {k}" for k in range(1, epochs)), "train s", "peak RSS MiB"]
    rows = []
    for a in arms:
        g = ms([x * 100 for x in a.gain]) if a.name != BASELINE else (math.nan, math.nan)
        rows.append([a.name, str(a.seeds), _fmt(ms(a.selected_auc)),
                     _fmt(ms(a.selected_epoch), 2), _fmt(g, 2, sign=True),
                     f"{sum(x > 0 for x in a.gain)}/{len(a.gain)}" if a.gain else "-",
                     *(_fmt(ms(a.epoch_end_auc[k])) for k in range(1, epochs + 1)),
                     *(_fmt(ms(a.boundary_drop[k])) for k in range(1, epochs)),
                     _fmt(ms(a.seconds), 0), _fmt(ms(a.peak_rss_mib), 0)])
    return header, rows


def write_outputs(out: Path, arms: list[ArmResult], runs: dict[str, list[Path]], epochs: int,
                  line: str, title: str) -> dict[str, Path]:
    """``compare.png`` (mean test AUC per arm), ``compare.md``, ``compare.json``,
    ``report.html``."""
    from oneepoch.report.figures import plot_mean_std
    from oneepoch.report.html import esc, img, table, write_page

    series = {}
    for a in arms:
        x, m, s = mean_curve([read_metrics(d) for d in runs[a.name]])
        if len(x):
            series[a.name] = (x, m, s)
    png = plot_mean_std(series, out / "compare.png", "test AUC", title)
    header, rows = table_rows(arms, epochs)
    md = atomic_write_text(out / "compare.md", f"# {title}\n\n{markdown_table(header, rows)}\n"
                           f"**{line}**\n")
    js = atomic_write_json(out / "compare.json", {"title": title, "line": line,
                                                  "arms": [a.row() for a in arms]})
    what = table(["arm", "what it does"], [[a.name, a.what] for a in arms])
    html = write_page(out / "report.html", title, [
        ("Verdict", f"<p><b>{esc(line)}</b></p><p>Each arm's point is selected on the "
                    "validation split; the gain is the paired difference of selected test AUC "
                    "to the early-stopped baseline, seed by seed. A remedy beats it beyond "
                    "seed noise when the mean gain is at least 0.1 AUC points and exceeds the "
                    "one-sided 95% Student-t bound of the paired differences.</p>"),
        ("Test AUC (mean ± std over seeds)", img(png, title)),
        ("Per arm (mean ± std over seeds)", table(header, rows)),
        ("Arms", what)])
    return {"png": png, "md": md, "json": js, "html": html}


def run_compare(data: str | Path, remedies: Sequence[str], epochs: int = 4, seeds: int = 3,
                out: str | Path = "runs/compare", workers: int = 0,
                overrides: Sequence[str] = (), export: str | None = None,
                valid: str | None = None, patience: int = 0,
                config: str = "ctr") -> CompareResult:
    """Train the baseline and each remedy, then compare (see the module doc)."""
    t0 = time.time()
    if seeds < 1 or epochs < 1:
        raise ValueError(f"--seeds and --epochs: must be >= 1 (got {seeds}, {epochs})")
    data_dir, out = Path(data), Path(out)
    names = [BASELINE, *[r for r in dict.fromkeys(remedies) if r != BASELINE]]
    for n in names:
        if n not in REMEDIES:
            raise RemedyError(f"remedy {n!r}: unknown (choose from {', '.join(REMEDIES)})")
    base = [f"data.path={data_dir}", f"epochs={epochs}", "early_stop.metric=auc",
            f"early_stop.patience={patience}", *validation_overrides(data_dir, valid),
            *overrides]
    cfg0 = load_config(TrainConfig, config, base)  # a bad base setting fails here
    from oneepoch.tracking import shared_store

    base += shared_store(cfg0, out)  # tracking: every run in OUT/mlruns (or OUT/tensorboard)
    loaded = load_ctr(data_dir, list(dict.fromkeys(
        [cfg0.data.train_split, cfg0.data.test_split, *([cfg0.data.valid_split]
                                                          if cfg0.data.valid_split else [])])))
    from oneepoch.tracking import tracking_hooks
    from oneepoch.training.trainer import setup_run

    arms_ov: dict[str, list[str]] = {}
    for n in names:  # every arm checked before any trains
        try:
            ov = [*base, *remedy_overrides(n, loaded, export)]
            cfg = load_config(TrainConfig, config, [*ov, "threads=1", "progress=false"])
            setup_run(cfg, out / "runs" / n / "seed-0",
                      [*hooks_from_config(cfg), *tracking_hooks(cfg)], loaded)
        except (ValueError, FileNotFoundError) as e:
            raise RemedyError(f"remedy {n}: {e}") from None
        arms_ov[n] = ov
    del loaded
    runs = {n: [out / "runs" / n / f"seed-{s}" for s in range(seeds)] for n in names}
    specs = [RunSpec(str(runs[n][s]), [*arms_ov[n], f"seed={s}"], config)
             for s in range(seeds) for n in names]
    run_specs(specs, workers, fresh_processes=True)
    arms = [arm_stats(n, runs[n], epochs, cfg0.min_drop) for n in names]
    line = honest_line(arms)
    title = f"compare: {data_dir.name}, {epochs} epochs, {seeds} seeds"
    files = write_outputs(out, arms, runs, epochs, line, title)
    return CompareResult(out, arms, line, files, time.time() - t0)


def summarize(out: str | Path) -> str:
    """The Markdown table of a finished comparison (``compare.md``)."""
    return (Path(out) / "compare.md").read_text()


def load_result(out: str | Path) -> dict[str, Any]:
    """``compare.json`` of a finished comparison."""
    return json.loads((Path(out) / "compare.json").read_text())
