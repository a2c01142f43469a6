"""Stage-1 (two-tower) pre-training data-parallel: each rank scores its slice of the global
batch's users against the *whole* global batch's positives plus the shared uniform negatives.

In-batch negatives across ranks. Each rank holds the full user and item tables (replicated),
and every rank knows the global batch (the same permutation everywhere), so the item vectors
of the other ranks' positives -- what an all-gather of the batch's item vectors would bring --
are read from the local replica: the same numbers with no communication. Their gradients
(from this rank's users) join this rank's row gradients, which
:class:`~oneepoch.distributed.parallel.GradientSync` sums over the ranks, so each item row gets
the gradient of the global batch's loss, as on one process.

Candidates on rank r are ordered ``[its own positives, the other positives, the N uniform
negatives]`` (so its row i's positive is column i, as :func:`contrastive_loss` expects); the
softmax does not depend on the order. The logQ correction uses the *global* batch size. The
uniform negatives (and BCE's per-row negatives, drawn for the whole global batch, then
sliced) come from the same seeded generator on every rank, so they equal one process's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from oneepoch.distributed.env import DistContext
from oneepoch.distributed.parallel import GradientSync, rank_bounds
from oneepoch.pretrain.losses import bce_loss, contrastive_loss, logq_correction


def local_loss(fn: Any, u_all: torch.Tensor, i_all: torch.Tensor, a: int, b: int,
               gen: torch.Generator) -> torch.Tensor | None:
    """Mean loss of the global batch's rows ``a:b`` against the global batch's candidates
    (``fn`` a :class:`~oneepoch.pretrain.train.Stage1Step`); ``None`` for an empty slice (the
    negatives are drawn all the same, to keep the generator in step)."""
    m, lc, n = fn.model, fn.cfg.loss, len(i_all)
    if lc.type == "bce":
        neg = fn.negatives((n, lc.bce_negatives), gen)[a:b]
        if b == a:
            return None
        scale = 1.0 / m.tau() if m.normalize else 1.0
        return bce_loss(m.users(u_all[a:b]), m.items(i_all[a:b]), m.items(neg), i_all[a:b],
                        neg, scale)
    neg = fn.negatives((lc.n_uniform,), gen)
    if b == a:
        return None
    mine = i_all[a:b]
    others = torch.cat([i_all[:a], i_all[b:]]) if lc.in_batch else mine[:0]
    cand = torch.cat([mine, others, neg])
    logq = None
    if lc.logq:
        logq = logq_correction(fn.q[cand], n if lc.in_batch else 0, lc.n_uniform, fn.n_items)
    return contrastive_loss(m.users(u_all[a:b]), m.items(cand), m.tau(), mine, cand, logq,
                            lc.in_batch, lc.chunk)


class DataParallelStage1:
    """The loop's step for stage 1 on several ranks (wraps one process's
    :class:`~oneepoch.pretrain.train.Stage1Stepper`: its generator, clock and state)."""

    path = "distributed"

    def __init__(self, ctx: DistContext, stepper: Any) -> None:
        self.ctx, self.inner = ctx, stepper
        self.fn, self.opt, self.model = stepper.fn, stepper.opt, stepper.model
        self.sync = GradientSync(ctx, self.model, self.opt)
        self.reason = (f"data-parallel over {ctx.world_size} process(es) ({ctx.backend}): "
                       "in-batch negatives from the global batch, row gradients summed "
                       "across ranks")

    def run(self, batches: Iterator[np.ndarray], limit: int) -> list[float]:
        rows = next(batches, None)
        if rows is None:
            return []
        st = self.inner
        ts = time.perf_counter()
        n = len(rows)
        bnd = rank_bounds(n, self.ctx.world_size)
        a, b = int(bnd[self.ctx.rank]), int(bnd[self.ctx.rank + 1])
        idx = torch.from_numpy(rows)
        self.opt.zero_grad()
        loss = local_loss(self.fn, st.tu[idx], st.ti[idx], a, b, st.gen)
        part = 0.0
        if loss is not None:
            loss = loss * ((b - a) / n)  # this rank's share of the global batch's mean
            loss.backward()
            part = float(loss.detach())
        mean = self.sync(part, (b - a) / n)
        self.opt.step()
        self.model.clamp_temperature()
        st.train_secs += time.perf_counter() - ts
        st.pairs_done += n
        return [mean]

    @property
    def pairs_per_s(self) -> float | None:
        return self.inner.pairs_per_s

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)
