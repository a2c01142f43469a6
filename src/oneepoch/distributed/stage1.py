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
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from oneepoch.distributed.env import DistContext
from oneepoch.distributed.parallel import GradientSync, rank_bounds, sum_across
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


def check_sharded_stage1(cfg: Any) -> None:
    """Refuse, before anything is written, what stage 1 on sharded tables cannot run: an
    optimizer FBGEMM does not fuse (Adam), a loss other than in-batch contrastive, keeping the
    best point (``select.metric``)."""
    from oneepoch.distributed.sharded import check_fused_optim

    check_fused_optim(cfg.optim.name)
    if cfg.loss.type != "contrastive" or not cfg.loss.in_batch:
        raise ValueError("loss.type / loss.in_batch: stage 1 on sharded tables supports "
                         "loss.type=contrastive with loss.in_batch=true; drop --shard-tables "
                         "(replicated tables run the others)")
    if cfg.select.metric:
        raise ValueError("select.metric: not supported with --shard-tables yet (the best "
                         "point's tables would have to be kept sharded); set select.metric='' "
                         "or train with replicated tables")


class _WrapsStage1:
    """What a distributed stage-1 step keeps of the one-process stepper it wraps
    (``self.inner``): its clock (pairs/s) and its state (generator, counters)."""

    inner: Any

    @property
    def pairs_per_s(self) -> float | None:
        return self.inner.pairs_per_s

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


class DataParallelStage1(_WrapsStage1):
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


class ShardedStage1(_WrapsStage1):
    """Stage 1 with the user and item tables sharded by TorchRec (:class:`~oneepoch.distributed.
    sharded.ShardedTables`), the optimizer fused into FBGEMM's backward (SGD / Adagrad).

    Each rank looks up its slice of the batch's users and positives and its slice of the
    uniform negatives (TorchRec's all-to-all fetches them from the owning shards), then an
    autograd all-gather of the item vectors gives every rank the global batch's candidates
    (in-batch negatives across ranks; the gradients flow back to the owning shards). logQ uses
    the global batch size. Contrastive loss with in-batch negatives only.

    Whole tables. The model's tables (the one-process initialisation, or a one-process
    checkpoint's tables and Adagrad accumulators) are pushed into the shards at the first step;
    then only rank 0 keeps a whole copy, a mirror of the shards refreshed by :meth:`refresh`
    (a gather to rank 0 before evaluation, checkpoints and the export; the loop calls it);
    the other ranks' model tables and every rank's one-process optimizer state of
    them shrink to 0 rows. So rank 0 evaluates (:meth:`on_writer`: every rank gets its
    metrics) and writes the export.

    Checkpoints (the loop calls :meth:`save_checkpoint` and :meth:`load_tables`): every rank
    writes its shards of the tables and of FBGEMM's optimizer state with
    ``torch.distributed.checkpoint`` into ``checkpoints/.epoch-NNN.tables.tmp`` of the run
    folder (``root``, shared by the ranks; :func:`~oneepoch.distributed.sharded.write_checkpoint`,
    which ``train --shard-tables`` shares); after a barrier rank 0 writes the rest of the
    checkpoint and moves that folder into it as ``tables.dcp/``, atomically. At resume each rank
    reads its shards (DCP reshards from any number of processes and any sharding).
    """

    path = "distributed-sharded"
    NAMES = {"user": "user_weight", "item": "item_weight"}  # table -> the model's parameter

    def __init__(self, ctx: DistContext, stepper: Any, sharding: str = "auto") -> None:
        from oneepoch.distributed.sharded import ShardedTables

        self.ctx, self.inner = ctx, stepper
        self.fn, self.opt, self.model = stepper.fn, stepper.opt, stepper.model
        lc, oc = self.fn.cfg.loss, self.opt.cfg
        if lc.type != "contrastive" or not lc.in_batch:
            raise ValueError("sharded tables: stage 1 supports loss.type=contrastive with "
                             "loss.in_batch=true")
        m = self.model
        eps = 1e-10 if oc.name == "adagrad" else oc.eps  # oneepoch's Adagrad rule (as torch's)
        self.tables = ShardedTables(ctx, [("user", *m.user_weight.shape),
                                          ("item", *m.item_weight.shape)],
                                    oc.name, oc.lr * oc.emb_lr_scale, sharding, eps)
        self.dense = [p for p in self.opt.dense_params if p.requires_grad]
        self.pushed = False
        self.steps, self.refreshed = 0, -1  # steps run; self.steps at the last refresh
        self.root: Path | None = None  # the run folder, shared by the ranks (checkpoints)
        self.reason = (f"data-parallel over {ctx.world_size} process(es) with the ID tables "
                       f"sharded by TorchRec ({sharding}); optimizer {oc.name} fused in FBGEMM")

    @torch.no_grad()
    def refresh(self) -> None:
        """Refresh rank 0's whole tables from the shards (a collective: every rank calls it);
        nothing to do when no step ran since the last refresh (e.g. the checkpoint after an
        epoch end's evaluation)."""
        if not self.pushed or self.refreshed == self.steps:
            return
        self.refreshed = self.steps
        for name, w in (("user", self.model.user_weight), ("item", self.model.item_weight)):
            full = self.tables.gather_full(name)
            if self.ctx.rank == 0:
                w.copy_(full)

    def on_writer(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """``fn`` (e.g. the evaluation, which reads the whole tables) run on rank 0 only; every
        rank returns its result."""
        def run() -> Any:
            msg = [fn() if self.ctx.rank == 0 else None]
            with self.ctx.collective("sending rank 0's evaluation"):
                dist.broadcast_object_list(msg, src=0)
            return msg[0]
        return run

    def _drop_copies(self) -> None:
        from oneepoch.distributed.sharded import drop_copies

        drop_copies(self.ctx, self.opt, {p: getattr(self.model, p) for p in self.NAMES.values()})

    def _current(self) -> dict[str, Any]:
        """The model's and the one-process optimizer's state (the mirror's side)."""
        return {"model": self.model.state_dict(), "optim": self.opt.state_dict()}

    def _push(self) -> None:
        """The model's tables (fresh or resumed) and the one-process optimizer's Adagrad
        accumulators (zero, or a one-process checkpoint's) into the shards."""
        cur = self._current()
        whole = {f"model/{p}": cur["model"][p] for p in self.NAMES.values()}
        whole.update({f"optim/sparse/{p}/{k}": v for p in self.NAMES.values()
                      for k, v in cur["optim"]["sparse"][p].items()
                      if isinstance(v, torch.Tensor)})
        self.tables.load_whole(whole, self.NAMES)
        self.pushed = True
        self._drop_copies()

    def save_checkpoint(self, path: Path, state: dict[str, Any]) -> None:
        """Write the loop's checkpoint ``path`` (see the class doc): the tables and their
        optimizer state by every rank with DCP, the rest (``state`` without them) by rank 0."""
        from oneepoch.distributed.sharded import write_checkpoint

        if not self.pushed:
            self._push()
        write_checkpoint(self.ctx, self.root, Path(path), state,
                         self.tables.checkpoint_state(self.NAMES))

    def load_tables(self, path: str | Path) -> dict[str, Any]:
        """Read this rank's shards of a checkpoint's ``tables.dcp/`` (written on any number of
        processes) and refresh rank 0's mirror; returns the entries it holds as the model's and the
        one-process optimizer's current values (for the loop's restore)."""
        from oneepoch.training.checkpoint import dcp_shapes

        self.tables.load(path, self.NAMES)
        self.pushed = True
        self.refresh()
        self._drop_copies()
        out, cur = {}, self._current()
        for key in dcp_shapes(path):
            node: Any = cur
            for part in key.split("/"):
                node = node[part]
            out[key] = node
        return out

    def run(self, batches: Iterator[np.ndarray], limit: int) -> list[float]:
        from torch.distributed.nn.functional import all_gather

        rows = next(batches, None)
        if rows is None:
            return []
        if not self.pushed:
            self._push()
        self.steps += 1
        st, fn, m, w = self.inner, self.fn, self.model, self.ctx.world_size
        lc = fn.cfg.loss
        ts = time.perf_counter()
        n = len(rows)
        bnd = rank_bounds(n, w)
        a, b = int(bnd[self.ctx.rank]), int(bnd[self.ctx.rank + 1])
        idx = torch.from_numpy(rows)
        u_all, i_all = st.tu[idx], st.ti[idx]
        neg = fn.negatives((lc.n_uniform,), st.gen)
        nb = rank_bounds(len(neg), w)
        na, nz = int(nb[self.ctx.rank]), int(nb[self.ctx.rank + 1])
        vec = self.tables.lookup({"user": u_all[a:b], "item": torch.cat([i_all[a:b],
                                                                         neg[na:nz]])})
        dim = vec["item"].shape[1]
        top, ntop = int(np.diff(bnd).max()), int(np.diff(nb).max())
        mine, my_neg = vec["item"][:b - a], vec["item"][b - a:]
        pad = torch.cat([mine, mine.new_zeros(top - (b - a), dim),
                         my_neg, my_neg.new_zeros(ntop - (nz - na), dim)])
        with self.ctx.collective("all_gather of the batch's item vectors"), \
                warnings.catch_warnings():  # deprecated for a private API; still autograd's
            warnings.simplefilter("ignore", FutureWarning)
            parts = all_gather(pad)
        pos = [p[:int(bnd[r + 1] - bnd[r])] for r, p in enumerate(parts)]
        negs = [p[top:top + int(nb[r + 1] - nb[r])] for r, p in enumerate(parts)]
        others = torch.cat([*pos[:self.ctx.rank], *pos[self.ctx.rank + 1:]])
        cand_v = torch.cat([pos[self.ctx.rank], others, *negs])
        cand = torch.cat([i_all[a:b], i_all[:a], i_all[b:], neg])
        u = vec["user"]
        if m.normalize:
            u, cand_v = F.normalize(u, dim=-1), F.normalize(cand_v, dim=-1)
        logq = logq_correction(fn.q[cand], n, lc.n_uniform, fn.n_items) if lc.logq else None
        for p in self.dense:
            p.grad = None
        loss = contrastive_loss(u, cand_v, m.tau(), i_all[a:b], cand, logq, True, lc.chunk)
        part = loss * ((b - a) / n)
        (part * self.tables.grad_scale).backward()  # the table update happens here
        buf = torch.cat([*(p.grad.reshape(-1) / self.tables.grad_scale
                           if p.grad is not None else p.new_zeros(p.numel())
                           for p in self.dense), part.detach().reshape(1)])
        buf = sum_across(self.ctx, buf, "the dense gradients")
        k = 0
        for p in self.dense:
            p.grad = buf[k:k + p.numel()].view_as(p)
            k += p.numel()
        if self.opt.dense is not None:
            self.opt.dense.step()
        m.clamp_temperature()
        st.train_secs += time.perf_counter() - ts
        st.pairs_done += n
        return [float(buf[-1])]
