"""Embedding collapse probe: information abundance of each ID table at every evaluation.

Information abundance (Guo et al., "On the Embedding Collapse when Scaling up Recommendation
Models", 2023) of a table ``E`` (rows x dim) is the sum of its singular values over the largest
one, ``IA(E) = sum_i s_i / s_1``: 1 for a rank-1 (fully collapsed) table, ``dim`` when every
direction carries the same energy (an orthogonal table).

The singular values come exactly from the ``dim x dim`` Gram matrix ``G = E^T E`` (accumulated
in float64 over row chunks, so any number of rows costs O(rows * dim^2) time and O(chunk * dim)
extra memory; a 10^7 x 64 table takes a few seconds), ``s_i = sqrt(eig_i(G))``. Numerical error:
``eigvalsh`` returns each eigenvalue of ``G`` within about ``dim * eps * s_1^2`` (eps = 2.2e-16),
so each ``s_i`` is within ``sqrt(dim * eps) * s_1`` (about 1.2e-7 s_1 at dim 64), and ``IA``
within ``dim^1.5 * sqrt(eps)`` (1.2e-4 at dim 64, 3e-7 at dim 8) in the worst case where every
other singular value is tiny; singular values well above that are resolved to relative
precision ~eps. ``tests/test_collapse.py`` checks against ``numpy.linalg.svd``.

    >>> import numpy as np

from oneepoch.config import num
from oneepoch.training.hooks import Hook
    >>> round(information_abundance(np.outer(np.arange(1, 6), [1.0, 2.0, 3.0])), 6)
    1.0
    >>> round(information_abundance(np.eye(4)), 6)
    4.0

:class:`CollapseProbe` is a training hook (``make_probe("collapse")``) that adds ``ia_<vocab>``
to each evaluation row for each vocabulary of the model's embedding table (fields sharing a
vocabulary share rows, so they share one figure). The out-of-vocabulary row 0 of each vocabulary
is left out (it is trained only by unknown IDs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from oneepoch.config import num
from oneepoch.training.hooks import Hook

CHUNK_ROWS = 1 << 18


def gram(table: Any, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """``E^T E`` in float64, accumulated over row chunks (torch tensor or array-like)."""
    try:
        import torch

        if isinstance(table, torch.Tensor):
            t = table.detach()
            g = torch.zeros(t.shape[1], t.shape[1], dtype=torch.float64, device=t.device)
            for a in range(0, t.shape[0], chunk_rows):
                c = t[a:a + chunk_rows].to(torch.float64)
                g += c.T @ c
            return g.cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    e = np.asarray(table)
    if e.ndim != 2:
        raise ValueError(f"information_abundance: expected a 2-D table, got shape {e.shape}")
    g = np.zeros((e.shape[1], e.shape[1]), dtype=np.float64)
    for a in range(0, e.shape[0], chunk_rows):
        c = np.asarray(e[a:a + chunk_rows], dtype=np.float64)
        g += c.T @ c
    return g


def singular_values(table: Any, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """Singular values of ``table``, largest first, from its Gram matrix (see module doc)."""
    lam = np.linalg.eigvalsh(gram(table, chunk_rows))[::-1]
    return np.sqrt(np.clip(lam, 0.0, None))


def information_abundance(table: Any, chunk_rows: int = CHUNK_ROWS) -> float:
    """``sum(s) / max(s)`` of the table's singular values; NaN for an all-zero or empty table."""
    if len(table.shape) != 2:
        raise ValueError(f"information_abundance: expected a 2-D table, got shape "
                         f"{tuple(table.shape)}")
    s = singular_values(table, chunk_rows)
    if len(s) == 0 or s[0] <= 0:
        return float("nan")
    return float(s.sum() / s[0])


def table_slices(model: Any) -> dict[str, tuple[int, int]]:
    """Row range ``[start, stop)`` of each vocabulary's IDs in the model's one embedding table
    (``FieldEmbedding``: ``vocab_offsets`` / ``vocab_sizes``), the OOV row 0 left out."""
    emb = getattr(model, "embedding", model)
    offs, sizes = emb.vocab_offsets, emb.vocab_sizes
    return {v: (offs[v] + 1, offs[v] + sizes[v]) for v in offs}


@dataclass
class CollapseSettings:
    """The settings of :class:`CollapseProbe` (probe spec ``collapse:every=2``)."""

    every: int = num(1, ge=1)
    min_rows: int = num(2, ge=2)


class CollapseProbe(Hook):
    """Adds ``ia_<vocab>`` (information abundance of that vocabulary's rows) to each evaluation
    row, for every vocabulary with at least ``min_rows`` IDs.

    Args:
        every: measure at every ``every``-th evaluation (others get NaN); 1 = all.
        min_rows: skip vocabularies with fewer IDs (their tables are trivially full-rank).
    """

    Settings = CollapseSettings  # what a probe spec may set (checked by ``make_probe``)

    def __init__(self, every: int = 1, min_rows: int = 2) -> None:
        if every < 1:
            raise ValueError(f"collapse probe: every must be >= 1, got {every}")
        self.every = int(every)
        self.min_rows = int(min_rows)
        self._n = 0

    def on_train_start(self, s: Any) -> None:
        self._n = 0

    def measure(self, model: Any) -> dict[str, float]:
        """``{"ia_<vocab>": IA}`` for the model's embedding table now."""
        emb = getattr(model, "embedding", model)
        w = emb.weight
        return {f"ia_{v}": information_abundance(w[a:b]) for v, (a, b) in
                table_slices(model).items() if b - a >= self.min_rows}

    def on_eval(self, s: Any, row: dict[str, Any]) -> None:
        due = self._n % self.every == 0
        self._n += 1
        if due:
            row.update(self.measure(s.model))
            return
        for v, (a, b) in table_slices(s.model).items():
            if b - a >= self.min_rows:
                row[f"ia_{v}"] = float("nan")
