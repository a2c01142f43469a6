"""The CTR model's training step, as an object that says which path it took and why.

:func:`build_step` returns a :class:`FusedPath` (the whole step in one native call, several
batches per call) when :meth:`FusedStep.why_not` allows it and no hook adds to the loss, else
an :class:`AutogradStep` whose ``reason`` says why (``summary.json`` records both).

    >>> step = build_step(model, opt, batcher, hooks, state)   # doctest: +SKIP
    >>> step.path, step.reason                                   # doctest: +SKIP
    ('autograd', 'only Dice activations without dropout')
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from oneepoch.data.batcher import Batcher
from oneepoch.training.fused import FusedStep
from oneepoch.training.hooks import Hook, State, changes_loss
from oneepoch.training.loop import OneBatchStep
from oneepoch.training.optim import Optimizer


class AutogradStep(OneBatchStep):
    """One batch per call through autograd: forward, BCE, hooks' loss terms, backward, step."""

    def __init__(self, model: torch.nn.Module, opt: Optimizer, batcher: Batcher,
                 hooks: Sequence[Hook], state: State, reason: str = "") -> None:
        self.model, self.opt, self.batcher = model, opt, batcher
        self.hooks, self.s, self.reason = list(hooks), state, reason

    def one(self, rows: np.ndarray) -> float:
        batch = self.batcher.get(rows)
        logits = self.model(batch)
        loss = F.binary_cross_entropy_with_logits(logits, batch.label)
        for h in self.hooks:
            loss = h.on_loss(self.s, batch, logits, loss)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return float(loss.detach())


class FusedPath:
    """Up to ``limit`` consecutive batches per native call (at most :attr:`MAX_STEPS`); a
    one-row batch (the last of an epoch, at worst) goes through autograd, as the native step
    needs two rows for Dice's batch statistics."""

    path = "fused"
    reason = ""
    MAX_STEPS = 256  # batches per native call: bounds the index array and the call's latency

    def __init__(self, fused: FusedStep, fallback: AutogradStep) -> None:
        self.fused, self.fallback = fused, fallback

    def run(self, batches: Iterator[np.ndarray], limit: int) -> list[float]:
        first = next(batches, None)
        if first is None:
            return []
        if len(first) < 2:
            return [self.fallback.one(first)]
        group = [first, *itertools.islice(batches, min(limit, self.MAX_STEPS) - 1)]
        tail = group.pop() if len(group) > 1 and len(group[-1]) < 2 else None
        losses = list(self.fused.steps(np.concatenate(group) if len(group) > 1 else group[0]))
        if tail is not None:
            losses.append(self.fallback.one(tail))
        return losses

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def build_step(model: torch.nn.Module, opt: Optimizer, batcher: Batcher,
               hooks: Sequence[Hook], state: State) -> FusedPath | AutogradStep:
    """The fastest step that computes this run's numbers (see the module doc)."""
    reason = "a hook adds to the loss" if changes_loss(hooks) else \
        FusedStep.why_not(model, opt, batcher)
    autograd = AutogradStep(model, opt, batcher, hooks, state, reason or "")
    if reason:
        return autograd
    fused = FusedStep.build(model, opt, batcher)
    if fused is None:  # why_not said yes a moment ago
        raise RuntimeError("FusedStep.build refused a run why_not accepted")
    return FusedPath(fused, autograd)
