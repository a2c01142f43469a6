"""A-distance probe of paper A (Sec. 5, Fig. 14-15): how separable clicked and unclicked
samples are in the embedding space EMB(x).

A logistic-regression probe ``h`` is fit to tell ``y = 1`` from ``y = 0`` on one half of a
fixed, class-balanced sample of EMB(x); its error ``err`` on the other half gives

    A = 2 (1 - 2 err)

so ``A ~ 2`` for perfectly separable classes and ``A ~ 0`` when the probe does no better than
chance (classes are balanced, so chance is ``err = 0.5``). All probes of one evaluation (the
concatenated embedding and each field, on the train and the test sample) are fit together as
one batch of Newton solves.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(2000, 4, generator=g)
    >>> y = (torch.arange(2000) % 2).float()
    >>> round(float(a_distance(x + 5 * y[:, None], y)), 1), abs(float(a_distance(x, y))) < 0.2
    (2.0, True)

As a training :class:`~oneepoch.training.trainer.Hook`, :class:`ADistanceProbe` adds
``adist_{train,test}`` (all fields concatenated) and ``adist_{train,test}_<field>`` to the
metrics rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from oneepoch.config import num
from oneepoch.data.batcher import Batcher
from oneepoch.data.dataset import EncodedSplit
from oneepoch.training.hooks import Hook, State


def fit_probe_errors(x: torch.Tensor, y: torch.Tensor, fit: torch.Tensor, held: torch.Tensor,
                     l2: float = 1e-3, iters: int = 25) -> torch.Tensor:
    """Held-out errors of ``P`` independent logistic-regression probes, fit jointly.

    Each probe is fit by damped Newton steps (all probes at once: batched Hessians and solves,
    a step halved for the probes whose loss it would raise), on features standardised with
    the fit half's statistics.

    Args:
        x: features ``[P, N, D]`` (pad a probe's unused feature columns with zeros).
        y: labels in {0, 1}: ``[N]`` shared by the probes, or ``[P, N]``.
        fit: indices of the rows the probes are fit on.
        held: indices of the rows the error is measured on.
        l2: ridge penalty on the (standardised) weights; keeps separable problems bounded.
        iters: Newton iterations (the loss is strictly convex; 25 reach machine precision on
            well-posed probes).

    Returns:
        ``[P]`` error rates on ``held`` (threshold 0.5).
    """
    x = x.detach().double()
    xf, xh = x[:, fit], x[:, held]
    mu = xf.mean(1, keepdim=True)
    sd = xf.std(1, keepdim=True)
    sd = torch.where(sd > 1e-12, sd, torch.ones_like(sd))  # constant (or padding) columns
    one = lambda t: torch.cat([t, torch.ones_like(t[..., :1])], -1)  # noqa: E731 - bias column
    xf, xh = one((xf - mu) / sd), one((xh - mu) / sd)
    y = y.double().expand(x.shape[0], x.shape[1])
    yf, yh = y[:, fit], y[:, held]
    p_, n, d = xf.shape
    reg = torch.full((d,), l2, dtype=torch.float64)
    reg[-1] = 0.0  # the bias is not penalised
    w = torch.zeros(p_, d, dtype=torch.float64)

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        z = torch.bmm(xf, w.unsqueeze(-1)).squeeze(-1)
        ce = torch.nn.functional.binary_cross_entropy_with_logits(z, yf, reduction="none")
        return ce.mean(1) + 0.5 * (reg * w * w).sum(1)

    loss = loss_of(w)
    eye = torch.diag(reg + 1e-10)
    for _ in range(iters):
        pr = torch.sigmoid(torch.bmm(xf, w.unsqueeze(-1)).squeeze(-1))
        grad = torch.bmm((pr - yf).unsqueeze(1), xf).squeeze(1) / n + reg * w
        hess = torch.bmm((xf * (pr * (1 - pr)).unsqueeze(-1)).transpose(1, 2), xf) / n + eye
        step = torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1)
        t = torch.ones(p_, 1, dtype=torch.float64)
        for _ in range(20):  # step halving, per probe
            cand = w - t * step
            new = loss_of(cand)
            bad = new > loss + 1e-12
            if not bad.any():
                break
            t = torch.where(bad[:, None], t / 2, t)
        keep = ~(new > loss + 1e-12)
        w = torch.where(keep[:, None], cand, w)
        loss = torch.where(keep, new, loss)
    z = torch.einsum("pnd,pd->pn", xh, w)
    return ((z > 0).double() != yh).double().mean(1).float()


def a_distance(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A-distance of features ``x`` (``[N, D]`` or ``[P, N, D]``) between ``y=1`` and ``y=0``
    (labels ``[N]`` or ``[P, N]``), probe fit on a random half and scored on the other half."""
    squeeze = x.dim() == 2
    xs = x[None] if squeeze else x
    perm = torch.randperm(xs.shape[1], generator=torch.Generator().manual_seed(seed))
    half = xs.shape[1] // 2
    err = fit_probe_errors(xs, y, perm[:half], perm[half:])
    a = 2.0 * (1.0 - 2.0 * err)
    return a[0] if squeeze else a


def balanced_sample(label: np.ndarray, n: int, seed: int | list[int]) -> np.ndarray:
    """Row indices: ``n // 2`` positives and ``n // 2`` negatives (fewer if a class is short),
    drawn without replacement, sorted."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(label > 0.5), np.flatnonzero(label <= 0.5)
    k = min(n // 2, len(pos), len(neg))
    if k < 2:
        raise ValueError(f"A-distance probe: need at least 2 samples of each class, got "
                         f"{len(pos)} clicked / {len(neg)} unclicked")
    return np.sort(np.concatenate([rng.choice(pos, k, replace=False),
                                   rng.choice(neg, k, replace=False)]))


@dataclass
class ADistanceSettings:
    """The settings of :class:`ADistanceProbe` (probe spec ``adistance:rows=4000,every=2``)."""

    rows: int = num(4000, ge=8)
    every: int = num(1, ge=1)
    per_field: bool = True
    seed: int = num(0, ge=0)


class ADistanceProbe(Hook):
    """Track the A-distance of EMB(x) on fixed train and test samples at evaluation points.

    Args:
        rows: size of each (class-balanced) sample; half fits the probe, half scores it.
        every: probe at every ``every``-th evaluation (the first evaluation is always probed).
        per_field: also probe each field's pooled embedding on its own.
        seed: seed of the samples and of the fit/score split.

    Example:
        >>> from oneepoch.training.trainer import train       # doctest: +SKIP
        >>> res = train(cfg, hooks=[ADistanceProbe(rows=4000, every=2)])   # doctest: +SKIP
        >>> res.metrics[-1]["adist_train"], res.metrics[-1]["adist_train_item_ID"]  # doctest: +SKIP
    """

    Settings = ADistanceSettings  # what a probe spec may set (checked by ``make_probe``)

    def __init__(self, rows: int = 4000, every: int = 1, per_field: bool = True,
                 seed: int = 0) -> None:
        if rows < 8:
            raise ValueError(f"A-distance probe: rows must be >= 8, got {rows}")
        if every < 1:
            raise ValueError(f"A-distance probe: every must be >= 1, got {every}")
        self.rows, self.every, self.per_field, self.seed = rows, every, per_field, seed
        self._n_evals = 0
        self._samples: dict[str, tuple[Batcher, np.ndarray, torch.Tensor]] = {}

    def on_train_start(self, s: State) -> None:
        cfg = s.cfg
        self._n_evals = 0
        for i, name in enumerate(("train", "test")):
            split: EncodedSplit = s.data.splits[getattr(cfg.data, f"{name}_split")]
            rows = balanced_sample(np.asarray(split.label), self.rows, [self.seed, i, 7])
            self._samples[name] = (Batcher(split, cfg.eval.batch_size, cfg.device), rows,
                                   torch.from_numpy(np.asarray(split.label[rows],
                                                               dtype=np.float32)))

    @torch.inference_mode()
    def _embed(self, s: State, batcher: Batcher, rows: np.ndarray) -> torch.Tensor:
        model = s.model
        was = model.training
        model.eval()
        bs = batcher.batch_size
        parts = [model.embed(batcher.get(rows[a:a + bs])).float().cpu()  # type: ignore[operator]
                 for a in range(0, len(rows), bs)]
        model.train(was)
        return torch.cat(parts)  # [N, F, d]

    def measure(self, s: State) -> dict[str, float]:
        """A-distances now: ``{"adist_train": ..., "adist_test_item_ID": ...}``."""
        embs, labels = {}, {}
        for split, (batcher, rows, y) in self._samples.items():
            embs[split], labels[split] = self._embed(s, batcher, rows), y
        out: dict[str, float] = {}
        for split, e in embs.items():  # the two samples may differ in size: fit each apart
            n, f, d = e.shape
            y = labels[split]
            out[f"adist_{split}"] = float(a_distance(e.reshape(n, f * d), y, seed=self.seed))
            if self.per_field:
                a = a_distance(e.transpose(0, 1), y, seed=self.seed)  # [F] probes of dim d
                out.update({f"adist_{split}_{fld}": float(v)
                            for fld, v in zip(s.data.fields, a.tolist(), strict=True)})
        return out

    def on_eval(self, s: State, row: dict[str, Any]) -> None:
        if self._n_evals % self.every == 0:
            row.update(self.measure(s))
        self._n_evals += 1
