"""Vectorised ranking and calibration metrics: AUC, GAUC, logloss.

    >>> round(auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]), 4)
    0.75
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def _tie_groups(sorted_keys_change: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    starts = np.flatnonzero(sorted_keys_change)
    ends = np.append(starts[1:], len(sorted_keys_change))
    return starts, ends


def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted as half). NaN if one class only.

    Sorts the positives' and the negatives' scores separately and counts, for each positive,
    the negatives below and equal to it with two binary searches: O(n log n), no argsort.
    """
    y = np.asarray(labels).astype(bool, copy=False).ravel()
    s = np.asarray(scores).ravel()
    pos, neg = np.sort(s[y]), np.sort(s[~y])
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    below = np.searchsorted(neg, pos, "left")
    below_or_tied = np.searchsorted(neg, pos, "right")
    wins = float(below.sum()) + 0.5 * float((below_or_tied - below).sum())
    return wins / (len(pos) * len(neg))


def gauc(labels: ArrayLike, scores: ArrayLike, groups: ArrayLike) -> float:
    """Group AUC: per-user AUC weighted by the user's number of samples.

    Users whose samples are all clicks or all non-clicks are left out (their AUC is undefined).
    NaN when no user has both.
    """
    y = np.asarray(labels).astype(np.int64, copy=False).ravel()
    s = np.asarray(scores).ravel()
    g = np.asarray(groups).ravel()
    order = np.lexsort((s, g))
    y, s, g = y[order], s[order], g[order]
    n = len(y)
    user_change = np.empty(n, dtype=bool)
    user_change[0] = True
    np.not_equal(g[1:], g[:-1], out=user_change[1:])
    tie_change = user_change.copy()
    tie_change[1:] |= s[1:] != s[:-1]
    ustarts, uends = _tie_groups(user_change)
    tstarts, tends = _tie_groups(tie_change)
    user_of_tie = np.cumsum(user_change)[tstarts] - 1
    local_start = tstarts - ustarts[user_of_tie]
    local_end = tends - ustarts[user_of_tie]
    avg_rank = (local_start + local_end + 1) / 2.0
    pos_in_tie = np.add.reduceat(y, tstarts)
    rank_sum = np.bincount(user_of_tie, weights=pos_in_tie * avg_rank, minlength=len(ustarts))
    n_pos = np.add.reduceat(y, ustarts).astype(np.float64)
    n_all = (uends - ustarts).astype(np.float64)
    n_neg = n_all - n_pos
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return float("nan")
    user_auc = (rank_sum[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0) / (n_pos[ok] * n_neg[ok])
    return float(np.dot(user_auc, n_all[ok]) / n_all[ok].sum())


def logloss(labels: ArrayLike, probs: ArrayLike, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities (clipped to [eps, 1-eps])."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def bucket_auc(labels: ArrayLike, scores: ArrayLike, buckets: ArrayLike,
               names: list[str]) -> dict[str, tuple[float, int]]:
    """AUC and row count of each bucket: ``{names[i]: (auc of rows with bucket == i, rows)}``.

    One :func:`auc` per bucket on that bucket's rows (a handful of buckets: the rows are sorted
    once in total, split across buckets). NaN when a bucket has one class only or no rows.

        >>> bucket_auc([0, 1, 0, 1], [0.1, 0.9, 0.8, 0.2], [0, 0, 1, 1], ["a", "b"])
        {'a': (1.0, 2), 'b': (0.0, 2)}
    """
    y = np.asarray(labels).ravel()
    s = np.asarray(scores).ravel()
    b = np.asarray(buckets).ravel()
    if not (len(y) == len(s) == len(b)):
        raise ValueError(f"bucket_auc: labels, scores and buckets differ in length "
                         f"({len(y)}, {len(s)}, {len(b)})")
    order = np.argsort(b, kind="stable")
    sizes = np.bincount(b, minlength=len(names)) if len(b) else np.zeros(len(names), np.int64)
    if len(sizes) > len(names):
        raise ValueError(f"bucket_auc: bucket index {len(sizes) - 1} but only {len(names)} names")
    ends = np.cumsum(sizes)
    out = {}
    for i, name in enumerate(names):
        rows = order[ends[i] - sizes[i]:ends[i]]
        n = int(sizes[i])
        out[name] = (auc(y[rows], s[rows]) if n else float("nan"), n)
    return out


def bucket_metrics(labels: ArrayLike, scores: ArrayLike, buckets: ArrayLike, names: list[str],
                   prefix: str = "test") -> dict[str, float]:
    """Per-bucket AUC and rows as metrics-row keys: ``<prefix>_auc_<name>``,
    ``<prefix>_n_<name>`` (see :func:`oneepoch.data.risk.frequency_buckets` for buckets).

        >>> bucket_metrics([0, 1, 0, 1], [0.1, 0.9, 0.8, 0.2], [0, 0, 1, 1], ["tail", "head"])
        {'test_auc_tail': 1.0, 'test_n_tail': 2, 'test_auc_head': 0.0, 'test_n_head': 2}
    """
    out: dict[str, float] = {}
    for name, (a, n) in bucket_auc(labels, scores, buckets, names).items():
        out[f"{prefix}_auc_{name}"] = a
        out[f"{prefix}_n_{name}"] = n
    return out


def bucket_names(n_bounds: int) -> list[str]:
    """``unseen``, ``tail``, ``torso`` (or ``torso1``..), ``head`` for ``n_bounds`` bounds."""
    if n_bounds < 1:
        raise ValueError("bucket bounds: need at least one bound")
    mid = n_bounds - 1
    torso = ["torso"] if mid == 1 else [f"torso{i + 1}" for i in range(mid)]
    return ["unseen", "tail", *torso, "head"]
