"""ID embeddings for all fields in one table, looked up with a single ``embedding_bag``.

As in paper A's reference code, one table holds every vocabulary at its own row offset (IDs of
different fields never collide); fields sharing a vocabulary (``his_item_ID`` and ``item_ID``)
share rows. Sequences are mean-pooled over their true length (empty -> zeros). Gradients are
sparse, so a step touches only the rows of the batch.

    >>> emb = FieldEmbedding({"item": 100, "cate": 10}, ["item", "cate", "item"], n_single=2, dim=8)
    >>> emb.table_rows
    110
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from oneepoch.data.batcher import Batch


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

    def bag_inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat table rows and bag offsets, field-major: all samples of field 0, then 1, ..."""
        ids = batch.ids
        bsz, s = ids.shape
        off = self.field_offsets
        parts = [(ids + off[:s]).t().reshape(-1)]
        sizes = [torch.ones(bsz * s, dtype=torch.int64, device=ids.device)]
        for k, (seq, ln) in enumerate(zip(batch.seqs, batch.lens, strict=True)):
            mask = torch.arange(seq.shape[1], device=seq.device) < ln.unsqueeze(1)
            parts.append(seq[mask] + off[s + k])
            sizes.append(ln)
        size = torch.cat(sizes)
        offsets = torch.zeros_like(size)
        torch.cumsum(size[:-1], 0, out=offsets[1:])
        return torch.cat(parts), offsets

    def forward(self, batch: Batch) -> torch.Tensor:
        flat, offsets = self.bag_inputs(batch)
        out = F.embedding_bag(flat, self.weight, offsets, mode="mean",
                              sparse=True)
        return out.view(self.n_fields, len(batch), self.dim).transpose(0, 1)
