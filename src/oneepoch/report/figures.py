"""Matplotlib figures (Agg backend: no screen needed)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from oneepoch.io import atomic_write_with  # noqa: E402

COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write_with(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".")
                                                       or "png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


def plot_curves(runs: Sequence[tuple[str, list[dict[str, Any]]]], path: str | Path,
                metric: str = "auc", title: str = "", show_train: bool = True) -> Path:
    """Test (solid) and train (dashed) ``metric`` against epochs for each labelled run,
    with epoch boundaries marked."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    max_ep = 0.0
    for i, (label, rows) in enumerate(runs):
        if not rows:
            continue
        ep = np.array([r["epoch"] for r in rows])
        max_ep = max(max_ep, float(ep.max()))
        c = COLORS[i % len(COLORS)]
        ax.plot(ep, [r.get(f"test_{metric}", np.nan) for r in rows], color=c, lw=1.8,
                label=f"{label} test")
        if show_train and f"train_{metric}" in rows[0]:
            ax.plot(ep, [r.get(f"train_{metric}", np.nan) for r in rows], color=c, lw=1.0,
                    ls="--", label=f"{label} train")
    for k in range(1, int(np.ceil(max_ep))):
        ax.axvline(k, color="0.6", lw=0.8, ls=":")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric.upper())
    ax.set_title(title or f"{metric.upper()} during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def plot_mean_std(series: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                  path: str | Path, ylabel: str = "test AUC", title: str = "") -> Path:
    """Overlay of mean +/- std bands: ``series[label] = (x, mean, std)``."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    max_x = 0.0
    for i, (label, (x, m, s)) in enumerate(series.items()):
        c = COLORS[i % len(COLORS)]
        ax.plot(x, m, color=c, lw=1.6, label=label)
        ax.fill_between(x, m - s, m + s, color=c, alpha=0.18, lw=0)
        max_x = max(max_x, float(np.max(x)) if len(x) else 0.0)
    for k in range(1, int(np.ceil(max_x))):
        ax.axvline(k, color="0.6", lw=0.8, ls=":")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_cumulative_frequency(counts: dict[str, np.ndarray], path: str | Path) -> Path:
    """Paper A's Fig. 10: share of occurrences held by the least frequent x% of IDs."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, (name, c) in enumerate(counts.items()):
        c = np.sort(np.asarray(c)[np.asarray(c) > 0])
        if len(c) == 0:
            continue
        x = np.arange(1, len(c) + 1) / len(c)
        y = np.cumsum(c) / c.sum()
        ax.plot(x, y, color=COLORS[i % len(COLORS)], label=name)
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls=":")
    ax.set_xlabel("fraction of IDs (least frequent first)")
    ax.set_ylabel("cumulative fraction of occurrences")
    ax.set_title("ID frequency (paper A, Fig. 10)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_risk(curves: dict[str, tuple[Sequence[int], Sequence[float]]], path: str | Path,
              title: str = "") -> Path:
    """``oneepoch data risk``: share of test rows whose ID is seen at most k times in training,
    against k, one curve per field (``curves[field] = (ks, shares)``)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (name, (ks, share)) in enumerate(curves.items()):
        ax.plot(list(ks), 100 * np.asarray(share, dtype=float), marker="o",
                color=COLORS[i % len(COLORS)], label=name)
    ax.set_xscale("symlog", linthresh=1)
    ks_all = sorted({int(k) for ks, _ in curves.values() for k in ks})
    ax.set_xticks(ks_all)
    ax.set_xticklabels([str(k) for k in ks_all])
    ax.set_ylim(0, 100)
    ax.set_xlabel("k (ID seen at most k times in the training split)")
    ax.set_ylabel("% of test rows")
    ax.set_title(textwrap.fill(title or "Test rows resting on rare IDs", 75), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def bucket_keys(rows: Sequence[dict[str, Any]], prefix: str = "test") -> list[str]:
    """Bucket names with per-bucket AUC in metrics rows (keys ``<prefix>_auc_<b>`` beside
    ``<prefix>_n_<b>``), in first-seen order."""
    out: list[str] = []
    for r in rows[:1] + rows[-1:]:
        for k in r:
            b = k[len(prefix) + 5:]
            if k.startswith(f"{prefix}_auc_") and f"{prefix}_n_{b}" in r and b not in out:
                out.append(b)
    return out


def plot_bucket_curves(runs: Sequence[tuple[str, list[dict[str, Any]]]], path: str | Path,
                       title: str = "") -> Path | None:
    """Test AUC per ID-frequency bucket against epochs: one panel per bucket (rows in the
    legend), one colour per run. None when no run logged per-bucket AUC."""
    names: list[str] = []
    for _, rows in runs:
        names += [b for b in bucket_keys(rows) if b not in names]
    if not names:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names) + 1, 3.8), sharex=True,
                             squeeze=False)
    max_ep = 0.0
    for j, b in enumerate(names):
        ax = axes[0, j]
        for i, (label, rows) in enumerate(runs):
            if not rows or f"test_auc_{b}" not in rows[-1]:
                continue
            ep = np.array([r["epoch"] for r in rows])
            max_ep = max(max_ep, float(ep.max()))
            n = rows[-1].get(f"test_n_{b}", 0)
            ax.plot(ep, [r.get(f"test_auc_{b}", np.nan) for r in rows],
                    color=COLORS[i % len(COLORS)], lw=1.5, label=f"{label} ({int(n):,} rows)")
        ax.set_title(b)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[0]:
        for k in range(1, int(np.ceil(max_ep))):
            ax.axvline(k, color="0.6", lw=0.8, ls=":")
    axes[0, 0].set_ylabel("test AUC")
    fig.suptitle(title or "Test AUC per ID-frequency bucket", fontsize=10)
    return _save(fig, path)
