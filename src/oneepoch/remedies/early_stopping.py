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

Other loops select on their own key (``pretrain``'s ``select.metric``): pass ``key=`` (and
optionally ``higher_is_better=``; a key ending in ``loss`` is lower-is-better by default)
instead of a config.

    >>> EarlyStopping(key="test_full_loss", setting="select.metric").sign
    -1
"""

from __future__ import annotations

import math
from typing import Any

import torch

from oneepoch.config import TrainConfig
from oneepoch.training.checkpoint import save_checkpoint
from oneepoch.training.hooks import Hook, State

METRICS = {"auc": +1, "logloss": -1}  # +1: higher is better


def direction(key: str) -> int:
    """+1 when a higher value of metric ``key`` is better, -1 for losses (``...loss``)."""
    return -1 if key.endswith("loss") else +1


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

    def __init__(self, cfg: TrainConfig | None = None, *, key: str = "",
                 higher_is_better: bool | None = None, patience: int = 0,
                 min_delta: float = 0.0, final: str | None = "final",
                 setting: str = "early_stop") -> None:
        """From ``cfg.early_stop`` (``train``), or generic: select on row key ``key``,
        stop after ``patience`` evaluations without improvement (0 = never stop), write the
        restored best weights to ``RUN/checkpoints/<final>/`` (``None``: do not write);
        ``setting`` is the setting named in error messages."""
        self.setting, self.final = setting, final
        self.report: tuple[str, ...] = ()
        if cfg is None:
            if not key:
                raise ValueError(f"{setting}: EarlyStopping needs a config or a metric key")
            if patience < 0 or min_delta < 0:
                raise ValueError(f"{setting}: patience and min_delta must be >= 0")
            self.applies = setting.split(".")[0]
            sign = direction(key) if higher_is_better is None else (
                1 if higher_is_better else -1)
            self._setup(key, sign, patience, min_delta)
            return
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
        self.report = ("test_auc", "test_logloss", "test_gauc")
        self._setup(f"valid_{es.metric}", METRICS[es.metric], es.patience, es.min_delta)

    def _setup(self, key: str, sign: int, patience: int, min_delta: float) -> None:
        self.sel = Selector(key, sign, patience, min_delta)
        self.key, self.sign = key, sign
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.stopped = False

    @property
    def best_row(self) -> dict[str, Any] | None:
        return self.sel.best_row

    def on_eval(self, s: State, row: dict[str, Any]) -> None:
        try:
            better = self.sel.update(row, f"at step {s.step}")
        except ValueError as e:
            hint = " (is the validation split one class?)" if self.report else ""
            raise ValueError(f"{self.setting}: {e}{hint}") from None
        if better:
            self.best_weights = {k: t.detach().clone() for k, t in s.model.state_dict().items()}
        elif self.sel.should_stop:
            s.stop = self.stopped = True
        row["selected_step"] = self.sel.best_row["step"]

    def on_train_end(self, s: State) -> None:
        if self.best_weights is None:
            return
        cur = s.model.state_dict()
        # sharded tables: ranks other than 0 hold a 0-row table (the whole one is rank 0's)
        skip = [k for k, v in self.best_weights.items()
                if k in cur and cur[k].dim() and cur[k].shape[0] == 0 and v.shape != cur[k].shape]
        s.model.load_state_dict({k: v for k, v in self.best_weights.items() if k not in skip},
                                strict=not skip)
        if self.final is None:
            return
        row = self.best_row or {}
        save_checkpoint(s.run_dir / "checkpoints" / self.final, {
            "model": s.model.state_dict(), "step": int(row.get("step", 0)),
            "epoch": float(row.get("epoch", 0.0)), "selected_on": self.key})

    def summary(self) -> dict[str, Any]:
        row = self.best_row or {}
        keep = ("step", "epoch", self.key, *self.report)
        return {"selected": {k: row[k] for k in keep if k in row} | {"on": self.key},
                "stopped_early": self.stopped}

    def state_dict(self) -> dict[str, Any]:
        return {**self.sel.state_dict(), "stopped": self.stopped,
                "best_weights": self.best_weights or {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sel.load_state_dict(state)
        self.stopped = bool(state["stopped"])
        self.best_weights = dict(state["best_weights"]) or None


def select_hook(cfg: Any) -> EarlyStopping | None:
    """The hook applying ``pretrain``'s ``select.*`` settings (a
    :class:`~oneepoch.pretrain.config.PretrainConfig`), or None when ``select.metric`` is off.

        >>> from oneepoch.config import load_config
        >>> from oneepoch.pretrain import PretrainConfig
        >>> select_hook(load_config(PretrainConfig, "pretrain", ["select.metric=test_hit@3"])).key
        'test_hit@3'
    """
    sc = cfg.select
    if not sc.metric:
        return None
    return EarlyStopping(key=sc.metric, patience=sc.patience, min_delta=sc.min_delta,
                         setting="select.metric")
