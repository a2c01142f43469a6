"""Batches as slices of pre-encoded arrays through a permutation: no per-sample Python.

    >>> b = Batcher(split, batch_size=1024)           # doctest: +SKIP
    >>> order = np.random.default_rng(0).permutation(len(split))    # doctest: +SKIP
    >>> for batch in b.epoch(order): ...                             # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from oneepoch.data.dataset import EncodedSplit


@dataclass
class Batch:
    """One batch: vocabulary rows of single-ID fields, padded sequences with lengths, labels."""

    ids: torch.Tensor  # [B, S] int64
    seqs: list[torch.Tensor]  # [B, L_k] int64
    lens: list[torch.Tensor]  # [B] int64
    label: torch.Tensor  # [B] float32

    def __len__(self) -> int:
        return self.label.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        if str(device) == "cpu":
            return self
        nb = True
        return Batch(self.ids.to(device, non_blocking=nb),
                     [s.to(device, non_blocking=nb) for s in self.seqs],
                     [n.to(device, non_blocking=nb) for n in self.lens],
                     self.label.to(device, non_blocking=nb))


def _ids32(a: np.ndarray) -> torch.Tensor:
    """An encoded ID, sequence or length array as a contiguous int32 tensor (no copy when it
    already is one, as :func:`~oneepoch.data.dataset.load_ctr` encodes them)."""
    if a.dtype != np.int32:
        if a.size and (a.min() < -2**31 or a.max() > 2**31 - 1):
            raise ValueError(f"Batcher: encoded IDs outside int32 ({a.min()}..{a.max()})")
        a = a.astype(np.int32)
    return torch.from_numpy(np.ascontiguousarray(a))


class Batcher:
    """Slices an :class:`EncodedSplit` into :class:`Batch` es.

    Arrays are held as torch tensors (zero-copy over in-memory numpy arrays; memory-mapped
    arrays are gathered with numpy per batch) and gathered with one index per batch.
    """

    def __init__(self, split: EncodedSplit, batch_size: int, device: str | torch.device = "cpu",
                 label: np.ndarray | None = None) -> None:
        self.split = split
        self.batch_size = batch_size
        self.device = torch.device(device)
        self._mmap = isinstance(split.ids, np.memmap)
        lab = split.label if label is None else label
        if self._mmap:
            self._arrays = None
            self._label = np.asarray(lab, dtype=np.float32)
        else:
            # int32 as encoded (no copy when already so): what the native kernels read
            self._arrays = (_ids32(split.ids), [_ids32(s) for s in split.seqs],
                            [_ids32(n) for n in split.lens])
            self._label_t = torch.from_numpy(np.ascontiguousarray(lab, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.split)

    def steps(self) -> int:
        """Batches per pass (the last one may be short)."""
        return -(-len(self.split) // self.batch_size)

    def get(self, rows: np.ndarray) -> Batch:
        """The batch made of these row indices."""
        if self._arrays is None:
            s = self.split
            b = Batch(torch.from_numpy(s.ids[rows].astype(np.int64)),
                      [torch.from_numpy(q[rows].astype(np.int64)) for q in s.seqs],
                      [torch.from_numpy(n[rows].astype(np.int64)) for n in s.lens],
                      torch.from_numpy(self._label[rows]))
        else:
            idx = torch.from_numpy(np.asarray(rows, dtype=np.int64))
            ids, seqs, lens = self._arrays
            b = Batch(ids.index_select(0, idx).long(),
                      [q.index_select(0, idx).long() for q in seqs],
                      [n.index_select(0, idx).long() for n in lens],
                      self._label_t.index_select(0, idx))
        return b.to(self.device)

    def epoch_rows(self, order: np.ndarray, start_step: int = 0) -> Iterator[np.ndarray]:
        """Yield the row indices of each batch of one pass over ``order``, from ``start_step``."""
        bs = self.batch_size
        for a in range(start_step * bs, len(order), bs):
            yield order[a:a + bs]

    def epoch(self, order: np.ndarray, start_step: int = 0) -> Iterator[Batch]:
        """Yield the batches of one pass over ``order`` (row indices), from ``start_step``."""
        for rows in self.epoch_rows(order, start_step):
            yield self.get(rows)
