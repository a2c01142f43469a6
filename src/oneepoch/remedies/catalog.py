"""Every remedy by name, as the settings it turns on: what ``oneepoch compare --remedies``
accepts. Each entry is a small function from the data set (and an optional pre-trained export)
to ``key=value`` overrides; :func:`remedy_overrides` refuses an unknown name or a remedy whose
needs the data do not meet, naming the remedy and what is missing.

    >>> sorted(REMEDIES)[:4]
    ['adamar', 'drop-fine-ids', 'early-stop', 'filter']
    >>> REMEDIES["meda"].what
    'MEDA: re-initialise the ID tables and their optimizer state at every epoch start'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from oneepoch.config import OptimConfig
from oneepoch.data.dataset import CTRData

BASELINE = "early-stop"


def fine_fields(data: CTRData) -> list[str]:
    """The fine-grained ID fields paper A blames: ``item_ID`` / ``his_item_ID`` when present,
    else the fields of the largest vocabulary."""
    named = [f for f in ("item_ID", "his_item_ID") if f in data.fields]
    if named:
        return named
    big = max(data.vocabs, key=lambda v: data.vocabs[v].size)
    return [f for f in data.fields if data.field_vocab(f) == big]


@dataclass(frozen=True)
class Remedy:
    """A remedy: one line on what it does, and its settings for a data set."""

    what: str
    settings: Callable[[CTRData, str | None], list[str]]
    source: str = ""


class RemedyError(ValueError):
    """An unknown remedy, or one that needs what the data (or the command) lacks."""


def _fine(data: CTRData, _: str | None) -> str:
    return ",".join(fine_fields(data))


def _two_stage(mode: str) -> Callable[[CTRData, str | None], list[str]]:
    def settings(data: CTRData, export: str | None) -> list[str]:
        if not export:
            raise RemedyError(f"two-stage-{mode}: needs pre-trained embeddings: pass --export "
                              "RUN/embeddings (from `oneepoch pretrain`)")
        users = [f for f in ("user_ID",) if f in data.fields]
        return [f"init.embeddings={export}", f"init.mode={mode}",
                f"init.user_fields=[{','.join(users)}]"]
    return settings


def _single_stage(data: CTRData, _: str | None) -> list[str]:
    missing = [f for f in ("user_ID", "item_ID") if f not in data.single_fields]
    if missing:
        raise RemedyError(f"single-stage: needs single-ID fields user_ID and item_ID; the data "
                          f"lacks {missing} (fields: {data.fields})")
    return ["single_stage.weight=0.1"]


def _lazy(data: CTRData, _: str | None) -> list[str]:
    if "embedding_update" not in {f.name for f in dataclasses.fields(OptimConfig)}:
        raise RemedyError("lazy: this version has no optim.embedding_update setting")
    return ["optim.embedding_update=lazy"]


def _adamar(data: CTRData, _: str | None) -> list[str]:
    if "row_decay_alpha" not in {f.name for f in dataclasses.fields(OptimConfig)}:
        raise RemedyError("adamar: not available in this version (no optim.row_decay_alpha)")
    return ["optim.row_decay_alpha=1e-3"]


REMEDIES: dict[str, Remedy] = {
    BASELINE: Remedy("the baseline: early stopping inside an epoch, selected on validation",
                     lambda d, e: [], "industry default"),
    "lazy": Remedy("lazy (row-wise) Adam on the ID tables: untouched rows do not move",
                   _lazy, "SparseAdam / LazyAdam"),
    "meda": Remedy("MEDA: re-initialise the ID tables and their optimizer state at every "
                   "epoch start", lambda d, e: ["meda.enabled=true"], "Fan et al. 2024"),
    "freq-lr": Remedy("frequency-adaptive embedding lr: lr x min(1, (count / 10) ** 0.5)",
                      lambda d, e: ["freq_lr.threshold=10"], "after Qiu et al. 2025"),
    "adamar": Remedy("AdamAR: per-row decoupled weight decay growing with the row's update "
                     "gap", _adamar, "Li & Lyu 2025"),
    "filter": Remedy("paper A's ID filter: keep the top 10% of fine-grained IDs",
                     lambda d, e: ["data.sparsity=filter", "data.sparsity_m=0.1",
                                   f"data.sparsity_fields=[{_fine(d, e)}]"], "paper A"),
    "hash": Remedy("paper A's ID hash: fine-grained IDs into 1% as many buckets",
                   lambda d, e: ["data.sparsity=hash", "data.sparsity_m=0.01",
                                 f"data.sparsity_fields=[{_fine(d, e)}]"], "paper A"),
    "drop-fine-ids": Remedy("paper A: drop the fine-grained ID fields",
                            lambda d, e: [f"data.exclude_fields=[{_fine(d, e)}]"], "paper A"),
    "small-emb-lr": Remedy("paper A: a 10x smaller learning rate for the ID tables only",
                           lambda d, e: ["optim.emb_lr_scale=0.1"], "paper A"),
    "freeze-emb": Remedy("paper A: freeze the ID tables after epoch 1",
                         lambda d, e: ["freeze_after.epoch=1", "freeze_after.groups=[embedding]"],
                         "paper A"),
    "freeze-mlp": Remedy("paper A: freeze the MLP after epoch 1",
                         lambda d, e: ["freeze_after.epoch=1", "freeze_after.groups=[mlp]"],
                         "paper A"),
    "two-stage-frozen": Remedy("paper B: pre-trained ID embeddings, frozen",
                               _two_stage("frozen"), "paper B"),
    "two-stage-finetune": Remedy("paper B: pre-trained ID embeddings, fine-tuned at 0.1x lr",
                                 _two_stage("finetune"), "paper B"),
    "single-stage": Remedy("paper B: BCE + 0.1 x contrastive loss on the model's ID tables",
                           _single_stage, "paper B"),
}


def remedy_overrides(name: str, data: CTRData, export: str | None = None) -> list[str]:
    """The settings of remedy ``name`` on ``data``; :class:`RemedyError` names what is
    missing."""
    r = REMEDIES.get(name)
    if r is None:
        raise RemedyError(f"remedy {name!r}: unknown (choose from {', '.join(REMEDIES)})")
    return r.settings(data, export)
