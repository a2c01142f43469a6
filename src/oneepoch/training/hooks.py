"""What plugs into a training loop: :class:`Hook` (probes, remedies, monitors) and the
:class:`State` it sees. Commands and recipes build hooks and hand them to the loop; the loop
imports no probe and no remedy.

A hook with state of its own (a learned temperature, its optimizer, a random generator)
returns it from :meth:`Hook.state_dict` and takes it back in :meth:`Hook.load_state_dict`: the
loop saves it inside every epoch checkpoint, so a resumed run continues exactly.

    >>> class CountSteps(Hook):
    ...     def __init__(self): self.n = 0
    ...     def after_step(self, s): self.n += 1
    ...     def state_dict(self): return {"n": self.n}
    ...     def load_state_dict(self, d): self.n = int(d["n"])
    >>> acts_per_step([CountSteps()]), changes_loss([CountSteps()])
    (True, False)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class State:
    """What hooks see: the run's pieces and where the loop is."""

    cfg: Any  # the run's settings (TrainConfig, PretrainConfig)
    data: Any  # the run's data (CTRData, EngagementData)
    model: torch.nn.Module
    optimizer: Any  # oneepoch.training.optim.Optimizer
    run_dir: Path
    steps_per_epoch: int
    epoch: int = 0  # current epoch, 0-based
    step: int = 0  # global step (batches done)
    loss: float = float("nan")  # last batch loss
    rows: list[dict[str, Any]] = field(default_factory=list)  # evaluation rows so far
    stop: bool = False  # a hook may set this to end training after the current step

    @property
    def epoch_float(self) -> float:
        return self.step / self.steps_per_epoch


class Hook:
    """Override any of these; each gets the :class:`State`."""

    applies = ""  # the setting this hook applies (train() refuses a set one with no hook)

    def check(self, s: State) -> None:
        """Raise if this hook cannot run here; called before the run folder is touched."""

    def on_train_start(self, s: State) -> None: ...
    def on_epoch_start(self, s: State) -> None: ...
    def on_loss(self, s: State, batch: Any, logits: torch.Tensor, loss: torch.Tensor
                ) -> torch.Tensor:  # may add terms to the training loss
        return loss

    def after_step(self, s: State) -> None: ...
    def on_eval(self, s: State, row: dict[str, Any]) -> None: ...  # may add keys to row
    def on_train_end(self, s: State) -> None: ...

    def summary(self) -> dict[str, Any]:
        """Entries this hook adds to the run's ``summary.json`` at the end."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """State to keep in the run's checkpoints (tensors, numbers, lists, dicts)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` returned (called on resume, before training)."""


def _overrides(h: Hook, name: str) -> bool:
    return getattr(type(h), name) is not getattr(Hook, name)


def acts_per_step(hooks: Sequence[Hook]) -> bool:
    """True when some hook must see the state after every single step."""
    return any(_overrides(h, "after_step") for h in hooks)


def changes_loss(hooks: Sequence[Hook]) -> bool:
    """True when some hook adds to the training loss (the step must go through autograd)."""
    return any(_overrides(h, "on_loss") for h in hooks)


def hook_key(i: int, h: Hook) -> str:
    """The name a hook's state is saved under in a checkpoint."""
    return f"{i}-{type(h).__name__}"
