"""The one-epoch verdict: best point, and the AUC drop right after each epoch boundary.

    >>> v = one_epoch_verdict([0.5, 1.0, 1.05, 1.1, 1.5, 2.0], [0.6, 0.70, 0.68, 0.69, 0.69, 0.69])
    >>> v.phenomenon, round(v.drop, 3), v.at_epoch
    (True, 0.02, 2)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

_EPS = 1e-9
_WINDOW_SLACK = 0.01  # evaluation points land on whole steps: 1.1004 counts as "10% into"


@dataclass
class Boundary:
    """What happened around the end of epoch ``epoch`` (the start of epoch ``epoch + 1``)."""

    epoch: int
    auc_at_boundary: float
    min_after: float  # lowest AUC within the window after the boundary
    drop: float  # auc_at_boundary - min_after (positive = the AUC fell)
    auc_at_window_end: float  # AUC at (about) boundary + window
    change_before: float  # AUC(boundary) - AUC(boundary - window): the trend going in


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
    min_drop: float = 0.005
    window: float = 0.1
    too_sparse: bool = False  # boundaries crossed, but no evaluation inside the window

    def line(self) -> str:
        """``one-epoch phenomenon: yes (drop 0.021 at epoch 2)`` or ``... no (...)``."""
        if not self.boundaries and self.too_sparse:
            return (f"one-epoch phenomenon: unknown (no evaluation within {self.window:g} epoch "
                    "after a boundary: evaluate more often, e.g. eval.per_epoch=20)")
        if not self.boundaries:
            return "one-epoch phenomenon: unknown (train at least 2 epochs to see a boundary)"
        if self.phenomenon:
            return (f"one-epoch phenomenon: yes (drop {self.drop:.3f} at epoch {self.at_epoch}; "
                    f"best AUC {self.best_auc:.4f} at epoch {self.best_epoch:.2f})")
        shown = round(self.drop, 3) + 0.0  # no "-0.000"
        return (f"one-epoch phenomenon: no (largest drop after a boundary {shown:+.3f} < "
                f"{self.min_drop}; best AUC {self.best_auc:.4f} at epoch {self.best_epoch:.2f})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _value_near(epochs: np.ndarray, aucs: np.ndarray, x: float) -> float:
    return float(aucs[int(np.argmin(np.abs(epochs - x)))])


def one_epoch_verdict(epochs: ArrayLike, aucs: ArrayLike, steps: ArrayLike | None = None,
                      min_drop: float = 0.005, window: float = 0.1) -> Verdict:
    """Judge a test-AUC curve sampled at fractional ``epochs``.

    For each integer boundary k that has evaluations after it, the drop is the AUC at the last
    evaluation at or before k minus the lowest AUC in (k, k + window] (plus 0.01 epoch of slack,
    as evaluation points fall on whole steps). The phenomenon is
    declared when some drop is at least ``min_drop``.
    """
    e = np.asarray(epochs, dtype=np.float64)
    a = np.asarray(aucs, dtype=np.float64)
    ok = ~np.isnan(a)
    e, a = e[ok], a[ok]
    st = np.arange(len(e)) if steps is None else np.asarray(steps)[ok]
    if len(a) == 0:
        raise ValueError("one_epoch_verdict: no evaluation points")
    bi = int(np.argmax(a))
    v = Verdict(bi, float(e[bi]), float(a[bi]), int(st[bi]), min_drop=min_drop, window=window)
    for k in range(1, int(np.floor(e.max() - _EPS)) + 1):
        before = np.flatnonzero(e <= k + _EPS)
        after = np.flatnonzero((e > k + _EPS) & (e <= k + window + _WINDOW_SLACK))
        if len(before) == 0 or len(after) == 0:
            v.too_sparse = v.too_sparse or (len(before) > 0 and bool((e > k + _EPS).any()))
            continue
        at = float(a[before[-1]])
        lo = float(a[after].min())
        b = Boundary(k, at, lo, at - lo, _value_near(e, a, k + window),
                     at - _value_near(e[before], a[before], k - window))
        v.boundaries.append(b)
    if v.boundaries:
        # headline: the first boundary with a qualifying drop (else the largest drop)
        hits = [b for b in v.boundaries if b.drop >= min_drop]
        head = hits[0] if hits else max(v.boundaries, key=lambda b: b.drop)
        v.drop, v.at_epoch, v.phenomenon = head.drop, head.epoch + 1, bool(hits)
    return v
