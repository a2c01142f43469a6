"""Remedies against the one-epoch drop, each a small :class:`~oneepoch.training.hooks.Hook`
or optimizer rule, built from the run's config by :func:`hooks_from_config`. Commands and
recipes hand these hooks to ``train()``; the trainer imports no remedy.

Freezing parameter groups (``freeze: [mlp]``) and starting from a checkpoint
(``init_from: ...``) are plain settings of the trainer.

    >>> from oneepoch.config import load_config, TrainConfig
    >>> hooks_from_config(load_config(TrainConfig, "ctr"))
    []
"""

from __future__ import annotations

from oneepoch.config import TrainConfig
from oneepoch.training.hooks import Hook


def hooks_from_config(cfg: TrainConfig) -> list[Hook]:
    """The hooks a config asks for (none by default)."""
    from oneepoch.remedies.pretrained_init import hooks_for

    return [*hooks_for(cfg)]
