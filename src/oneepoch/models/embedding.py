"""ID embeddings for all fields in one table, pooled in one pass (native or ``embedding_bag``).

As in paper A's reference code, one table holds every vocabulary at its own row offset (IDs of
different fields never collide); fields sharing a vocabulary (``his_item_ID`` and ``item_ID``)
share rows. Sequences are mean-pooled over their true length (empty -> zeros). Gradients are
sparse, so a step touches only the rows of the batch.

Two backward paths, same numbers: by default the table gets a sparse COO gradient (any torch
optimizer that accepts sparse gradients works); when :class:`oneepoch.training.optim.Optimizer`
owns the table it switches on ``fused`` updates: each forward de-duplicates the batch's rows
(without sorting), gathers them into a small dense leaf, and the optimizer reads that leaf's
already-summed gradient, so no sparse tensor is built or coalesced.

On the CPU (float32 table), pooling, de-duplication and the backward scatter run as one native
pass each (:mod:`oneepoch.kernels`); elsewhere, or with the kernels disabled, the PyTorch path
above gives the same numbers.

    >>> emb = FieldEmbedding({"item": 100, "cate": 10}, ["item", "cate", "item"], n_single=2, dim=8)
    >>> emb.table_rows
    110
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from oneepoch import kernels
from oneepoch.data.batcher import Batch

# Called with each training batch before its rows are read (a dense-Adam optimizer brings them
# up to date there); kept beside the modules, so copying or saving a module does not copy it.
_BEFORE_LOOKUP: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def set_before_lookup(module: nn.Module, fn: Callable[[Batch], None] | None) -> None:
    """Call ``fn(batch)`` at the start of every forward of ``module`` that builds a gradient
    for its table (``None``: stop). A bound method is held weakly (its object, e.g. the
    optimizer, usually refers to the module: a strong reference would keep both alive)."""
    if fn is None:
        _BEFORE_LOOKUP.pop(module, None)
    else:
        _BEFORE_LOOKUP[module] = weakref.WeakMethod(fn) if hasattr(fn, "__self__") \
            else (lambda: fn)


class _NativePool(torch.autograd.Function):
    """Routes the gradient of natively pooled embeddings to the batch's distinct rows."""

    @staticmethod
    def forward(ctx, leaf: torch.Tensor, pooled: torch.Tensor, inv: torch.Tensor,
                lens: list[torch.Tensor], n_single: int) -> torch.Tensor:
        ctx.inv, ctx.lens, ctx.n_single, ctx.rows = inv, lens, n_single, leaf.shape
        return pooled

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        g = g.contiguous()
        grad = g.new_empty(ctx.rows)
        kernels.emb_pool_backward(g, ctx.n_single, ctx.lens, ctx.inv, grad)
        return grad, None, None, None, None


class _MeanBagLookup(torch.autograd.Function):
    """Mean-pooled bags over a small dense table, with a cheap backward.

    ``embedding_bag``'s own backward sorts the lookups; here the per-lookup gradient is one
    gather and the per-row sum one accumulating scatter.
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, idx: torch.Tensor, offsets: torch.Tensor,
                bag_of: torch.Tensor, inv_size: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx, bag_of, inv_size)
        ctx.n_rows = table.shape[0]
        return F.embedding_bag(idx, table, offsets, mode="mean")

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        idx, bag_of, inv_size = ctx.saved_tensors
        g = (grad_out * inv_size.unsqueeze(1)).index_select(0, bag_of)
        grad = torch.zeros(ctx.n_rows, grad_out.shape[1], dtype=g.dtype, device=g.device)
        grad.index_put_((idx,), g, accumulate=True)
        return grad, None, None, None, None


class FieldEmbedding(nn.Module):
    """Pooled per-field embeddings ``[B, F, dim]`` of a :class:`Batch`.

    Args:
        vocab_sizes: rows per vocabulary (including its out-of-vocabulary row 0).
        field_vocabs: the vocabulary of each field, in model order (single-ID fields first,
            then sequence fields).
        n_single: how many of ``field_vocabs`` are single-ID fields.
        dim: embedding dimension.
        init_std: standard deviation of the normal initialisation.
    """

    def __init__(self, vocab_sizes: dict[str, int], field_vocabs: list[str], n_single: int,
                 dim: int, init_std: float = 0.01) -> None:
        super().__init__()
        offsets, total = {}, 0
        for name, size in vocab_sizes.items():
            offsets[name] = total
            total += size
        self.vocab_offsets = offsets
        self.vocab_sizes = dict(vocab_sizes)
        self.field_vocabs = list(field_vocabs)
        self.n_single = n_single
        self.dim = dim
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(total, dim))
        self.reset_parameters()
        off = torch.tensor([offsets[v] for v in field_vocabs], dtype=torch.int64)
        self.register_buffer("field_offsets", off, persistent=False)
        lim = torch.tensor([vocab_sizes[v] for v in field_vocabs], dtype=torch.int64)
        self.register_buffer("field_rows", lim, persistent=False)  # IDs of field f: [0, lim)
        self.fused = False
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows, leaf) per forward
        self._slot: torch.Tensor | None = None
        self._slot32: torch.Tensor | None = None  # the native path's (int32, CPU)

    @property
    def table_rows(self) -> int:
        return self.weight.shape[0]

    @property
    def n_fields(self) -> int:
        return len(self.field_vocabs)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            if self.init_std == 0:
                self.weight.zero_()
            else:
                self.weight.normal_(0.0, self.init_std, generator=generator)

    def rows(self, vocab: str) -> slice:
        """The table rows of one vocabulary."""
        a = self.vocab_offsets[vocab]
        return slice(a, a + self.vocab_sizes[vocab])

    def bag_inputs(self, batch: Batch, with_sizes: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, ...]:
        """Flat table rows and bag offsets, field-major: all samples of field 0, then 1, ...
        (with ``with_sizes``, also each bag's size)."""
        ids = batch.ids
        bsz, s = ids.shape
        off, lim = self.field_offsets, self.field_rows
        parts = [(ids + off[:s]).t().reshape(-1)]
        sizes = [torch.ones(bsz * s, dtype=torch.int64, device=ids.device)]
        bad = ((ids < 0) | (ids >= lim[:s])).any()  # an ID outside its field's vocabulary
        for k, (seq, ln) in enumerate(zip(batch.seqs, batch.lens, strict=True)):
            bad |= ((ln < 0) | (ln > seq.shape[1])).any()
            mask = torch.arange(seq.shape[1], device=seq.device) < ln.unsqueeze(1)
            vals = seq[mask]
            bad |= ((vals < 0) | (vals >= lim[s + k])).any()
            parts.append(vals + off[s + k])
            sizes.append(ln)
        if bool(bad):  # (one check per batch)
            raise IndexError(self._bad_lookup(batch, -1))
        size = torch.cat(sizes)
        offsets = torch.zeros_like(size)
        torch.cumsum(size[:-1], 0, out=offsets[1:])
        if with_sizes:
            return torch.cat(parts), offsets, size
        return torch.cat(parts), offsets

    def unique_rows(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``rows, inverse`` with ``rows[inverse] == flat``, in O(len(flat)) without a sort.

        A table-sized slot array remembers, for each row, one position where it occurs.
        """
        n = flat.shape[0]
        if self._slot is None or self._slot.device != flat.device:
            self._slot = torch.full((self.table_rows,), -1, dtype=torch.int64, device=flat.device)
        pos = torch.arange(n, device=flat.device)
        self._slot.index_put_((flat,), pos)  # duplicates: any one writer wins, all read it back
        first = self._slot.index_select(0, flat)
        reps = (first == pos).nonzero().squeeze(1)
        rows = flat.index_select(0, reps)
        compact = torch.empty(n, dtype=torch.int64, device=flat.device)
        compact.index_copy_(0, reps, torch.arange(reps.shape[0], device=flat.device))
        self._slot.index_fill_(0, rows, -1)
        return rows, compact.index_select(0, first)

    def _native(self, batch: Batch) -> torch.Tensor:
        """Pooling (and, when training fused, de-duplication) in one native pass."""
        ids = kernels.ids32(batch.ids)
        seqs = [kernels.ids32(q) for q in batch.seqs]
        lens = [kernels.ids32(n) for n in batch.lens]
        bsz, s = ids.shape
        train = self.fused and self.weight.requires_grad and torch.is_grad_enabled()
        w = self.weight.detach()
        out = w.new_empty(bsz, self.n_fields, self.dim)
        rows = inv = slot = None
        if train:
            cap = bsz * (s + sum(q.shape[1] for q in seqs))
            if self._slot32 is None:
                self._slot32 = torch.full((self.table_rows,), -1, dtype=torch.int32)
            slot = self._slot32
            rows = torch.empty(cap, dtype=torch.int64)
            inv = torch.empty(cap, dtype=torch.int32)
        n = kernels.emb_pool_forward(ids, self.field_offsets, self.field_rows, seqs, lens, w,
                                     out, slot, rows, inv)
        if n < 0:
            raise IndexError(self._bad_lookup(batch, n))
        if not train:
            return out
        leaf = w.new_empty(n, self.dim).requires_grad_()  # receives the rows' summed gradient
        self.pending.append((rows[:n], leaf))
        return _NativePool.apply(leaf, out, inv, lens, s)

    def _bad_lookup(self, batch: Batch, code: int) -> str:
        """Which field holds the lookup the native pass refused (the slow way: only on error)."""
        s = batch.ids.shape[1]
        for f, vocab in enumerate(self.field_vocabs):
            n = self.vocab_sizes[vocab]
            if f < s:
                vals = batch.ids[:, f]
            else:
                seq, ln = batch.seqs[f - s], batch.lens[f - s]
                if bool((ln < 0).any()) or bool((ln > seq.shape[1]).any()):
                    return (f"FieldEmbedding: field {f} ({vocab!r} vocabulary): a sequence "
                            f"length is negative or longer than its padding ({seq.shape[1]})")
                vals = seq[torch.arange(seq.shape[1]) < ln.unsqueeze(1)]
            bad = vals[(vals < 0) | (vals >= n)]
            if bad.numel():
                return (f"FieldEmbedding: field {f} ({vocab!r} vocabulary, {n} rows) has ID "
                        f"{int(bad[0])}: negative or beyond its vocabulary")
        return f"FieldEmbedding: a lookup is outside the table (code {code})"

    def forward(self, batch: Batch) -> torch.Tensor:
        needs_grad = self.weight.requires_grad and torch.is_grad_enabled()
        if needs_grad and self in _BEFORE_LOOKUP:
            fn = _BEFORE_LOOKUP[self]()
            if fn is not None:
                fn(batch)
        if (self.fused or not needs_grad) and batch.ids.dtype == torch.int64 \
                and self.weight.dtype == torch.float32 and kernels.usable(self.weight, batch.ids):
            return self._native(batch)
        if self.fused and self.weight.requires_grad and torch.is_grad_enabled():
            flat, offsets, size = self.bag_inputs(batch, with_sizes=True)
            rows, inv = self.unique_rows(flat)
            leaf = self.weight.detach().index_select(0, rows).requires_grad_()
            self.pending.append((rows, leaf))
            bag_of = torch.repeat_interleave(torch.arange(size.shape[0], device=size.device),
                                             size, output_size=flat.shape[0])
            inv_size = 1.0 / size.clamp(min=1).to(leaf.dtype)
            out = _MeanBagLookup.apply(leaf, inv, offsets, bag_of, inv_size)
        else:
            flat, offsets = self.bag_inputs(batch)
            out = F.embedding_bag(flat, self.weight, offsets, mode="mean", sparse=True)
        return out.view(self.n_fields, len(batch), self.dim).transpose(0, 1)
