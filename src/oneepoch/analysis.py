"""Reading a test-AUC curve: the one rule for "the drop after an epoch boundary", the best
point, and the one-epoch verdict. Every summary (``train``'s verdict, ``sweep`` and
``reproduce`` tables) takes its numbers from here, so they cannot disagree. NumPy only.

The rule, for an integer boundary k (the end of epoch k):

* ``at`` = the AUC at the last evaluation at or before k;
* the window is (k, k + ``window``] plus 0.01 epoch of slack (evaluations fall on whole
  steps: 1.1004 counts as "10% into" epoch 2); when no evaluation falls inside it, it is
  widened to the first evaluation after k and the boundary is marked ``widened``;
* ``drop`` = ``at`` minus the lowest AUC in the window (positive = the AUC fell).

The phenomenon is declared when the drop at some boundary whose window was not widened is at
least ``min_drop``. A curve with a non-finite AUC gets no verdict (``valid`` is false).

    >>> v = one_epoch_verdict([0.5, 1.0, 1.05, 1.1, 1.5, 2.0], [0.6, 0.70, 0.68, 0.69, 0.69, 0.69])
    >>> v.phenomenon, round(v.drop, 3), v.at_epoch
    (True, 0.02, 2)
    >>> round(boundary_drop([0.5, 1.0, 1.5], [0.6, 0.7, 0.65]).drop, 3)  # widened to 1.5
    0.05
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

EPS = 1e-9
WINDOW = 0.1  # epochs after a boundary in which a drop counts as "right after" it
WINDOW_SLACK = 0.01  # evaluation points land on whole steps
MIN_DROP = 0.005


@dataclass
class Boundary:
    """What happened around the end of epoch ``epoch`` (the start of epoch ``epoch + 1``)."""

    epoch: int
    auc_at_boundary: float
    min_after: float  # lowest AUC within the window after the boundary
    drop: float  # auc_at_boundary - min_after (positive = the AUC fell)
    auc_at_window_end: float  # AUC at (about) boundary + window
    change_before: float  # AUC(boundary) - AUC(boundary - window): the trend going in
    widened: bool = False  # no evaluation inside the window: measured at the first one after


def _value_near(epochs: np.ndarray, aucs: np.ndarray, x: float) -> float:
    return float(aucs[int(np.argmin(np.abs(epochs - x)))])


def boundary_drop(epochs: ArrayLike, aucs: ArrayLike, boundary: int = 1,
                  window: float = WINDOW) -> Boundary:
    """The drop right after ``boundary`` (see the module doc); ``drop`` is NaN when there is
    no evaluation on one side of it. NaN AUCs are skipped."""
    e = np.asarray(epochs, dtype=np.float64)
    a = np.asarray(aucs, dtype=np.float64)
    ok = ~np.isnan(a)
    e, a = e[ok], a[ok]
    before = np.flatnonzero(e <= boundary + EPS)
    after_all = np.flatnonzero(e > boundary + EPS)
    if len(before) == 0 or len(after_all) == 0:
        return Boundary(boundary, math.nan, math.nan, math.nan, math.nan, math.nan)
    after = after_all[e[after_all] <= boundary + window + WINDOW_SLACK]
    widened = len(after) == 0
    if widened:
        after = after_all[:1]
    at, lo = float(a[before[-1]]), float(a[after].min())
    return Boundary(boundary, at, lo, at - lo, _value_near(e, a, boundary + window),
                    at - _value_near(e[before], a[before], boundary - window), widened)


@dataclass
class Verdict:
    best_index: int
    best_epoch: float
    best_auc: float
    best_step: int
    boundaries: list[Boundary] = field(default_factory=list)
    phenomenon: bool = False
    drop: float = 0.0  # drop at the first qualifying boundary (else the largest drop)
    at_epoch: int = 0  # the epoch whose start shows that drop (2 = start of the second epoch)
    min_drop: float = MIN_DROP
    window: float = WINDOW
    too_sparse: bool = False  # boundaries crossed, but no evaluation inside the window
    valid: bool = True  # False: the curve has non-finite values; no verdict is given
    problem: str = ""  # why the verdict is not valid

    def line(self) -> str:
        """``one-epoch phenomenon: yes (drop 0.021 at epoch 2)`` or ``... no (...)``."""
        if not self.valid:
            return f"one-epoch phenomenon: invalid run ({self.problem}); no verdict"
        judged = [b for b in self.boundaries if not b.widened]
        if not judged and self.too_sparse:
            return (f"one-epoch phenomenon: unknown (no evaluation within {self.window:g} epoch "
                    "after a boundary: evaluate more often, e.g. eval.per_epoch=20)")
        if not judged:
            return "one-epoch phenomenon: unknown (train at least 2 epochs to see a boundary)"
        if self.phenomenon:
            return (f"one-epoch phenomenon: yes (drop {self.drop:.3f} at epoch {self.at_epoch}; "
                    f"best AUC {self.best_auc:.4f} at epoch {self.best_epoch:.2f})")
        shown = round(self.drop, 3) + 0.0  # no "-0.000"
        return (f"one-epoch phenomenon: no (largest drop after a boundary {shown:+.3f} < "
                f"{self.min_drop}; best AUC {self.best_auc:.4f} at epoch {self.best_epoch:.2f})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def one_epoch_verdict(epochs: ArrayLike, aucs: ArrayLike, steps: ArrayLike | None = None,
                      min_drop: float = MIN_DROP, window: float = WINDOW) -> Verdict:
    """Judge a test-AUC curve sampled at fractional ``epochs`` (see the module doc).

    Raises ``ValueError`` when there is no evaluation point at all; a curve holding a
    non-finite AUC gives a Verdict with ``valid=False``.
    """
    e = np.asarray(epochs, dtype=np.float64)
    a = np.asarray(aucs, dtype=np.float64)
    if len(a) == 0:
        raise ValueError("one_epoch_verdict: no evaluation points")
    st = np.arange(len(e)) if steps is None else np.asarray(steps)
    bad = ~np.isfinite(a)
    if bad.all():
        v = Verdict(0, float(e[0]), math.nan, int(st[0]), min_drop=min_drop, window=window)
        v.valid, v.problem = False, "no finite test AUC"
        return v
    ok = ~bad
    bi = int(np.flatnonzero(ok)[np.argmax(a[ok])])
    v = Verdict(bi, float(e[bi]), float(a[bi]), int(st[bi]), min_drop=min_drop, window=window)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        v.valid = False
        v.problem = f"test AUC is {a[first]} at epoch {e[first]:.2f} (step {int(st[first])})"
        return v
    for k in range(1, int(np.floor(e.max() - EPS)) + 1):
        b = boundary_drop(e, a, k, window)
        if math.isnan(b.drop):
            continue
        v.boundaries.append(b)
        v.too_sparse = v.too_sparse or b.widened
    judged = [b for b in v.boundaries if not b.widened]
    if judged:
        # headline: the first boundary with a qualifying drop (else the largest drop)
        hits = [b for b in judged if b.drop >= min_drop]
        head = hits[0] if hits else max(judged, key=lambda b: b.drop)
        v.drop, v.at_epoch, v.phenomenon = head.drop, head.epoch + 1, bool(hits)
    return v


def drop_after(verdict: Verdict, boundary: int = 1) -> float:
    """The drop the verdict measured right after ``boundary`` (NaN if not crossed)."""
    for b in verdict.boundaries:
        if b.epoch == boundary:
            return b.drop
    return math.nan


# ------------------------------------------------- any tracked quantity across epoch 1


def _around(ep: np.ndarray, v: np.ndarray, x: float) -> tuple[float, float, float]:
    """Values at the last point at or before ``x``, the point before it and the first point
    after ``x`` (points where ``v`` is NaN are skipped; NaN where missing)."""
    ok = ~np.isnan(v)
    ep, v = ep[ok], v[ok]
    before, after = np.flatnonzero(ep <= x + 1e-9), np.flatnonzero(ep > x + 1e-9)
    at = float(v[before[-1]]) if len(before) else math.nan
    prev = float(v[before[-2]]) if len(before) > 1 else math.nan
    nxt = float(v[after[0]]) if len(after) else math.nan
    return prev, at, nxt


@dataclass
class Jump:
    """Change of a tracked quantity across the end of epoch 1, mean ± std over runs."""

    jump: float  # from the end of epoch 1 to the first measurement after it
    jump_std: float
    trend: float  # over the same number of measurements just before the boundary

    def is_jump(self, threshold: float) -> bool:
        """At least ``threshold`` and at least twice the trend going in: a step, not a slope."""
        return bool(self.jump >= threshold and self.jump >= 2 * max(self.trend, 0.0))

    def text(self) -> str:
        return f"{self.jump:+.3f} ± {self.jump_std:.3f} (trend before {self.trend:+.3f})"


def boundary_jump(runs: Sequence[list[dict[str, Any]]], key: str) -> Jump:
    """How ``key`` changes across the end of epoch 1 (see :class:`Jump`)."""
    jumps, trends = [], []
    for rows in runs:
        ep = np.array([r["epoch"] for r in rows], dtype=float)
        v = np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)
        prev, at, nxt = _around(ep, v, 1.0)
        jumps.append(nxt - at)
        trends.append(at - prev)
    j = np.array([x for x in jumps if not math.isnan(x)])
    t = np.array([x for x in trends if not math.isnan(x)])
    if len(j) == 0:
        return Jump(math.nan, math.nan, math.nan)
    return Jump(float(j.mean()), float(j.std(ddof=1)) if len(j) > 1 else 0.0,
                float(t.mean()) if len(t) else math.nan)
