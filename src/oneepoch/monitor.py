"""A monitor for your own training loop: evaluation inside the epoch, the best point's
weights, early stopping and the one-epoch verdict, without moving the model into
``oneepoch train``.

    >>> mon = Monitor("runs/mine", steps_per_epoch=len(loader), epochs=3,   # doctest: +SKIP
    ...               eval_sets={"test": test_batches}, model=model)
    >>> for epoch in range(3):                                              # doctest: +SKIP
    ...     for x, y in loader:
    ...         loss = loss_fn(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
    ...         if mon.step(loss):          # evaluates on its schedule; True = stop now
    ...             break
    >>> mon.finish()      # metrics.parquet, summary.json, report.html   # doctest: +SKIP

An *evaluation set* is anything that can be iterated more than once (a list, a
``DataLoader``) yielding ``(inputs, labels)`` or ``(inputs, labels, users)``: ``inputs`` go to
``predict`` (or ``model(adapter(inputs))``), which returns one score per row (logits by
default; ``output="probs"`` for probabilities); ``users`` (optional) give GAUC. Each set ``NAME``
adds ``NAME_auc``, ``NAME_logloss`` (and ``NAME_gauc``) to every evaluation row; the set named
``test`` is the one the verdict judges. :func:`folder_eval_sets` builds the sets ``oneepoch
train`` evaluates (the test split and a fixed train subsample) from a data-set folder.

What the monitor shares with ``oneepoch train`` (so the two give the same numbers): the
evaluation schedule (:func:`oneepoch.training.loop.eval_points`), the row format
(:func:`~oneepoch.training.loop.eval_row`), the metrics (:mod:`oneepoch.metrics`), the run
folder's lock and files (:func:`~oneepoch.training.loop.open_run`,
:func:`~oneepoch.runfolder.write_metrics`), the selection rule
(:class:`oneepoch.remedies.early_stopping.Selector`), the verdict
(:func:`oneepoch.analysis.one_epoch_verdict`) and the report
(:func:`oneepoch.report.run_report.build_report`), so ``oneepoch report`` overlays a monitored
run with any other.

Per-bucket AUC (test AUC by the training count of an ID field, as ``oneepoch train``'s
``eval.bucket_field``): :func:`folder_eval_sets` adds ``test_auc_<bucket>`` and
``test_n_<bucket>`` (:func:`oneepoch.metrics.bucket_metrics`). For sets of your own, the
extension point: ``EvalSet(batches, extra_metrics=fn)`` with ``fn(labels, probs) -> {name:
value}`` (numpy arrays of the whole set); each ``name`` is added to the row as ``SET_name``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from oneepoch.analysis import Verdict, one_epoch_verdict
from oneepoch.io import atomic_write_json, check_writable_dir
from oneepoch.metrics import auc, gauc, logloss
from oneepoch.remedies.early_stopping import Selector
from oneepoch.runfolder import RunLock, write_metrics
from oneepoch.training.checkpoint import load_checkpoint, save_checkpoint
from oneepoch.training.hooks import Hook, State, acts_per_step
from oneepoch.training.loop import TrainingDiverged, eval_points, eval_row, open_run

OUTPUTS = ("logits", "probs")
KEEP_BEST = ("memory", "disk", "none")


class MonitorError(ValueError):
    """Bad input to the monitor (a wrong score shape, NaN scores, a bad setting)."""


@dataclass
class EvalSet:
    """One evaluation set: ``batches`` is re-iterable (or a function returning a fresh
    iterable) and yields ``(inputs, labels)`` or ``(inputs, labels, users)``.

    ``extra_metrics(labels, probs) -> {name: value}``, if given, adds ``SET_name`` to each row
    (the extension point for per-bucket AUC).
    """

    batches: Iterable[Any] | Callable[[], Iterable[Any]]
    extra_metrics: Callable[[np.ndarray, np.ndarray], dict[str, float]] | None = None

    def __iter__(self):
        it = self.batches() if callable(self.batches) else self.batches
        return iter(it)


def ctr_metrics(labels: np.ndarray, probs: np.ndarray, users: np.ndarray | None,
                prefix: str) -> dict[str, float]:
    """``PREFIX_auc``, ``PREFIX_logloss`` and (with ``users``) ``PREFIX_gauc``: the metrics
    ``oneepoch train`` writes for each evaluated split."""
    out = {f"{prefix}_auc": auc(labels, probs), f"{prefix}_logloss": logloss(labels, probs)}
    if users is not None:
        out[f"{prefix}_gauc"] = gauc(labels, probs, users)
    return out


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def folder_eval_sets(path: str | Path, batch_size: int = 16_384, train_rows: int = 50_000,
                     seed: int = 0, train_split: str = "train", test_split: str = "test",
                     valid_split: str = "", device: str = "cpu", bucket_field: str = "auto",
                     bucket_bounds: Sequence[int] = (5, 50)) -> dict[str, EvalSet]:
    """The evaluation sets ``oneepoch train`` uses, from a data-set folder: ``test`` (the
    whole test split, in order, with per-bucket AUC of ``bucket_field`` as
    ``eval.bucket_field`` / ``eval.bucket_bounds``; ``""`` = off), ``train`` (a fixed
    subsample of ``train_rows`` rows drawn with ``seed``, as ``eval.train_rows``) and, with
    ``valid_split``, ``valid``. Inputs are :class:`oneepoch.data.batcher.Batch` es of
    ``batch_size`` rows (the models of :mod:`oneepoch.models.ctr` take them; give the monitor
    an ``adapter`` for your own)."""
    from types import SimpleNamespace

    from oneepoch.data.batcher import Batcher
    from oneepoch.data.dataset import load_ctr
    from oneepoch.data.risk import eval_buckets
    from oneepoch.metrics import bucket_metrics

    want = [train_split, test_split] + ([valid_split] if valid_split else [])
    data = load_ctr(path, want)
    b = eval_buckets(data, SimpleNamespace(bucket_field=bucket_field,
                                           bucket_bounds=list(bucket_bounds)),
                     train_split, test_split)

    def per_bucket(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
        assert b is not None
        out = bucket_metrics(y, p, b[0], b[1], "test")
        return {k[len("test_"):]: v for k, v in out.items()}

    def batches(split: Any, rows: np.ndarray | None,
                extra: Callable[[np.ndarray, np.ndarray], dict[str, float]] | None = None
                ) -> EvalSet:
        bt = Batcher(split, batch_size, device)
        labels = split.label if rows is None else split.label[rows]
        users = None if split.user is None else np.asarray(
            split.user if rows is None else split.user[rows])
        idx = np.arange(len(split)) if rows is None else rows

        def gen() -> Iterable[tuple[Any, ...]]:
            for a in range(0, len(idx), batch_size):
                sl = slice(a, a + batch_size)
                yield (bt.get(idx[sl]), labels[sl]) + (() if users is None else (users[sl],))

        return EvalSet(gen, extra)

    tr = data.splits[train_split]
    n_sub = min(train_rows, len(tr))
    sub = np.sort(np.random.default_rng([seed, 99]).choice(len(tr), n_sub, False))
    out = {"test": batches(data.splits[test_split], None, per_bucket if b is not None else None),
           "train": batches(tr, sub)}
    if valid_split:
        out["valid"] = batches(data.splits[valid_split], None)
    return out


class Monitor:
    """Evaluation, best point, early stopping and verdict for a training loop you own.

    Args:
        run_dir: the run folder to write (locked while the monitor is open).
        steps_per_epoch: optimizer steps in one epoch (``len(train_loader)``).
        eval_sets: ``{name: iterable}`` (see the module doc), or one iterable (named
            ``test``). One set must be named ``test``: the verdict judges ``test_auc``.
        predict: ``predict(inputs) -> scores``, one score per row. Give this, or ``model``.
        model: your ``torch.nn.Module``; needed for the best point's weights. Without
            ``predict`` the monitor scores ``model(adapter(inputs))`` in eval mode (and puts
            the model back in train mode afterwards).
        adapter: turns an evaluation set's inputs into what ``model`` takes.
        output: ``"logits"`` (a sigmoid is applied) or ``"probs"`` (scores in [0, 1]).
        epochs: epochs you will train (None: open-ended; the schedule extends itself).
        per_epoch, every_steps, at_start: the evaluation schedule, as ``eval.*`` of
            ``oneepoch train`` (20 evaluations per epoch, every epoch end, and step 0).
        select_on: the row key the best point is chosen on (default ``valid_auc`` when a
            ``valid`` set is given, else ``test_auc``); ``*_logloss`` keys are minimised.
        patience, min_delta: early stopping (:class:`~oneepoch.remedies.early_stopping.Selector`):
            :attr:`should_stop` turns true after ``patience`` evaluations without an
            improvement of more than ``min_delta`` (0 = never).
        keep_best: keep the best point's ``state_dict`` in ``"memory"`` (a copy on the model's
            device), on ``"disk"`` (``RUN/checkpoints/best``, safetensors) or ``"none"``.
        min_drop: the verdict's threshold (as ``min_drop`` of ``oneepoch train``).
        config: your settings, written to ``RUN/config.yaml`` beside the monitor's own.
        batch_size: rows per training step (for ``samples_per_s`` in the summary).
        hooks: :class:`~oneepoch.training.hooks.Hook` s called on start, each evaluation
            and finish (e.g. :class:`oneepoch.tracking.TrackingHook`).
        tracking, tracking_uri: stream each evaluation to ``"tensorboard"`` or ``"mlflow"``
            (see :mod:`oneepoch.tracking`).
        sync: called before each evaluation and before the best weights are kept: brings
            lazily updated state up to date (``oneepoch``'s optimizer: ``sync=opt.sync``, as
            ``oneepoch train`` does; plain torch optimizers need none).
    """

    def __init__(self, run_dir: str | Path, steps_per_epoch: int,
                 eval_sets: Mapping[str, Iterable[Any]] | Iterable[Any], *,
                 predict: Callable[[Any], Any] | None = None,
                 model: torch.nn.Module | None = None,
                 adapter: Callable[[Any], Any] | None = None, output: str = "logits",
                 epochs: int | None = None, per_epoch: int = 20, every_steps: int = 0,
                 at_start: bool = True, select_on: str | None = None, patience: int = 0,
                 min_delta: float = 0.0, keep_best: str = "memory", min_drop: float = 0.005,
                 config: Mapping[str, Any] | None = None, batch_size: int | None = None,
                 hooks: Sequence[Hook] = (), tracking: str = "none",
                 tracking_uri: str = "", sync: Callable[[], Any] | None = None) -> None:
        self.t0 = time.time()
        if int(steps_per_epoch) < 1:
            raise MonitorError(f"steps_per_epoch: must be >= 1, got {steps_per_epoch}")
        if epochs is not None and int(epochs) < 1:
            raise MonitorError(f"epochs: must be >= 1 (or None), got {epochs}")
        if per_epoch < 1 or every_steps < 0:
            raise MonitorError("per_epoch must be >= 1 and every_steps >= 0")
        if output not in OUTPUTS:
            raise MonitorError(f"output: got {output!r}; choose {', '.join(OUTPUTS)}")
        if keep_best not in KEEP_BEST:
            raise MonitorError(f"keep_best: got {keep_best!r}; choose {', '.join(KEEP_BEST)}")
        if predict is None and model is None:
            raise MonitorError("give predict=callable(inputs) -> scores, or model=your module")
        if keep_best != "none" and model is None:
            raise MonitorError("keep_best: keeping the best point's weights needs model=; pass "
                               "model=your module, or keep_best='none'")
        if not isinstance(eval_sets, Mapping):
            eval_sets = {"test": eval_sets}
        if "test" not in eval_sets:
            raise MonitorError(f"eval_sets: need a set named 'test' (the verdict judges "
                               f"test_auc); got {', '.join(map(str, eval_sets)) or 'none'}")
        self.sets = {str(k): v if isinstance(v, EvalSet) else EvalSet(v)
                     for k, v in eval_sets.items()}
        self.model, self.adapter, self.output = model, adapter, output
        self.sync = sync
        self._predict = predict
        self.spe, self.epochs = int(steps_per_epoch), epochs
        self._sched = dict(per_epoch=per_epoch, every_steps=every_steps, at_start=at_start)
        self._covered = int(epochs) if epochs else 4
        self._evals = eval_points(self.spe, self._covered, **self._sched)
        key = select_on or ("valid_auc" if "valid" in self.sets else "test_auc")
        self.selector = Selector(key, -1 if key.endswith("logloss") else +1, patience,
                                 min_delta)
        self.keep_best, self.min_drop, self.batch_size = keep_best, min_drop, batch_size
        self.best_weights: dict[str, torch.Tensor] | None = None
        hooks = list(hooks)
        if tracking != "none":
            from oneepoch.tracking import TrackingHook
            hooks.append(TrackingHook(tracking, tracking_uri, report=False))
        self.hooks = hooks
        self._per_step = acts_per_step(hooks)
        self._loss_sum, self._n_loss = 0.0, 0
        self.finished = False
        run_dir = Path(run_dir)
        check_writable_dir(run_dir)
        settings = {"source": "oneepoch.monitor", "steps_per_epoch": self.spe,
                    "epochs": epochs, "min_drop": min_drop,
                    "eval": {**self._sched, "sets": list(self.sets)},
                    "select_on": key, "patience": patience, "min_delta": min_delta}
        full = {**dict(config or {}), "monitor": settings, "min_drop": min_drop}
        if tracking != "none":
            full |= {"tracking": tracking, "tracking_uri": tracking_uri}
        try:
            yaml.safe_dump(full)
        except yaml.YAMLError as e:
            raise MonitorError(f"config: must hold plain values (numbers, text, lists, "
                               f"mappings) to be written to config.yaml: {e}") from None
        self.state = State(full, None, model, None, run_dir, self.spe)
        for h in self.hooks:
            h.check(self.state)
        self._lock: RunLock | None
        self._lock, _ = open_run(run_dir, full, False, model, self.spe)
        try:
            for h in self.hooks:
                h.on_train_start(self.state)
            if at_start:
                self.evaluate()
        except BaseException:
            self._release()
            raise

    # ------------------------------------------------------------------ the loop's calls

    @property
    def run_dir(self) -> Path:
        return self.state.run_dir

    @property
    def steps(self) -> int:
        """Steps done so far (calls of :meth:`step`)."""
        return self.state.step

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The evaluation rows so far (as in ``metrics.parquet``)."""
        return self.state.rows

    @property
    def should_stop(self) -> bool:
        """True once the early-stopping rule fired (``patience`` evaluations without
        improvement); the loop should stop."""
        return self.selector.should_stop

    def step(self, loss: float | torch.Tensor | None = None) -> bool:
        """Count one training step (``loss``: its training loss, optional); evaluate when the
        schedule says so. Returns :attr:`should_stop`."""
        s = self.state
        s.step += 1
        if loss is not None:
            v = float(loss.detach() if isinstance(loss, torch.Tensor) else loss)
            if not math.isfinite(v):
                raise TrainingDiverged(
                    f"{s.run_dir}: training loss is {v} at step {s.step} (epoch "
                    f"{s.step / self.spe:.2f}): the run diverged; no verdict is given")
            s.loss = v
            self._loss_sum += v
            self._n_loss += 1
        if self._per_step:
            s.epoch = (s.step - 1) // self.spe
            for h in self.hooks:
                h.after_step(s)
        if s.step > self._covered * self.spe:
            self._covered *= 2
            self._evals = eval_points(self.spe, self._covered, **self._sched)
        if s.step in self._evals:
            self.evaluate()
        return self.selector.should_stop

    # ------------------------------------------------------------------ evaluation

    def _scores(self, inputs: Any) -> Any:
        if self._predict is not None:
            return self._predict(inputs)
        assert self.model is not None
        return self.model(self.adapter(inputs) if self.adapter is not None else inputs)

    def _score_set(self, name: str, es: EvalSet) -> tuple[np.ndarray, np.ndarray,
                                                          np.ndarray | None]:
        where = f"evaluation at step {self.state.step} (set {name!r}"
        probs, labels, users = [], [], []
        for i, item in enumerate(es):
            if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
                raise MonitorError(f"{where}, batch {i}): expected (inputs, labels) or (inputs, "
                                   f"labels, users), got {type(item).__name__}")
            y = _numpy(item[1]).reshape(-1)
            raw = self._scores(item[0])
            t = raw if isinstance(raw, torch.Tensor) else torch.as_tensor(np.asarray(raw))
            if t.dim() == 2 and t.shape[1] == 1:
                t = t[:, 0]
            if t.dim() != 1 or t.shape[0] != len(y):
                raise MonitorError(
                    f"{where}, batch {i}): predict returned shape {tuple(t.shape)}; expected "
                    f"({len(y)},) (one score per row of the batch's {len(y)} labels)")
            p = torch.sigmoid(t) if self.output == "logits" else t
            probs.append(p.float().cpu().numpy())
            labels.append(y)
            if len(item) == 3:
                users.append(_numpy(item[2]).reshape(-1))
        if not probs:
            raise MonitorError(f"{where}): the set yielded no batches (an iterator that is "
                               "used up? give a list, a DataLoader or a function)")
        p_all, y_all = np.concatenate(probs), np.concatenate(labels)
        bad = ~np.isfinite(p_all)
        if bad.any():
            raise MonitorError(f"{where}): {int(bad.sum())} of {len(p_all)} scores are NaN or "
                               f"infinite (first at row {int(np.flatnonzero(bad)[0])})")
        if self.output == "probs" and (p_all.min() < 0 or p_all.max() > 1):
            raise MonitorError(f"{where}): output='probs' but scores range over "
                               f"[{p_all.min():g}, {p_all.max():g}]; use output='logits'")
        u_all = np.concatenate(users) if len(users) == len(probs) else None
        return p_all, y_all, u_all

    def evaluate(self) -> dict[str, Any]:
        """Evaluate now (the schedule calls this; you may call it too); returns the row."""
        s, m = self.state, self.model
        if self.sync is not None:
            self.sync()
        metrics: dict[str, Any] = {}
        was = m.training if m is not None else False
        try:
            if m is not None and self._predict is None:
                m.eval()
            with torch.inference_mode():
                for name, es in self.sets.items():
                    p, y, u = self._score_set(name, es)
                    metrics.update(ctr_metrics(y, p, u, name))
                    if es.extra_metrics is not None:
                        metrics.update({f"{name}_{k}": v
                                        for k, v in es.extra_metrics(y, p).items()})
        finally:
            if m is not None and self._predict is None:
                m.train(was)
        row = eval_row(s.step, s.step / self.spe, metrics, self._loss_sum, self._n_loss,
                       self.t0)
        self._loss_sum, self._n_loss = 0.0, 0
        sel = self.selector
        if sel.key not in row:
            raise MonitorError(f"select_on: {sel.key!r} is not a metric of the evaluation rows "
                               f"({', '.join(k for k in row if k != 'step')})")
        if sel.update(row, f"at the evaluation at step {s.step}") and self.keep_best != "none":
            self._keep(row)
        for h in self.hooks:
            h.on_eval(s, row)
        s.rows.append(row)
        write_metrics(s.run_dir, s.rows)
        return row

    def _keep(self, row: dict[str, Any]) -> None:
        assert self.model is not None
        sd = self.model.state_dict()
        if self.keep_best == "memory":
            self.best_weights = {k: t.detach().clone() for k, t in sd.items()}
        else:
            save_checkpoint(self.run_dir / "checkpoints" / "best", {
                "model": sd, "step": int(row["step"]), "epoch": float(row["epoch"]),
                "selected_on": self.selector.key})

    # ------------------------------------------------------------------ results

    @property
    def best(self) -> dict[str, Any] | None:
        """The best evaluation row so far (by ``select_on``)."""
        return self.selector.best_row

    def best_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's ``state_dict`` at the best point (bit-identical copies)."""
        if self.keep_best == "memory" and self.best_weights is not None:
            return self.best_weights
        if self.keep_best == "disk" and (self.run_dir / "checkpoints" / "best").exists():
            return load_checkpoint(self.run_dir / "checkpoints" / "best")["model"]
        raise MonitorError("best_state_dict: no best point kept (keep_best='none', or no "
                           "evaluation yet)")

    def restore_best(self, model: torch.nn.Module | None = None) -> dict[str, Any]:
        """Load the best point's weights into ``model`` (default: the monitored model);
        returns the best row."""
        target = model if model is not None else self.model
        if target is None:
            raise MonitorError("restore_best: no model to load the weights into")
        target.load_state_dict(self.best_state_dict())
        return dict(self.best or {})

    def verdict(self) -> Verdict:
        """The one-epoch verdict on the test AUC so far (live)."""
        r = self.state.rows
        return one_epoch_verdict([x["epoch"] for x in r], [x["test_auc"] for x in r],
                                 [x["step"] for x in r], self.min_drop)

    def finish(self, report: bool = True) -> Verdict:
        """End the run: evaluate once more if the last step was not evaluated, write
        ``summary.json`` (verdict, best point, timing), ``curves.png`` and ``report.html``,
        call the hooks' ``on_train_end`` and release the run folder."""
        if self.finished:
            return self.verdict()
        s = self.state
        try:
            if not s.rows or s.rows[-1]["step"] != s.step:
                self.evaluate()
            v = self.verdict()
            secs = time.time() - self.t0
            best = self.best or {}
            keep = ("step", "epoch", self.selector.key, "test_auc", "test_logloss", "test_gauc")
            summary = {"verdict": v.line(), "verdict_detail": v.to_dict(), "seconds": secs,
                       "steps": s.step, "step_path": "user loop (oneepoch.monitor)",
                       "step_path_reason": "", "finished": True,
                       "selected": {k: best[k] for k in keep if k in best}
                       | {"on": self.selector.key},
                       "stopped_early": self.selector.should_stop}
            if self.batch_size:
                summary["samples_per_s"] = s.step * self.batch_size / max(secs, 1e-9)
            for h in self.hooks:
                summary.update(h.summary())
            atomic_write_json(s.run_dir / "summary.json", summary)
            if report:
                from oneepoch.report.run_report import build_report

                build_report([s.run_dir])
            for h in self.hooks:
                h.on_train_end(s)
            self.finished = True
        finally:
            self._release()
        return v

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def close(self) -> None:
        """Release the run folder without finishing (an interrupted run: no summary)."""
        self._release()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.close()


__all__ = ["EvalSet", "Monitor", "MonitorError", "ctr_metrics", "folder_eval_sets"]
