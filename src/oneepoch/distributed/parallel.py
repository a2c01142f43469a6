"""Data-parallel CTR training on replicated tables: the rank slice of each global batch, the
gradient synchronisation between backward and the update, and gathered predictions.

Batches. Every rank draws the same global permutation of the epoch and the same global
batches of ``batch_size`` rows; rank ``r`` of ``W`` trains the contiguous slice
``rows[r*n//W : (r+1)*n//W]`` of each global batch of ``n`` rows (:func:`rank_slice`). The
slices, in rank order, are the global batch: no row is seen twice in an epoch and none is
skipped; a rank whose slice is empty (a last batch shorter than ``W``) still joins the step.

Gradients. Each rank's loss is its rows' summed BCE divided by the *global* batch size, so the
sum of the ranks' gradients is the gradient of the global batch's mean loss, the number one
process computes. Per step, two collectives (none on one process):

* dense layers: one flat buffer holding every dense gradient, the loss, the float buffers
  (Dice's running statistics, weighted by the rank's share of the batch) and the rank's count
  of table rows, summed over the ranks -- what DistributedDataParallel does in buckets; one
  buffer keeps the uneven last batch exact (DDP divides by ``W`` whatever the slice sizes).
  On up to :data:`GATHER_SUM_MAX_WORLD` ranks the sum is an ``all_gather`` and a local sum
  in rank order (on gloo a small ``all_reduce`` costs two to three times as much: ~2 ms
  against ~0.8 ms on this 2-core machine); on more ranks, an ``all_reduce``;
* ID tables: one ``all_gather`` of each rank's (unique rows, summed row gradients) of every
  table, each table padded to the largest rank's count, then summed per row on every rank.
  Cost per step: ``W x max unique rows x (dim + 2) x 4`` bytes per table, independent of
  the table's size (a dense all-reduce of the table would move ``rows x dim x 4`` bytes).

The optimizer then steps once per global step on every rank with the same global (rows,
gradient) pairs, so whatever the row-wise optimizer does -- Adam, the remedies' per-row
rules, lazy or dense Adam semantics -- happens identically on every rank and as on one
process. Models with batch statistics (Dice) normalise with their rank's slice during the
forward pass, as DDP without SyncBatchNorm does; with other activations two ranks give one
rank's numbers up to float summation order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from oneepoch.data.batcher import Batcher
from oneepoch.distributed.env import DistContext
from oneepoch.training.hooks import Hook, State, changes_loss
from oneepoch.training.loop import OneBatchStep
from oneepoch.training.optim import Optimizer, _row_grads, coalesce_rows


def rank_bounds(n: int, world: int) -> np.ndarray:
    """Start offsets of the ``world`` contiguous slices of ``n`` rows (plus ``n``): sizes
    differ by at most one, larger slices first."""
    return (np.arange(world + 1, dtype=np.int64) * n) // world if world > 0 else np.zeros(1)


def rank_slice(rows: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rank ``rank``'s contiguous slice of one global batch (see the module doc)."""
    b = rank_bounds(len(rows), world)
    return rows[b[rank]:b[rank + 1]]


def gather_rows(ctx: DistContext, x: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``x`` (same trailing shape and dtype, any length), in rank order."""
    n = torch.tensor([x.shape[0]], dtype=torch.int64)
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(ctx.world_size)]
    with ctx.collective("all_gather of sizes"):
        dist.all_gather(counts, n)
    sizes = [int(c) for c in counts]
    top = max(sizes)
    pad = x.new_zeros((top, *x.shape[1:]))
    pad[:x.shape[0]] = x
    out = [torch.empty_like(pad) for _ in range(ctx.world_size)]
    with ctx.collective("all_gather"):
        dist.all_gather(out, pad)
    return [o[:s] for o, s in zip(out, sizes, strict=True)]


def gather_array(ctx: DistContext, a: np.ndarray) -> np.ndarray:
    """Every rank's 1-d array, concatenated in rank order."""
    return torch.cat(gather_rows(ctx, torch.from_numpy(np.ascontiguousarray(a)))).numpy()


# Up to this many ranks the dense sum is an all_gather and a local sum: on gloo a small
# all_reduce costs two to three times an all_gather of the same buffer (latency, not bytes).
GATHER_SUM_MAX_WORLD = 8


def sum_across(ctx: DistContext, buf: torch.Tensor, what: str) -> torch.Tensor:
    """``buf`` summed over the ranks (every rank gets the sum): an ``all_gather`` and a local
    sum in rank order on up to :data:`GATHER_SUM_MAX_WORLD` ranks, else an ``all_reduce``."""
    if ctx.world_size == 1:
        return buf
    if ctx.world_size <= GATHER_SUM_MAX_WORLD:
        out = [torch.empty_like(buf) for _ in range(ctx.world_size)]
        with ctx.collective(f"all_gather of {what}"):
            dist.all_gather(out, buf)
        total = out[0]
        for o in out[1:]:
            total += o
        return total
    with ctx.collective(f"all_reduce of {what}"):
        dist.all_reduce(buf)
    return buf


class GradientSync:
    """Sums the gradients of one step over the ranks (see the module doc)."""

    def __init__(self, ctx: DistContext, model: torch.nn.Module, opt: Optimizer) -> None:
        self.ctx, self.model, self.opt = ctx, model, opt
        self.dense = [p for p in opt.dense_params if p.requires_grad]
        self.buffers = [b for b in model.buffers() if b.is_floating_point()]
        self.bytes_last = 0

    def _dense_sum(self, head: torch.Tensor, n_tables: int) -> tuple[torch.Tensor, list[list[int]]]:
        """The ranks' ``head`` buffers summed (the last ``n_tables`` entries excepted: this
        rank's row count per table) and every rank's row counts ``[rank][table]``."""
        ctx, w = self.ctx, self.ctx.world_size
        k = head.numel() - n_tables
        if w <= GATHER_SUM_MAX_WORLD:
            out = [torch.empty_like(head) for _ in range(w)]
            with ctx.collective("all_gather of the dense gradients"):
                dist.all_gather(out, head)
            total = out[0][:k].clone()
            for o in out[1:]:  # rank order: the same sum on every rank
                total += o[:k]
            counts = [[int(c) for c in o[k:].round()] for o in out]
            self.bytes_last = head.numel() * 4 * w
            return total, counts
        slots = head.new_zeros(k + n_tables * w)  # counts in per-rank slots, then one all_reduce
        slots[:k] = head[:k]
        slots[k + ctx.rank * n_tables:k + (ctx.rank + 1) * n_tables] = head[k:]
        with ctx.collective("all_reduce of the dense gradients"):
            dist.all_reduce(slots)
        self.bytes_last = slots.numel() * 4
        cs = slots[k:].round().to(torch.int64).view(w, n_tables)
        return slots[:k], [[int(c) for c in row] for row in cs]

    def __call__(self, loss_sum: float, share: float) -> float:
        """Synchronise after this rank's backward; returns the global batch's mean loss.
        ``loss_sum``: this rank's loss (already divided by the global batch size);
        ``share``: this rank's fraction of the global batch's rows.

        Two collectives per step, whatever the number of tables: the dense gradients, the
        loss, the running statistics and this rank's count of table rows (an ``all_gather``
        summed locally on up to :data:`GATHER_SUM_MAX_WORLD` ranks, else an ``all_reduce``);
        then one ``all_gather`` of every table's (row, gradient) pairs, each table padded to
        its largest count."""
        ctx, w = self.ctx, self.ctx.world_size
        if w == 1:  # this rank's gradients are the global batch's
            self.bytes_last = 0
            return loss_sum
        tables = [o for o in self.opt.sparse.values() if o.param.requires_grad]
        packed = []
        for o in tables:
            got = _row_grads(o.param, o.module)
            o.param.grad = None
            if got is None:
                rows = torch.zeros(0, dtype=torch.int64)
                grads = torch.zeros(0, o.param.shape[1], dtype=torch.float32)
            else:
                rows, grads = got
            packed.append(torch.cat([rows.contiguous().view(torch.float32).view(-1, 2),
                                     grads.to(torch.float32)], 1))  # row ids as raw bits
        flat = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel())
                for p in self.dense]
        flat += [b.reshape(-1) * share for b in self.buffers]
        flat += [torch.tensor([loss_sum], dtype=torch.float32),
                 torch.tensor([pk.shape[0] for pk in packed], dtype=torch.float32)]
        buf, counts = self._dense_sum(torch.cat([t.to(torch.float32) for t in flat]),
                                      len(tables))
        a = 0
        for p in self.dense:
            k = p.numel()
            p.grad = buf[a:a + k].view_as(p).to(p.dtype)
            a += k
        with torch.no_grad():
            for b in self.buffers:
                k = b.numel()
                b.copy_(buf[a:a + k].view_as(b))
                a += k
        loss = float(buf[a])
        if not tables:
            return loss
        # ID tables: every rank's (rows, gradient) pairs of every table in one message
        tops = [max(counts[r][t] for r in range(w)) for t in range(len(tables))]
        widths = [pk.shape[1] for pk in packed]
        mine = torch.cat([torch.cat([pk, pk.new_zeros(top - pk.shape[0], pk.shape[1])]
                                    ).reshape(-1) for pk, top in zip(packed, tops, strict=True)])
        out = [torch.empty_like(mine) for _ in range(w)]
        with ctx.collective("all_gather of the table rows"):
            dist.all_gather(out, mine)
        self.bytes_last += mine.numel() * 4 * w
        at = 0
        for t, o in enumerate(tables):
            size = tops[t] * widths[t]
            parts = torch.cat([x[at:at + size].view(tops[t], widths[t])[:counts[r][t]]
                               for r, x in enumerate(out)])
            at += size
            if parts.shape[0] == 0:
                continue
            all_rows = parts[:, :2].contiguous().view(torch.int64).view(-1)
            r, g = coalesce_rows(all_rows, parts[:, 2:].contiguous().to(o.param.dtype))
            if o.module is not None and hasattr(o.module, "pending"):
                leaf = torch.empty_like(g).requires_grad_()
                leaf.grad = g
                o.module.pending = [(r, leaf)]
            else:
                o.param.grad = torch.sparse_coo_tensor(r.unsqueeze(0), g, o.param.shape,
                                                       check_invariants=False)
        return loss


class DataParallelStep(OneBatchStep):
    """The CTR step on this rank's slice of each global batch (a
    :class:`~oneepoch.training.loop.Step`): forward and backward on the slice, gradients
    summed over the ranks, then the optimizer's own update."""

    path = "distributed"

    def __init__(self, ctx: DistContext, model: torch.nn.Module, opt: Optimizer,
                 batcher: Batcher, hooks: Sequence[Hook], state: State) -> None:
        self.ctx, self.model, self.opt, self.batcher = ctx, model, opt, batcher
        self.sync = GradientSync(ctx, model, opt)
        self.reason = (f"data-parallel over {ctx.world_size} process(es) ({ctx.backend}): "
                       "gradients are summed across ranks between backward and the update")

    def one(self, rows: np.ndarray) -> float:
        n = len(rows)
        local = rank_slice(rows, self.ctx.rank, self.ctx.world_size)
        self.opt.zero_grad()
        loss_sum = 0.0
        if len(local):
            batch = self.batcher.get(local)
            logits = self.model(batch)
            loss = F.binary_cross_entropy_with_logits(logits, batch.label, reduction="sum") / n
            loss.backward()
            loss_sum = float(loss.detach())
        mean = self.sync(loss_sum, len(local) / max(n, 1))
        self.opt.step()
        return mean


def check_hooks(ctx: DistContext, hooks: Sequence[Hook]) -> None:
    """Refuse hooks the data-parallel step cannot run yet (loss terms of their own)."""
    if changes_loss(hooks):
        names = ", ".join(getattr(h, "applies", "") or type(h).__name__ for h in hooks
                          if type(h).on_loss is not Hook.on_loss)
        raise ValueError(f"{names}: adds a term to the training loss, which training across "
                         f"{ctx.world_size} processes does not support yet; run it on one "
                         "process")


def sharded_predict(ctx: DistContext, predict: Callable[..., np.ndarray]
                    ) -> Callable[..., np.ndarray]:
    """``predict(model, batcher, rows)`` where each rank predicts a contiguous slice of the
    rows and every rank gets all predictions, in row order: metrics then cover every row
    exactly once, whichever rank predicted it."""

    def run(model: torch.nn.Module, batcher: Batcher, rows: np.ndarray | None = None
            ) -> np.ndarray:
        rows = np.arange(len(batcher)) if rows is None else np.asarray(rows)
        mine = rank_slice(rows, ctx.rank, ctx.world_size)
        p = predict(model, batcher, mine) if len(mine) else np.zeros(0, np.float32)
        return gather_array(ctx, p.astype(np.float32, copy=False))

    return run


def writer_predict(ctx: DistContext, predict: Callable[..., np.ndarray]
                   ) -> Callable[..., np.ndarray]:
    """``predict(model, batcher, rows)`` on rank 0 only (sharded tables: only rank 0 holds the
    whole table, their mirror); every rank gets rank 0's predictions."""

    def run(model: torch.nn.Module, batcher: Batcher, rows: np.ndarray | None = None
            ) -> np.ndarray:
        p = predict(model, batcher, rows).astype(np.float32, copy=False) if ctx.rank == 0 \
            else np.zeros(0, np.float32)
        n = torch.tensor([len(p)], dtype=torch.int64)
        with ctx.collective("sending rank 0's predictions"):
            dist.broadcast(n, src=0)
            buf = torch.from_numpy(np.ascontiguousarray(p)) if ctx.rank == 0 else \
                torch.empty(int(n), dtype=torch.float32)
            dist.broadcast(buf, src=0)
        return buf.numpy()

    return run
