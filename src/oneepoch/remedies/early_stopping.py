"""Early stopping inside an epoch, the baseline every remedy has to beat.

At each evaluation the hook reads the validation metric (``valid_auc`` or
``valid_logloss``; never a test metric), keeps a copy of the weights at the best point so far,
and with ``patience > 0`` stops training after that many evaluations without an improvement of
at least ``min_delta``. At the end the best weights are put back into the model and written as
the run's final checkpoint (``RUN/checkpoints/final/``); ``summary.json`` says where the best
point was (``selected``) with the test metrics measured there.

    >>> from oneepoch.config import load_config, TrainConfig
    >>> cfg = load_config(TrainConfig, "ctr", ["early_stop.metric=auc", "data.valid_share=0.1"])
    >>> EarlyStopping(cfg).key
    'valid_auc'
"""

from __future__ import annotations

import math
from typing import Any

import torch

from oneepoch.config import TrainConfig
from oneepoch.training.checkpoint import save_checkpoint
from oneepoch.training.hooks import Hook, State

METRICS = {"auc": +1, "logloss": -1}  # +1: higher is better


class Selector:
    """The selection rule, shared by :class:`EarlyStopping` and :class:`oneepoch.monitor.Monitor`:
    at each evaluation, a value of ``key`` better than the best so far by more than
    ``min_delta`` (``sign`` +1: higher is better) makes a new best point; with ``patience > 0``
    that many evaluations in a row without one fire the stop.

        >>> sel = Selector("valid_auc", +1, patience=2)
        >>> [sel.update({"step": i, "valid_auc": v}) for i, v in enumerate([.6, .7, .69, .68])]
        [True, True, False, False]
        >>> sel.best_row["step"], sel.should_stop
        (1, True)
    """

    def __init__(self, key: str, sign: int = +1, patience: int = 0, min_delta: float = 0.0,
                 ) -> None:
        if sign not in (+1, -1):
            raise ValueError(f"Selector: sign must be +1 or -1, got {sign!r}")
        if patience < 0 or min_delta < 0:
            raise ValueError("patience and min_delta: must be >= 0")
        self.key, self.sign = key, sign
        self.patience, self.min_delta = patience, min_delta
        self.best = -math.inf  # sign x metric
        self.best_row: dict[str, Any] | None = None
        self.bad = 0
        self.should_stop = False

    def update(self, row: dict[str, Any], where: str = "") -> bool:
        """Judge one evaluation row; True when it is the new best point. A missing or
        non-finite ``key`` is a ``ValueError`` (``where`` names the evaluation)."""
        v = row.get(self.key)
        if v is None or not math.isfinite(v):
            raise ValueError(f"no finite {self.key} {where or 'at step ' + str(row.get('step'))}"
                             f" (got {v!r})")
        if self.sign * v > self.best + self.min_delta or self.best_row is None:
            self.best, self.bad = self.sign * v, 0
            self.best_row = {k: row[k] for k in row if isinstance(row[k], (int, float))}
            return True
        self.bad += 1
        if self.patience and self.bad >= self.patience:
            self.should_stop = True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad": self.bad, "stopped": self.should_stop,
                "best_row": self.best_row or {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad = float(state["best"]), int(state["bad"])
        self.should_stop = bool(state["stopped"])
        self.best_row = dict(state["best_row"]) or None


class EarlyStopping(Hook):
    """Select the best evaluation on validation; restore its weights at the end."""

    applies = "early_stop"

    def __init__(self, cfg: TrainConfig) -> None:
        es = cfg.early_stop
        if es.metric not in METRICS:
            raise ValueError(f"early_stop.metric: unknown metric {es.metric!r} "
                             f"(choose {', '.join(METRICS)})")
        if es.patience < 0 or es.min_delta < 0:
            raise ValueError("early_stop.patience and early_stop.min_delta: must be >= 0")
        if not cfg.data.valid_split and cfg.data.valid_share <= 0:
            raise ValueError("early_stop: needs a validation split: set data.valid_split=NAME "
                             "(a split of the data set) or data.valid_share=0.1 (carved out of "
                             "train); it never selects on the test split")
        self.sel = Selector(f"valid_{es.metric}", METRICS[es.metric], es.patience, es.min_delta)
        self.key = self.sel.key
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.stopped = False

    @property
    def best_row(self) -> dict[str, Any] | None:
        return self.sel.best_row

    def on_eval(self, s: State, row: dict[str, Any]) -> None:
        try:
            better = self.sel.update(row, f"at step {s.step}")
        except ValueError as e:
            raise ValueError(f"early_stop: {e} (is the validation split one class?)") from None
        if better:
            self.best_weights = {k: t.detach().clone() for k, t in s.model.state_dict().items()}
        elif self.sel.should_stop:
            s.stop = self.stopped = True
        row["selected_step"] = self.sel.best_row["step"]

    def on_train_end(self, s: State) -> None:
        if self.best_weights is None:
            return
        s.model.load_state_dict(self.best_weights)
        row = self.best_row or {}
        save_checkpoint(s.run_dir / "checkpoints" / "final", {
            "model": s.model.state_dict(), "step": int(row.get("step", 0)),
            "epoch": float(row.get("epoch", 0.0)), "selected_on": self.key})

    def summary(self) -> dict[str, Any]:
        row = self.best_row or {}
        keep = ("step", "epoch", self.key, "test_auc", "test_logloss", "test_gauc")
        return {"selected": {k: row[k] for k in keep if k in row} | {"on": self.key},
                "stopped_early": self.stopped}

    def state_dict(self) -> dict[str, Any]:
        return {**self.sel.state_dict(), "stopped": self.stopped,
                "best_weights": self.best_weights or {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sel.load_state_dict(state)
        self.stopped = bool(state["stopped"])
        self.best_weights = dict(state["best_weights"]) or None
