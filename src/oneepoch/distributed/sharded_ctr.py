"""CTR training with the model's ID tables sharded by TorchRec (``train --shard-tables``).

Tables. The model's :class:`~oneepoch.models.embedding.FieldEmbedding` holds every vocabulary
in one table at its own row range; here each vocabulary (used by some field) becomes one
TorchRec table of that range's rows, whose features are the fields using it (``item_ID`` and
``his_item_ID`` share the item table). Bags are mean-pooled, as ``FieldEmbedding`` pools: a
sequence field's bag is its true-length IDs (an empty one gives zeros), a single-ID field's bag
one ID (its vector). TorchRec's planner places the tables (table-wise: whole tables on ranks;
column-wise: column slices on ranks).

Step (:class:`ShardedCTRStep`, built by ``DataParallelRun.build_step``). Rank ``r`` takes its
:func:`~oneepoch.distributed.parallel.rank_slice` of the global batch of ``n`` rows, looks its
bags up through the sharded tables (TorchRec's all-to-all brings the pooled vectors from the
shards that own them; every rank looks up ``ceil(n / W)`` bags per field, padded with empty
ones, so a rank with a short or empty slice still joins), runs the model's dense part
(``model.head``) on the ``[rows, fields, dim]`` vectors; loss = its rows' summed BCE / ``n``.
Backward updates the shards in FBGEMM (SGD / Adagrad fused; the loss is multiplied by
``ShardedTables.grad_scale`` because TorchRec divides table gradients by the world size); the
dense gradients, the loss and the float buffers (Dice's running statistics, weighted by the
rank's share) are summed over the ranks in one flat buffer (``sum_across``), then the dense
optimizer steps.

Mirror. The model's own table is a mirror of the shards: pushed into them at the first step
(the fresh initialisation, ``init_from``, or a resumed checkpoint's table, with the one-process
optimizer's Adagrad accumulators); then only rank 0 keeps it, refreshed from the shards by
:meth:`ShardedCTRStep.refresh` (a gather to rank 0), which the loop calls before evaluation
and checkpoints; the other ranks' table and every rank's one-process
optimizer state of it shrink to 0 rows. Evaluation predicts on rank 0 and sends the
predictions (:func:`~oneepoch.distributed.parallel.writer_predict`).

Checkpoints (:meth:`ShardedCTRStep.save_checkpoint`, the loop's seam, as stage 1's): every rank
writes its shards of the table and of FBGEMM's optimizer state with
``torch.distributed.checkpoint`` (:func:`~oneepoch.distributed.sharded.write_checkpoint`), under
the one-process checkpoint's names: the vocabularies' TorchRec tables are joined into one
ShardedTensor of the model's one table (each shard moved down by its vocabulary's row offset;
:meth:`~oneepoch.distributed.sharded.ShardedTables.joined_state`), so ``tables.dcp/`` holds
``model/embedding.weight`` and ``optim/sparse/embedding.weight/square_avg`` and a one-process run
reads them whole. Resume: the step is built after the hooks' ``on_train_start``, so the loop
reads ``tables.dcp/`` whole into the model and the one-process optimizer on every rank and
:meth:`ShardedCTRStep.push` puts the table and the accumulators into the shards (then drops
the copies).

Refused before the run folder is written (:func:`check_sharded_train`): optimizers FBGEMM's CPU
kernels do not fuse (``adam``, ``rmsprop``), momentum and weight decay (not in the fused
kernels), embedding dimensions that are not a multiple of 4 (FBGEMM's tables need one; so
``model.type=lr``, one weight per ID, stays replicated), frozen tables, and the remedies
whose per-row rules need oneepoch's row-wise optimizer or edit rows between steps
(``meda``, ``freq_lr``, ``freeze_after`` of the embedding, ``init.embeddings`` with a
learning-rate scale other than 1): those run on replicated tables.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from oneepoch.data.batcher import Batcher
from oneepoch.distributed.env import DistContext
from oneepoch.distributed.parallel import rank_slice, sum_across
from oneepoch.distributed.sharded import check_fused_optim
from oneepoch.training.hooks import Hook, State
from oneepoch.training.loop import OneBatchStep
from oneepoch.training.optim import Optimizer

_FIX = "drop --shard-tables (replicated tables run it)"


def _row_rule(cfg: Any, applies: str) -> str:
    """Why the hook applying setting ``applies`` cannot run on sharded tables ("" if it can)."""
    if applies == "meda":
        return "re-initialises table rows and their optimizer state between epochs"
    if applies == "freq_lr":
        return "scales each row's learning rate (a per-row rule of oneepoch's row-wise update)"
    if applies == "freeze_after" and "embedding" in cfg.freeze_after.groups:
        return "sets the table's learning rate to 0 (freeze_after.groups=embedding)"
    if applies == "init.embeddings" and (cfg.init.mode == "frozen" or cfg.init.lr_scale != 1):
        return ("scales the pre-trained rows' learning rate (init.mode=frozen or "
                f"init.lr_scale={cfg.init.lr_scale:g}; init.mode=finetune with "
                "init.lr_scale=1 runs sharded)")
    return ""


def check_sharded_train(cfg: Any, hooks: Sequence[Hook]) -> None:
    """Refuse, before anything is written, what ``train --shard-tables`` cannot run (see the
    module doc); each error names the setting and the way out."""
    oc, mc = cfg.optim, cfg.model
    check_fused_optim(oc.name)
    dim = 1 if mc.type == "lr" else mc.emb_dim
    if dim % 4:
        if mc.type == "lr":
            raise ValueError("model.type=lr: one weight per ID (dimension 1), and FBGEMM's "
                             f"fused tables need a dimension that is a multiple of 4; {_FIX}")
        raise ValueError(f"model.emb_dim={dim}: FBGEMM's fused tables need a dimension that "
                         f"is a multiple of 4 (e.g. {max(4, dim - dim % 4)} or "
                         f"{dim - dim % 4 + 4}); {_FIX}")
    for key, v in (("optim.momentum", oc.momentum), ("optim.weight_decay", oc.weight_decay)):
        if v:
            raise ValueError(f"{key}={v:g}: FBGEMM's fused {oc.name} on sharded tables has no "
                             f"{key.split('.')[1].replace('_', ' ')}; set {key}=0 or {_FIX}")
    if "embedding" in cfg.freeze:
        raise ValueError(f"freeze=[embedding]: sharded tables always train; {_FIX}")
    for h in hooks:
        applies = getattr(h, "applies", "")
        why = _row_rule(cfg, applies)
        if why:
            raise ValueError(f"{applies}: {why}, which sharded tables (the update fused in "
                             f"FBGEMM) do not support; {_FIX}")


def table_name(vocab: str, k: int) -> str:
    """A TorchRec table name for vocabulary ``vocab`` (its own name when it is a plain
    identifier: the name is a key of the module's state dict)."""
    return vocab if re.fullmatch(r"[A-Za-z_]\w*", vocab) else f"vocab{k}"


class ShardedCTRStep(OneBatchStep):
    """The CTR step with the model's ID tables sharded by TorchRec (a
    :class:`~oneepoch.training.loop.Step`; see the module doc). The loop calls its
    :meth:`refresh` before the model is read."""

    path = "distributed-sharded"

    def __init__(self, ctx: DistContext, model: torch.nn.Module, opt: Optimizer,
                 batcher: Batcher, sharding: str = "auto") -> None:
        from oneepoch.distributed.sharded import ShardedTables

        emb = getattr(model, "embedding", None)
        if emb is None or not hasattr(model, "head") or not hasattr(emb, "field_vocabs"):
            raise ValueError("--shard-tables: needs a CTR model with a FieldEmbedding and a "
                             "head (model.type=dnn or lr)")
        if opt.track_updates:  # set by the update-norm probe in on_train_start
            raise ValueError("the update-norm probe (updates) measures the optimizer's applied "
                             "updates, which FBGEMM applies inside backward on sharded tables; "
                             f"{_FIX}")
        self.ctx, self.model, self.opt, self.batcher, self.emb = ctx, model, opt, batcher, emb
        oc = opt.cfg
        used = list(dict.fromkeys(emb.field_vocabs))  # vocabularies some field reads
        self.vocab_table = {v: table_name(v, k) for k, v in enumerate(used)}
        self.features = [f"field{f}" for f in range(emb.n_fields)]
        feats: dict[str, list[str]] = {}
        for f, v in enumerate(emb.field_vocabs):
            feats.setdefault(self.vocab_table[v], []).append(self.features[f])
        tables = [(self.vocab_table[v], emb.vocab_sizes[v], emb.dim) for v in used]
        # oneepoch's row-wise Adagrad (as torch's) adds 1e-10 to the root; FBGEMM takes eps
        self.tables = ShardedTables(ctx, tables, oc.name, oc.lr * oc.emb_lr_scale, sharding,
                                    1e-10 if oc.name == "adagrad" else oc.eps, feats, "mean")
        # KJT keys come table by table; field f's place among them
        self.order = [self.tables.names.index(k) for k in self.features]
        self.field_offsets = torch.tensor([emb.vocab_offsets[v] for v in emb.field_vocabs],
                                          dtype=torch.int64)
        self.dense = [p for p in opt.dense_params if p.requires_grad]
        self.buffers = [b for b in model.buffers() if b.is_floating_point()]
        self.param = opt.names[emb.weight]  # the table's name in the model and the optimizer
        self.offsets = {t: emb.vocab_offsets[v] for v, t in self.vocab_table.items()}
        self.shape = tuple(emb.weight.shape)  # the whole table's (rank 0 only keeps it)
        self.pushed = False
        self.root: Path | None = None  # the run folder, shared by the ranks (checkpoints)
        self.reason = (f"data-parallel over {ctx.world_size} process(es) with the ID tables "
                       f"sharded by TorchRec ({sharding}, one table per vocabulary); optimizer "
                       f"{oc.name} fused in FBGEMM")

    def _whole(self) -> dict[str, torch.Tensor]:
        """The model's whole table and the one-process optimizer's state of it, under the
        checkpoint's keys (``model/<param>``, ``optim/sparse/<param>/<state>``)."""
        out = {f"model/{self.param}": self.emb.weight.detach()}
        out.update({f"optim/sparse/{self.param}/{k}": v
                    for k, v in self.opt.sparse[self.param].state.items()})
        return out

    def _shards(self) -> dict[str, Any]:
        """This rank's shards of the table and of FBGEMM's optimizer state, joined into the
        model's one table (:meth:`~oneepoch.distributed.sharded.ShardedTables.joined_state`):
        the one-process checkpoint's keys, loading into it sets the shards."""
        return self.tables.joined_state(self.param, self.offsets, self.shape, self._whole())

    @torch.no_grad()
    def push(self) -> None:
        """The model's table (fresh, loaded or resumed) and the one-process optimizer's Adagrad
        accumulators of it (zero, or a resumed checkpoint's) into the shards."""
        from oneepoch.distributed.sharded import load_whole_into

        load_whole_into(self._shards(), self._whole())
        self.pushed = True
        self._drop_copies()

    def _drop_copies(self) -> None:
        from oneepoch.distributed.sharded import drop_copies

        drop_copies(self.ctx, self.opt, {self.param: self.emb.weight})

    def save_checkpoint(self, path: Path, state: dict[str, Any]) -> None:
        """Write the loop's checkpoint ``path`` (see the module doc): the table and FBGEMM's
        optimizer state by every rank with DCP, the rest by rank 0."""
        from oneepoch.distributed.sharded import write_checkpoint

        if not self.pushed:
            self.push()
        write_checkpoint(self.ctx, self.root, Path(path), state, self._shards())

    @torch.no_grad()
    def refresh(self) -> None:
        """Refresh rank 0's whole table from the shards (a collective: every rank calls it;
        the loop does, before the model is read)."""
        if not self.pushed:
            return
        w = self.emb.weight
        for v, t in self.vocab_table.items():
            full = self.tables.gather_full(t)
            if self.ctx.rank == 0:
                w[self.emb.rows(v)] = full

    def _bags(self, local: np.ndarray, size: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """This rank's batch, and the KJT values and lengths ``[features, size]`` of its
        bags (field-major as ``FieldEmbedding.bag_inputs``, which also checks the IDs)."""
        nf = self.emb.n_fields
        lengths = torch.zeros(nf, size, dtype=torch.int64)
        if not len(local):
            return None, torch.zeros(0, dtype=torch.int64), lengths
        batch = self.batcher.get(local)
        flat, _, sizes = self.emb.bag_inputs(batch, with_sizes=True)
        sizes = sizes.view(nf, len(local))
        per_field = sizes.sum(1)
        values = flat - torch.repeat_interleave(self.field_offsets, per_field,
                                                output_size=flat.shape[0])  # vocabulary IDs
        lengths[:, :len(local)] = sizes
        if self.order != list(range(nf)):  # fields regrouped by table, as the keys are
            starts = torch.cumsum(per_field, 0) - per_field
            values = torch.cat([values[int(starts[f]):int(starts[f] + per_field[f])]
                                for f in np.argsort(self.order)])
            lengths = lengths[torch.from_numpy(np.argsort(self.order))]
        return batch, values, lengths

    def one(self, rows: np.ndarray) -> float:
        if not self.pushed:
            self.push()
        n, w = len(rows), self.ctx.world_size
        local = rank_slice(rows, self.ctx.rank, w)
        size = max(1, -(-n // w))  # bags per feature on every rank
        batch, values, lengths = self._bags(local, size)
        out = self.tables.lookup_bags(values, lengths)
        pooled = torch.stack([out[k] for k in self.features], 1)  # [size, fields, dim]
        for p in self.dense:
            p.grad = None
        if batch is None:  # an empty slice still joins the backward's all-to-all
            loss = pooled.sum() * 0.0
        else:
            logits = self.model.head(pooled[:len(local)])
            loss = F.binary_cross_entropy_with_logits(logits, batch.label, reduction="sum") / n
        scale = self.tables.grad_scale
        (loss * scale).backward()  # the tables' update happens here
        share = len(local) / max(n, 1)
        flat = [p.grad.reshape(-1) / scale if p.grad is not None else p.new_zeros(p.numel())
                for p in self.dense]
        flat += [b.reshape(-1) * share for b in self.buffers]
        flat.append(loss.detach().reshape(1))
        buf = torch.cat([t.to(torch.float32) for t in flat])
        buf = sum_across(self.ctx, buf, "the dense gradients")
        k = 0
        for p in self.dense:
            p.grad = buf[k:k + p.numel()].view_as(p).to(p.dtype)
            k += p.numel()
        with torch.no_grad():
            for b in self.buffers:
                b.copy_(buf[k:k + b.numel()].view_as(b))
                k += b.numel()
        if self.opt.dense is not None:
            self.opt.dense.step()
        return float(buf[-1])


def build_sharded_step(ctx: DistContext, model: torch.nn.Module, opt: Optimizer,
                       batcher: Batcher, hooks: Sequence[Hook], state: State,
                       sharding: str) -> ShardedCTRStep:
    """The sharded step, after checking the run can use it."""
    check_sharded_train(state.cfg, hooks)
    return ShardedCTRStep(ctx, model, opt, batcher, sharding)
