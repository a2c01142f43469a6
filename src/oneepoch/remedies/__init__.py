"""Remedies against the one-epoch drop, each a small :class:`~oneepoch.training.hooks.Hook`
or optimizer rule, built from the run's config by :func:`hooks_from_config`. Commands and
recipes hand these hooks to ``train()``; the trainer imports no remedy (it refuses a config
that asks for one without its hook).

* ``init.embeddings``: paper B's pre-trained ID rows, frozen or fine-tuned
  (:mod:`~oneepoch.remedies.pretrained_init`);
* ``single_stage.weight``: paper B's merged contrastive term (same module);
* ``freq_lr.threshold``: per-ID embedding lr by training count
  (:mod:`~oneepoch.remedies.embedding_rules`);
* ``meda.enabled``: re-initialise the ID tables each epoch (same module);
* ``freeze_after.epoch``: paper A's freezing of the ID tables or the MLP after an epoch
  (same module);
* ``early_stop.metric``: select (and stop) on validation
  (:mod:`~oneepoch.remedies.early_stopping`).

Freezing parameter groups (``freeze: [mlp]``), starting from a checkpoint (``init_from``),
the ID filter / hash and dropping fields are plain settings of the trainer and the data;
:data:`oneepoch.remedies.catalog.REMEDIES` names every remedy as settings.

    >>> from oneepoch.config import load_config, TrainConfig
    >>> hooks_from_config(load_config(TrainConfig, "ctr"))
    []
"""

from __future__ import annotations

from oneepoch.config import TrainConfig
from oneepoch.training.hooks import Hook


def hooks_from_config(cfg: TrainConfig) -> list[Hook]:
    """The hooks a config asks for (none by default), in the order they must run."""
    from oneepoch.remedies.early_stopping import EarlyStopping
    from oneepoch.remedies.embedding_rules import FreezeAfter, FrequencyAdaptiveLr, Meda
    from oneepoch.remedies.pretrained_init import hooks_for

    hooks: list[Hook] = [*hooks_for(cfg)]
    if cfg.freq_lr.threshold > 0:
        hooks.append(FrequencyAdaptiveLr(cfg))
    if cfg.meda.enabled:
        hooks.append(Meda(cfg))
    if cfg.freeze_after.epoch > 0:
        hooks.append(FreezeAfter(cfg))
    if cfg.early_stop.metric:
        hooks.append(EarlyStopping(cfg))  # last: it sees every key the others add
    return hooks
