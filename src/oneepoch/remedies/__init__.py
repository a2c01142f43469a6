"""Remedies against the one-epoch drop, each a small :class:`~oneepoch.training.trainer.Hook`
or optimizer rule wired from the run's config by :func:`hooks_from_config`.

Freezing parameter groups (``freeze: [mlp]``) and starting from a checkpoint
(``init_from: ...``) are plain settings of the trainer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from oneepoch.config import TrainConfig
    from oneepoch.training.trainer import Hook


def hooks_from_config(cfg: TrainConfig) -> list[Hook]:
    """The hooks a config asks for (none by default)."""
    hooks: list[Hook] = []
    # paper B stage 2: init.embeddings (frozen / finetune) and single_stage.weight
    from oneepoch.remedies.pretrained_init import hooks_for

    hooks += hooks_for(cfg)
    return hooks
