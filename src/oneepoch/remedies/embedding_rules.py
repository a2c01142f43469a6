"""Remedies that act on the ID tables only: MEDA's per-epoch re-initialisation and the
frequency-adaptive embedding learning rate. Both keep the fused native step: MEDA edits the
table and its optimizer state in place between epochs, and the learning-rate rule is the
row-wise optimizer's per-row scale (``row_lr``), which the native step reads.

* **MEDA** (Fan et al., arXiv 2407.01607): at the start of every epoch after the first, the
  rows of the chosen fields' vocabularies are drawn afresh from the initial distribution and
  their optimizer moments are zeroed (with dense Adam every row is first brought up to date,
  so no pending movement reaches a fresh row); the MLP keeps training.
* **Frequency-adaptive lr** (after Qiu et al., arXiv 2505.05605): the row of an ID seen ``c``
  times in the training split trains at ``lr x min(1, (c / threshold) ** power)``; rare IDs,
  which overfit first, move less. The out-of-vocabulary row keeps the full rate.

    >>> import numpy as np
    >>> freq_scale(np.array([0, 1, 4, 16, 100]), threshold=16, power=0.5).tolist()
    [0.0, 0.25, 0.5, 1.0, 1.0]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from oneepoch.config import TrainConfig
from oneepoch.training.hooks import Hook, State


def _table(s: State, setting: str) -> Any:
    emb = getattr(s.model, "embedding", None)
    if emb is None or not hasattr(emb, "rows"):
        raise ValueError(f"{setting}: needs a model with ID embeddings (model.type=dnn or lr "
                         "with FieldEmbedding)")
    return emb


def _vocabs(s: State, fields: list[str], setting: str) -> list[str]:
    """The vocabularies of ``fields`` (all when empty), each once."""
    names = fields or s.data.fields
    unknown = [f for f in names if f not in s.data.fields]
    if unknown:
        raise ValueError(f"{setting}: field(s) {unknown} not in the data (fields: "
                         f"{s.data.fields})")
    return list(dict.fromkeys(s.data.field_vocab(f) for f in names))


def _row_optimizer(s: State, setting: str) -> Any:
    ro = s.optimizer.sparse.get("embedding.weight")
    if ro is None:
        raise ValueError(f"{setting}: the embedding table has no row-wise optimizer")
    return ro


class Meda(Hook):
    """Re-initialise the chosen ID tables and their optimizer state at each epoch start > 0."""

    applies = "meda"

    def __init__(self, cfg: TrainConfig) -> None:
        self.fields, self.seed = list(cfg.meda.fields), cfg.seed
        self.resets = 0

    def check(self, s: State) -> None:
        _table(s, "meda")
        _vocabs(s, self.fields, "meda.fields")
        _row_optimizer(s, "meda")

    def on_epoch_start(self, s: State) -> None:
        if s.epoch == 0:
            return
        emb, ro = _table(s, "meda"), _row_optimizer(s, "meda")
        sync = getattr(s.optimizer, "sync", None)
        if sync is not None:
            sync()  # lazily updated rows first, so the reset is the last word
        # one generator per (seed, epoch): a resumed run redraws exactly the same rows
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + s.epoch)
        rows = [emb.rows(v) for v in _vocabs(s, self.fields, "meda.fields")]
        with torch.no_grad():
            for r in rows:
                w = emb.weight[r]
                if emb.init_std == 0:
                    w.zero_()
                else:
                    w.copy_(torch.randn(w.shape, generator=gen) * emb.init_std)
            for t in ro.state.values():  # moments; per-row step counters stay (synced above)
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 1 \
                        and t.shape[0] == emb.table_rows:
                    for r in rows:
                        t[r] = 0
        self.resets += 1

    def summary(self) -> dict[str, Any]:
        return {"meda_resets": self.resets}


def freq_scale(counts: np.ndarray, threshold: float, power: float) -> np.ndarray:
    """Per-ID learning-rate scale ``min(1, (count / threshold) ** power)``."""
    return np.minimum(1.0, (np.asarray(counts, dtype=np.float64) / threshold) ** power)


class FrequencyAdaptiveLr(Hook):
    """Scale each ID row's embedding learning rate by its training count."""

    applies = "freq_lr"

    def __init__(self, cfg: TrainConfig) -> None:
        fc = cfg.freq_lr
        if fc.threshold <= 0 or fc.power < 0:
            raise ValueError("freq_lr: threshold must be > 0 and power >= 0")
        self.threshold, self.power = fc.threshold, fc.power
        self.share_slowed = 0.0

    def check(self, s: State) -> None:
        _table(s, "freq_lr")
        _row_optimizer(s, "freq_lr")
        hashed = [v for v in _vocabs(s, [], "freq_lr") if s.data.vocabs[v].n_ids >= 0]
        if hashed:
            raise ValueError(f"freq_lr: vocabularies {hashed} are hashed (data.sparsity=hash): "
                             "bucket counts are not ID counts; use filter or no sparsity")

    def on_train_start(self, s: State) -> None:
        emb, ro = _table(s, "freq_lr"), _row_optimizer(s, "freq_lr")
        scale = torch.ones(emb.table_rows, dtype=torch.float32)
        slowed = total = 0
        for v in _vocabs(s, [], "freq_lr"):
            counts = s.data.vocabs[v].counts
            f = freq_scale(counts, self.threshold, self.power)
            start = emb.rows(v).start + 1  # row 0 of a vocabulary (OOV) keeps the full rate
            scale[start:start + len(f)] = torch.from_numpy(f.astype(np.float32))
            slowed, total = slowed + int((f < 1).sum()), total + len(f)
        self.share_slowed = slowed / max(total, 1)
        ro.row_lr = scale if ro.row_lr is None else ro.row_lr * scale

    def summary(self) -> dict[str, Any]:
        return {"freq_lr_share_of_ids_slowed": self.share_slowed}


class FreezeAfter(Hook):
    """From the start of epoch ``freeze_after.epoch`` on, the chosen groups train no more:
    the ID tables' row-wise optimizer and/or the MLP's optimizer get learning rate 0 (an
    exact freeze for Adam, SGD, RMSprop and Adagrad; Dice's running statistics still follow
    the batches, as the layers stay in training mode)."""

    applies = "freeze_after"

    def __init__(self, cfg: TrainConfig) -> None:
        self.at, self.groups = cfg.freeze_after.epoch, list(cfg.freeze_after.groups)
        self.frozen_at: int | None = None

    def check(self, s: State) -> None:
        if "embedding" in self.groups:
            _row_optimizer(s, "freeze_after.groups=embedding")

    def on_epoch_start(self, s: State) -> None:
        if s.epoch < self.at:
            return
        sync = getattr(s.optimizer, "sync", None)
        if sync is not None:
            sync()
        if "embedding" in self.groups:
            for ro in s.optimizer.sparse.values():
                ro.lr = 0.0
        if "mlp" in self.groups:
            for g in s.optimizer.dense.param_groups:
                g["lr"] = 0.0
        if self.frozen_at is None:
            self.frozen_at = s.step

    def summary(self) -> dict[str, Any]:
        return {"frozen": {"groups": self.groups, "from_step": self.frozen_at}}
