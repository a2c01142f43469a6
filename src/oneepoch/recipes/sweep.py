"""Grids of training runs: one folder per (point, seed), parallel processes, resumable.

    >>> pts = grid_points({"optim.name": ["adam", "sgd"], "optim.lr": ["0.1"]})
    >>> [point_name(p) for p in pts]
    ['optim.name=adam,optim.lr=0.1', 'optim.name=sgd,optim.lr=0.1']

:func:`run_sweep` trains every point of a grid with several seeds (``OUT/<point>/seed-<k>``),
skips runs whose ``summary.json`` says finished, then writes ``OUT/sweep.png`` (test AUC
against epochs, mean +/- std over seeds per point) and ``OUT/summary.{md,json,html}``:
per point the best AUC and where, the AUC at the end of epoch 1, the drop right after it
(paper A's phenomenon), the final AUC, each mean +/- std over seeds.

The lower-level :func:`run_specs` (used by ``oneepoch reproduce zhang2022``) runs any list of
:class:`RunSpec`, including runs that continue another run from its end-of-epoch-1
checkpoint with some parameter groups frozen (paper A's Fig. 17).
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from oneepoch.analysis import drop_after, one_epoch_verdict
from oneepoch.config import TrainConfig, load_config, to_dict
from oneepoch.runfolder import read_metrics, reuse
from oneepoch.training.hooks import Hook

DEFAULTS = to_dict(TrainConfig())  # settings a later version adds count at their default
PROBES = ("adistance", "updates", "collapse")


# ----------------------------------------------------------------------------- specs


@dataclass
class RunSpec:
    """One training run of a sweep.

    Args:
        run_dir: the run's folder.
        overrides: ``key=value`` settings applied over ``config``.
        config: YAML file or preset name (None = the defaults).
        probes: hooks to attach, e.g. ``["updates", "adistance:every=2,rows=4000"]``.
        continue_from: another run's folder: start from its ``checkpoints/epoch-001`` (weights,
            optimizer state, data order and metrics so far) instead of from scratch.
    """

    run_dir: str
    overrides: list[str] = field(default_factory=list)
    config: str | None = None
    probes: list[str] = field(default_factory=list)
    continue_from: str = ""


def make_probe(spec: str) -> Hook:
    """A probe hook from ``name`` or ``name:key=value,...`` (names: ``adistance``,
    ``updates``, ``collapse``).

    The settings are read like every other config (:func:`oneepoch.config.from_dict` on the
    probe's ``Settings`` dataclass): typed, range-checked, unknown keys with a did-you-mean.

    >>> type(make_probe("adistance:every=2,rows=1000")).__name__
    'ADistanceProbe'
    """
    import difflib

    from oneepoch.config import ConfigError, from_dict, parse_overrides
    from oneepoch.probes.adistance import ADistanceProbe
    from oneepoch.probes.collapse import CollapseProbe
    from oneepoch.probes.updates import UpdateNormLogger

    name, _, args = spec.partition(":")
    name = name.strip()
    classes: dict[str, Any] = {"adistance": ADistanceProbe, "updates": UpdateNormLogger,
                               "collapse": CollapseProbe}
    if name not in classes:
        near = difflib.get_close_matches(name, PROBES, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"probe {name!r}: unknown{hint}; choose {', '.join(PROBES)}")
    items = [a.strip() for a in args.split(",") if a.strip()]
    for item in items:
        if "=" not in item:
            raise ConfigError(f"probe {spec!r}: expected key=value after ':', got {item!r}")
    try:
        settings = from_dict(classes[name].Settings, parse_overrides(items))
    except ConfigError as e:
        raise ConfigError(f"probe {spec!r}: {e}") from None
    return classes[name](**asdict(settings))


def spec_config(spec: RunSpec) -> TrainConfig:
    """The full settings a spec trains with."""
    return load_config(TrainConfig, spec.config, ["threads=1", "progress=false", *spec.overrides])


def check_same_config(spec: RunSpec) -> None:
    """Refuse to skip a finished run that was trained with other settings than ``spec``."""
    reuse(spec.run_dir, to_dict(spec_config(spec)), DEFAULTS)


def _seed_from_checkpoint(src: Path, dst: Path) -> None:
    """Make ``dst`` a copy of run ``src`` as it was at the end of epoch 1."""
    ck = src / "checkpoints" / "epoch-001"
    if not ck.exists():
        raise FileNotFoundError(f"{ck}: missing; the base run must keep its epoch-1 checkpoint "
                                "(checkpoint_keep=0)")
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(ck, dst / "checkpoints" / "epoch-001")
    for name in ("metrics.parquet", "updates.parquet"):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def execute(spec: RunSpec) -> dict[str, Any]:
    """Train one run in this process (``threads=1``, no progress bar); returns its summary."""
    from oneepoch.remedies import hooks_from_config
    from oneepoch.tracking import tracking_hooks
    from oneepoch.training.trainer import train

    cfg = spec_config(spec)
    run_dir = Path(spec.run_dir)
    resume = reuse(run_dir, to_dict(cfg), DEFAULTS) == "resume"  # a killed run continues
    if spec.continue_from and not resume:
        _seed_from_checkpoint(Path(spec.continue_from), run_dir)
        resume = True
    hooks = [*hooks_from_config(cfg), *(make_probe(p) for p in spec.probes),
             *tracking_hooks(cfg)]
    res = train(cfg, run_dir, hooks=hooks, resume=resume)
    return {"run_dir": str(run_dir), "seconds": res.seconds, "verdict": res.verdict.line()}


def run_specs(specs: Sequence[RunSpec], workers: int = 0, log: bool = True,
              fresh_processes: bool = False) -> list[dict]:
    """Run the unfinished ``specs``: in this process (``workers=1``) or in a pool of processes
    (``0`` = one per core). Specs with ``continue_from`` wait until their source is finished.
    With ``fresh_processes`` each run gets a process of its own (so each run's peak RSS in its
    ``summary.json`` is its own). Returns one summary per run trained now."""
    todo = [s for s in specs if reuse(s.run_dir, to_dict(spec_config(s)), DEFAULTS) != "skip"]
    skipped = len(specs) - len(todo)
    if log and skipped:
        print(f"skipping {skipped} finished run(s)", flush=True)
    done: list[dict] = []
    first = [s for s in todo if not s.continue_from]
    second = [s for s in todo if s.continue_from]
    for phase in (first, second):
        done.extend(_run_phase(phase, workers, log, len(done), len(todo), fresh_processes))
    return done


def _run_phase(specs: list[RunSpec], workers: int, log: bool, n0: int, total: int,
               fresh: bool = False) -> list[dict]:
    out: list[dict] = []
    if not specs:
        return out
    workers = workers or os.cpu_count() or 1
    t0 = time.time()

    def note(r: dict) -> None:
        out.append(r)
        if log:
            print(f"[{n0 + len(out)}/{total}] {r['run_dir']}: {r['verdict']} "
                  f"[{r['seconds']:.0f} s, elapsed {time.time() - t0:.0f} s]", flush=True)

    if (workers == 1 or len(specs) == 1) and not fresh:
        for s in specs:
            note(execute(s))
        return out
    ctx = mp.get_context("spawn")  # no forked torch thread pools
    kw = {"max_tasks_per_child": 1} if fresh else {}
    with ProcessPoolExecutor(min(workers, len(specs)), mp_context=ctx, **kw) as pool:
        futures = [pool.submit(execute, s) for s in specs]
        for f in as_completed(futures):
            note(f.result())
    return out


# ----------------------------------------------------------------------------- grids


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``["optim.lr=1e-3,1e-2", "model.type=dnn,lr"]`` -> ``{key: [values]}``.

    A value holding a list is written in brackets: ``model.hidden=[200,80],[400,160]``.
    """
    grid: dict[str, list[str]] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip() or not raw.strip():
            raise ValueError(f"--grid {item!r}: expected key=v1,v2,...")
        values = [v.strip() for v in re.findall(r"\[[^\]]*\]|[^,]+", raw) if v.strip()]
        if key.strip() in grid:
            raise ValueError(f"--grid: key {key.strip()!r} given twice")
        grid[key.strip()] = values
    return grid


def grid_points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """The Cartesian product of a grid, in the order given."""
    keys = list(grid)
    return [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*grid.values())]


def point_name(point: dict[str, str]) -> str:
    """A readable, file-system-safe folder name for a grid point."""
    s = ",".join(f"{k}={v}" for k, v in point.items()) or "base"
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "", s.replace(" ", ""))


# ----------------------------------------------------------------------------- summaries


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def run_stats(rows: list[dict[str, Any]], min_drop: float = 0.005) -> dict[str, float]:
    """Per-run numbers: best test AUC and its epoch, AUC at the end of epoch 1, the drop right
    after it (:func:`oneepoch.analysis.boundary_drop`, the number the verdict uses), the AUC
    at the end of epoch 2 and the final AUC."""
    ep = np.array([r["epoch"] for r in rows], dtype=float)
    a = np.array([r["test_auc"] for r in rows], dtype=float)
    v = one_epoch_verdict(ep, a, [r["step"] for r in rows], min_drop)
    at = lambda x: float(a[np.argmin(np.abs(ep - x))]) if ep.max() >= x - 1e-9 else math.nan  # noqa: E731
    return {"best_auc": v.best_auc, "best_epoch": v.best_epoch, "auc_epoch1": at(1.0),
            "drop_epoch2": drop_after(v, 1), "auc_epoch2": at(2.0),
            "final_auc": float(a[-1]), "final_epoch": float(ep[-1])}


STAT_KEYS = ("best_auc", "best_epoch", "auc_epoch1", "drop_epoch2", "auc_epoch2", "final_auc")


@dataclass
class PointSummary:
    """A grid point over its seeds: ``stats[key] = (mean, std)`` and the mean curve."""

    name: str
    run_dirs: list[str]
    stats: dict[str, tuple[float, float]]
    epochs: list[float]
    curve_mean: list[float]
    curve_std: list[float]
    seeds: int = 0

    def mean(self, key: str) -> float:
        return self.stats[key][0]


def mean_curve(runs: Sequence[list[dict[str, Any]]], key: str = "test_auc"
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std of ``key`` over runs, on the first run's epochs (others interpolated;
    points where a run has no value are skipped)."""
    runs = [r for r in runs if r]
    if not runs:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    x = np.array([r["epoch"] for r in runs[0] if r.get(key) is not None], dtype=float)
    ys = []
    for rows in runs:
        e = np.array([r["epoch"] for r in rows if r.get(key) is not None], dtype=float)
        y = np.array([r[key] for r in rows if r.get(key) is not None], dtype=float)
        if len(e) == 0:
            continue
        yi = np.interp(x, e, y, left=np.nan, right=np.nan)
        ys.append(yi)
    if not ys:
        return x, np.full(len(x), np.nan), np.full(len(x), np.nan)
    m = np.nanmean(np.stack(ys), 0)
    s = np.nanstd(np.stack(ys), 0, ddof=1) if len(ys) > 1 else np.zeros(len(x))
    return x, m, s


def summarize_point(name: str, run_dirs: Sequence[str | Path], min_drop: float = 0.005
                    ) -> PointSummary:
    """Aggregate the finished runs of one point (missing runs are left out)."""
    runs = [read_metrics(d) for d in run_dirs]
    runs = [r for r in runs if r]
    per = [run_stats(r, min_drop) for r in runs]
    stats = {k: _mean_std([p[k] for p in per]) for k in STAT_KEYS}
    x, m, s = mean_curve(runs)
    return PointSummary(name, [str(d) for d in run_dirs], stats, x.tolist(), m.tolist(),
                        s.tolist(), len(runs))


def fmt_ms(ms: tuple[float, float], digits: int = 4) -> str:
    m, s = ms
    return "nan" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


SUMMARY_HEADER = ["point", "seeds", "best AUC", "best at epoch", "AUC end of ep 1",
                  "drop at ep 2", "AUC end of ep 2", "final AUC"]


def summary_rows(points: Sequence[PointSummary]) -> list[list[str]]:
    """Table rows (strings) matching :data:`SUMMARY_HEADER`."""
    return [[p.name, str(p.seeds), fmt_ms(p.stats["best_auc"]),
             fmt_ms(p.stats["best_epoch"], 2), fmt_ms(p.stats["auc_epoch1"]),
             fmt_ms(p.stats["drop_epoch2"]), fmt_ms(p.stats["auc_epoch2"]),
             fmt_ms(p.stats["final_auc"])] for p in points]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_summary(points: Sequence[PointSummary], out: str | Path, title: str) -> dict[str, Path]:
    """``sweep.png``, ``summary.md``, ``summary.json`` and ``summary.html`` in ``out``."""
    from oneepoch.report.figures import plot_mean_std
    from oneepoch.report.html import img, table, write_page

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    series = {p.name: (np.array(p.epochs), np.array(p.curve_mean), np.array(p.curve_std))
              for p in points if p.epochs}
    png = plot_mean_std(series, out / "sweep.png", "test AUC", title)
    rows = summary_rows(points)
    md = out / "summary.md"
    md.write_text(f"# {title}\n\n" + markdown_table(SUMMARY_HEADER, rows))
    js = out / "summary.json"
    js.write_text(json.dumps([{k: v for k, v in asdict(p).items()
                               if k not in ("curve_mean", "curve_std", "epochs")}
                              for p in points], indent=1, allow_nan=True))
    html = write_page(out / "summary.html", title, [
        ("Test AUC", img(png, title)),
        ("Per point (mean ± std over seeds)", table(SUMMARY_HEADER, rows))])
    return {"png": png, "md": md, "json": js, "html": html}


@dataclass
class SweepResult:
    out: Path
    points: list[PointSummary]
    files: dict[str, Path]
    seconds: float


def run_sweep(config: str | None, grid: dict[str, list[str]], seeds: int = 3,
              out: str | Path = "runs/sweep", workers: int = 0,
              overrides: Sequence[str] = (), probes: Sequence[str] = ()) -> SweepResult:
    """Train every grid point with seeds ``0..seeds-1`` and summarise (see module doc).

    Example:
        >>> res = run_sweep("ctr", {"model.type": ["dnn", "lr"]}, seeds=3,
        ...                 overrides=["data.path=runs/demo/data"])     # doctest: +SKIP
        >>> print((res.out / "summary.md").read_text())                 # doctest: +SKIP
    """
    t0 = time.time()
    if seeds < 1:
        raise ValueError(f"--seeds: must be >= 1, got {seeds}")
    out = Path(out)
    points = grid_points(grid)
    base = list(overrides)
    bcfg = load_config(TrainConfig, config, base)  # fail early on a bad base setting
    from oneepoch.tracking import shared_store

    base += shared_store(bcfg, out)  # tracking: every run of the sweep in OUT/mlruns
    specs, by_point = [], {}
    for p in points:
        name = point_name(p)
        ov = [*base, *(f"{k}={v}" for k, v in p.items())]
        load_config(TrainConfig, config, ov)  # ... or a bad grid value
        dirs = []
        for seed in range(seeds):
            d = out / name / f"seed-{seed}"
            specs.append(RunSpec(str(d), [*ov, f"seed={seed}"], config, list(probes)))
            dirs.append(d)
        by_point[name] = dirs
    run_specs(specs, workers)
    cfg = load_config(TrainConfig, config, base)
    summaries = [summarize_point(n, d, cfg.min_drop) for n, d in by_point.items()]
    files = write_summary(summaries, out, f"sweep: {', '.join(grid) or 'base'}")
    return SweepResult(out, summaries, files, time.time() - t0)
