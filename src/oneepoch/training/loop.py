"""The loop skeleton every training loop shares (``train``, ``pretrain``, later ones): the run
folder's life (checks, lock, resume, ``config.yaml``), the evaluation schedule, metrics
writing, epoch checkpoints and hooks. What differs between loops is handed in: a *step*
object that trains batches (:class:`Step`), the batches of an epoch, and an evaluation
function.

    >>> evals = eval_points(steps_per_epoch=10, epochs=2, per_epoch=2)
    >>> sorted(evals)
    [0, 5, 10, 15, 20]

The loop, as :meth:`Loop.run` reads::

    for each epoch:
        hooks.on_epoch_start
        while the epoch has batches:
            losses = step.run(batches, limit)     # 1..limit batches; limit = to the next eval
            for each loss: step += 1, hooks.after_step, evaluate at the scheduled points
        checkpoint (model, optimizer, RNG, hooks' and step's state, rows, clock)

A step that holds state outside the model (ID tables sharded across ranks) plugs into the
checkpoints at one place: with a method ``save_checkpoint(path, state)`` it writes the epoch
checkpoints itself (its tables with ``torch.distributed.checkpoint``, the rest through
:func:`~oneepoch.training.checkpoint.save_checkpoint`); with ``load_tables(path)`` it reads a
checkpoint's ``tables.dcp/`` itself at resume. A step without them gets a checkpoint's DCP
tables whole (any number of processes may have written them).
"""

from __future__ import annotations

import bisect
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from oneepoch.io import atomic_write_text
from oneepoch.runfolder import RunLock, read_metrics, write_metrics
from oneepoch.training.checkpoint import (
    clear_run_state,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    put_tensors,
    read_dcp,
    restore_optim_keys,
    save_checkpoint,
)
from oneepoch.training.hooks import Hook, State, acts_per_step, hook_key


class TrainingDiverged(RuntimeError):
    """A training loss was NaN or infinite: the run stops, and no verdict is given."""


class ResumeError(ValueError):
    """A checkpoint that does not fit this run's settings."""


class Step(Protocol):
    """Trains batches. ``path`` is ``"fused"`` or ``"autograd"``; ``reason`` says why a run
    took the autograd path (empty on the fused one)."""

    path: str
    reason: str

    def run(self, batches: Iterator[np.ndarray], limit: int) -> list[float]:
        """Train the next 1..``limit`` batches of ``batches`` (row indices); their losses
        (``[]`` when ``batches`` is exhausted)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class OneBatchStep:
    """A :class:`Step` that trains one batch per call (``one(rows) -> loss``, defined by the
    subclass) and keeps no state of its own."""

    path = "autograd"
    reason = ""

    def one(self, rows: np.ndarray) -> float:
        raise NotImplementedError

    def run(self, batches: Iterator[np.ndarray], limit: int) -> list[float]:
        rows = next(batches, None)
        return [] if rows is None else [self.one(rows)]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def eval_points(steps_per_epoch: int, epochs: int, per_epoch: int, every_steps: int = 0,
                at_start: bool = True) -> set[int]:
    """Global steps after which to evaluate: ``per_epoch`` evenly spaced points per epoch
    (or every ``every_steps`` steps), every epoch end, and step 0 if ``at_start``."""
    total = steps_per_epoch * epochs
    pts: set[int] = {0} if at_start else set()
    if every_steps > 0:
        pts |= set(range(every_steps, total + 1, every_steps))
    else:
        k = max(1, per_epoch)
        for e in range(epochs):
            pts |= {e * steps_per_epoch + round(j * steps_per_epoch / k) for j in range(1, k + 1)}
    pts |= {e * steps_per_epoch for e in range(1, epochs + 1)}
    return pts


def eval_row(step: int, epoch: float, metrics: dict[str, Any], loss_sum: float, n_loss: int,
             t0: float) -> dict[str, Any]:
    """One row of ``metrics.parquet``: where (``step``, ``epoch``), the evaluation's metrics,
    ``train_loss`` (mean over the ``n_loss`` steps since the last evaluation; None if none)
    and ``elapsed_s`` since ``t0``. Shared by :class:`Loop` and :mod:`oneepoch.monitor`."""
    row: dict[str, Any] = {"step": step, "epoch": epoch}
    row.update(metrics)
    row["train_loss"] = loss_sum / n_loss if n_loss else None
    row["elapsed_s"] = time.time() - t0
    return row


def checkpoint_steps_per_epoch(ck: dict[str, Any]) -> int | None:
    """Steps per epoch of the run that wrote ``ck`` (older checkpoints lack the key: they are
    written at epoch ends, so step / epoch)."""
    if "steps_per_epoch" in ck:
        return int(ck["steps_per_epoch"])
    step, epoch = int(ck.get("step", 0)), int(ck.get("epoch", 0))
    return step // epoch if epoch else None


def check_checkpoint(ck: dict[str, Any], path: Path, model: torch.nn.Module,
                     steps_per_epoch: int) -> None:
    """Refuse a checkpoint whose tables or steps per epoch do not fit this run."""
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ck.get("model", {}).items()}
    shapes = (ck.get("tables_dcp") or {}).get("shapes", {})  # sharded tables (DCP)
    got.update({k[6:]: tuple(v) for k, v in shapes.items() if k.startswith("model/")})
    spe = checkpoint_steps_per_epoch(ck)
    if got != have:
        diff = sorted(k for k in set(have) | set(got) if have.get(k) != got.get(k))
        raise ResumeError(
            f"{path}: cannot resume: the checkpoint's tensors do not fit this run's model "
            f"({', '.join(f'{k}: {got.get(k)} vs {have.get(k)}' for k in diff[:4])}); "
            "resume with the run's own settings (model sizes and the data must not change)")
    if spe is not None and spe != steps_per_epoch:
        raise ResumeError(
            f"{path}: cannot resume: the checkpoint has {spe} steps per epoch, these settings "
            f"give {steps_per_epoch} (batch_size or the data changed); resume with the run's "
            "own batch_size")


def check_same_optimizer(run_dir: Path, config: dict[str, Any]) -> None:
    """Refuse resuming with another optimizer than the run's own (its state would not carry
    over: Adam's moments are not Adagrad's accumulators)."""
    try:
        old = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return  # no readable earlier settings: the checkpoint's own checks stand
    was = (old.get("optim") or {}).get("name") if isinstance(old, dict) else None
    now = (config.get("optim") or {}).get("name")
    if was and now and was != now:
        raise ResumeError(
            f"{run_dir}: cannot resume with optim.name={now}: the run was trained with "
            f"optim.name={was}, whose state does not carry over; resume with optim.name={was}, "
            "or start a new run" + (" from its weights (init_from=...)" if "init_from" in config
                                    else ""))


RESUME_KEYS = ("model", "optim.sparse", "optim.dense", "torch_rng", "step", "epoch")


def open_run(run_dir: Path, config: dict[str, Any], resume: bool, model: torch.nn.Module,
             steps_per_epoch: int, device: str = "cpu") -> tuple[RunLock, dict[str, Any] | None]:
    """Take the run folder: lock it, check the checkpoint to resume from (if any) or forget an
    earlier run's checkpoints, then write ``config.yaml``. Call it after every setting, the
    data and the model have been checked, so a failed start leaves the folder as it was.
    Returns the lock (release it when done) and the checkpoint to resume from."""
    lock = RunLock(run_dir).acquire()
    try:
        ck = None
        paths = list_checkpoints(run_dir) if resume else []
        if paths:
            ck = load_checkpoint(paths[-1], device, required=RESUME_KEYS)
            check_checkpoint(ck, paths[-1], model, steps_per_epoch)
            check_same_optimizer(run_dir, config)
        elif not resume:
            clear_run_state(run_dir)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    except BaseException:
        lock.release()
        raise
    return lock, ck


@dataclass
class Loop:
    """One training run's loop (see the module doc). Build it, optionally :meth:`restore` a
    checkpoint, then :meth:`run`.

    Args:
        state: what hooks see (model, optimizer, data, run folder, counters, rows).
        step: trains batches (:class:`Step`), or a function returning one: it is then built
            after the hooks' ``on_train_start`` (which may change what the step can do).
        hooks: called at the points :class:`~oneepoch.training.hooks.Hook` names.
        batches: ``epoch -> iterator of row-index arrays`` (the epoch's batches in order).
        evaluate: the metrics of the model as it is now (``{name: value}``).
        epochs, evals: how long to train and the global steps after which to evaluate.
        checkpoint_keep: epoch checkpoints kept (0 = all).
        sync: brings lazily updated state up to date before the model is read (evaluation,
            checkpoint, export); e.g. the dense Adam catch-up of the ID tables. A step with a
            ``refresh`` method (sharded tables) is asked instead (:meth:`bring_up_to_date`).
        extra_state: more to save in each checkpoint (restored by the caller).
        progress, unit, batch_size: the progress bar.
    """

    state: State
    step: Any  # a Step, or a function that builds it after the hooks' on_train_start
    hooks: list[Hook]
    batches: Callable[[int], Iterator[np.ndarray]]
    evaluate: Callable[[], dict[str, Any]]
    epochs: int
    evals: set[int]
    checkpoint_keep: int = 2
    sync: Callable[[], None] = lambda: None
    extra_state: Callable[[], dict[str, Any]] = dict
    progress: bool = False
    headline: str = ""  # metric shown on the progress bar
    unit: str = "sample"
    batch_size: int = 1
    t0: float = field(default_factory=time.time)

    def restore(self, ck: dict[str, Any]) -> None:
        """Continue from checkpoint ``ck`` (checked by :func:`open_run`): weights, optimizer,
        RNG, hooks' and step's state, evaluation rows, counters and clock."""
        s = self.state
        tables = ck.get("tables_dcp")
        if tables is not None:  # sharded tables: the step's shards, or here whole
            load = getattr(self.step, "load_tables", None)
            ck = put_tensors(ck, load(tables["path"]) if load else read_dcp(tables["path"]))
        s.model.load_state_dict(ck["model"])
        s.optimizer.load_state_dict({"sparse": ck["optim"]["sparse"],
                                     "dense": restore_optim_keys(ck["optim"]["dense"])})
        torch.set_rng_state(ck["torch_rng"])
        s.step, s.epoch = int(ck["step"]), int(ck["epoch"])
        rows = ck.get("rows")
        if rows is None:  # checkpoints of older versions: the rows up to it from the metrics
            rows = [r for r in read_metrics(s.run_dir) if r["step"] <= s.step]
        s.rows = list(rows)
        saved = ck.get("hooks", {})
        for i, h in enumerate(self.hooks):
            key = hook_key(i, h)
            if key in saved:
                h.load_state_dict(saved[key])
            elif h.state_dict():
                warnings.warn(f"resume: the checkpoint holds no state for hook {key}; it "
                              "starts afresh", stacklevel=2)
        self._step_state = ck.get("step_state")
        if self._step_state is not None and hasattr(self.step, "run"):
            self.step.load_state_dict(self._step_state)
        self.t0 -= float(ck.get("elapsed_s", 0.0))
        write_metrics(s.run_dir, s.rows)

    def _limit(self, marks: list[int], per_step: bool) -> int:
        """Steps the next call may train: to the next evaluation or epoch end (1 when a hook
        must see every step)."""
        if per_step:
            return 1
        s = self.state
        end = min(marks[bisect.bisect_right(marks, s.step)] if s.step < marks[-1] else
                  s.step + 1, (s.epoch + 1) * s.steps_per_epoch)
        return max(1, end - s.step)

    def bring_up_to_date(self) -> None:
        """Before the model is read: a step holding the tables elsewhere (sharded) refreshes
        the model's copy (its ``refresh``); else the loop's ``sync``."""
        (getattr(self.step, "refresh", None) or self.sync)()

    def _evaluate(self, loss_sum: float, n_loss: int) -> None:
        s = self.state
        self.bring_up_to_date()
        row = eval_row(s.step, s.epoch_float, self.evaluate(), loss_sum, n_loss, self.t0)
        for h in self.hooks:
            h.on_eval(s, row)
        s.rows.append(row)
        write_metrics(s.run_dir, s.rows)

    def _checkpoint(self, epoch: int) -> None:
        s = self.state
        self.bring_up_to_date()
        save = getattr(self.step, "save_checkpoint", save_checkpoint)  # sharded tables: DCP
        save(s.run_dir / "checkpoints" / f"epoch-{epoch:03d}", {
            "model": s.model.state_dict(), "optim": s.optimizer.state_dict(), "step": s.step,
            "epoch": epoch, "steps_per_epoch": s.steps_per_epoch,
            "torch_rng": torch.get_rng_state(), "rows": s.rows,
            "elapsed_s": time.time() - self.t0,
            "hooks": {hook_key(i, h): h.state_dict() for i, h in enumerate(self.hooks)},
            "step_state": self.step.state_dict(), **self.extra_state()})
        prune_checkpoints(s.run_dir, self.checkpoint_keep)

    def run(self) -> None:
        """Train from where the state is to the end (or until a hook sets ``state.stop``)."""
        s, hooks = self.state, self.hooks
        marks, per_step = sorted(self.evals), acts_per_step(hooks)
        total = s.steps_per_epoch * self.epochs
        for h in hooks:
            h.on_train_start(s)
        if not hasattr(self.step, "run"):
            self.step = self.step()
            if getattr(self, "_step_state", None) is not None:
                self.step.load_state_dict(self._step_state)
        if s.step == 0 and 0 in self.evals:
            self._evaluate(0.0, 0)
        bar = tqdm(total=total * self.batch_size, initial=min(s.step, total) * self.batch_size,
                   unit=self.unit, unit_scale=True, disable=not self.progress,
                   dynamic_ncols=True, mininterval=1.0, desc=s.run_dir.name)
        s.model.train()
        for epoch in range(s.epoch, self.epochs):
            s.epoch = epoch
            for h in hooks:
                h.on_epoch_start(s)
            batches, loss_sum, n_loss = self.batches(epoch), 0.0, 0
            while not s.stop:
                losses = self.step.run(batches, self._limit(marks, per_step))
                if not losses:
                    break
                for loss in losses:
                    if not math.isfinite(loss):
                        raise TrainingDiverged(
                            f"{s.run_dir}: training loss is {loss} at step {s.step + 1} "
                            f"(epoch {(s.step + 1) / s.steps_per_epoch:.2f}): the run "
                            "diverged; no verdict is given (lower optim.lr?)")
                    s.step, s.loss = s.step + 1, loss
                    loss_sum, n_loss = loss_sum + loss, n_loss + 1
                    for h in hooks:
                        h.after_step(s)
                    if s.step in self.evals:
                        self._evaluate(loss_sum, n_loss)
                        loss_sum, n_loss = 0.0, 0
                        head = s.rows[-1].get(self.headline)
                        bar.set_postfix(epoch=f"{s.epoch_float:.2f}", **(
                            {self.headline: f"{head:.4f}"} if head is not None else {}))
                bar.update(len(losses) * self.batch_size)
            if s.stop:
                break
            self._checkpoint(epoch + 1)
        bar.close()
        for h in hooks:
            h.on_train_end(s)
