"""The multi-epoch CTR training loop, with dense evaluation, checkpoints, resume and hooks.

    >>> from oneepoch.config import load_config, TrainConfig
    >>> cfg = load_config(TrainConfig, "ctr", ["data.path=runs/demo/data"])   # doctest: +SKIP
    >>> result = train(cfg)                                                     # doctest: +SKIP
    >>> print(result.verdict.line())                                            # doctest: +SKIP

The loop itself is :class:`oneepoch.training.loop.Loop`, shared with ``pretrain``; this module
says what a CTR run trains (:func:`build`, :func:`~oneepoch.training.steps.build_step`), on
which batches and how it is evaluated. Hooks (:class:`~oneepoch.training.hooks.Hook`) are how
probes and remedies plug in; the trainer imports none of them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oneepoch.analysis import Verdict, one_epoch_verdict
from oneepoch.config import TrainConfig, check_device, to_dict
from oneepoch.data.batcher import Batcher
from oneepoch.data.dataset import CTRData, load_ctr, oov_shares
from oneepoch.data.risk import eval_buckets
from oneepoch.data.transforms import CARVED, apply_transforms
from oneepoch.io import atomic_write_json, check_writable_dir
from oneepoch.metrics import auc, bucket_metrics, gauc, logloss
from oneepoch.models.ctr import build_model
from oneepoch.runfolder import read_metrics
from oneepoch.training.checkpoint import check_state_shapes, load_checkpoint
from oneepoch.training.fused import FusedForward
from oneepoch.training.hooks import Hook, State
from oneepoch.training.loop import Loop, TrainingDiverged, eval_points, open_run
from oneepoch.training.optim import Optimizer, build_optimizer
from oneepoch.training.steps import build_step


@dataclass
class TrainResult:
    run_dir: Path
    metrics: list[dict[str, Any]]
    verdict: Verdict
    seconds: float


def set_threads(n: int) -> int:
    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def run_name(cfg: TrainConfig) -> str:
    if cfg.name:
        return cfg.name
    data = Path(cfg.data.path).name or "data"
    return f"{data}-{cfg.model.type}-{cfg.optim.name}{cfg.optim.lr:g}-s{cfg.seed}"


def epoch_order(n: int, epoch: int, shuffle: str, seed: int) -> np.ndarray:
    """Row order of one epoch: natural (none), one fixed permutation (once), or per epoch."""
    if shuffle == "none":
        return np.arange(n)
    if shuffle == "once":
        return np.random.default_rng([seed, 0]).permutation(n)
    if shuffle == "every":
        return np.random.default_rng([seed, epoch + 1]).permutation(n)
    raise ValueError(f"shuffle: unknown mode {shuffle!r} (choose none, once, every)")


def eval_steps(cfg: TrainConfig, steps_per_epoch: int) -> set[int]:
    """Global steps after which to evaluate (always including every epoch end)."""
    e = cfg.eval
    return eval_points(steps_per_epoch, cfg.epochs, e.per_epoch, e.every_steps, e.at_start)


@torch.inference_mode()
def predict(model: torch.nn.Module, batcher: Batcher, rows: np.ndarray | None = None
            ) -> np.ndarray:
    """Click probabilities for ``rows`` of the batcher's split (all rows by default)."""
    rows = np.arange(len(batcher)) if rows is None else rows
    fast = FusedForward.build(model)  # one native call (eval mode), else model(batch) below
    if fast is not None:
        return fast.predict(batcher, rows)
    was = model.training
    model.eval()
    out = np.empty(len(rows), dtype=np.float32)
    bs = batcher.batch_size
    for a in range(0, len(rows), bs):
        out[a:a + bs] = torch.sigmoid(model(batcher.get(rows[a:a + bs]))).float().cpu().numpy()
    model.train(was)
    return out


def evaluate(model: torch.nn.Module, batcher: Batcher, rows: np.ndarray | None,
             labels: np.ndarray, users: np.ndarray | None, prefix: str,
             buckets: tuple[np.ndarray, list[str]] | None = None,
             predict_fn: Callable[..., np.ndarray] = predict) -> dict[str, float]:
    """AUC, logloss, GAUC (with users) and per-bucket AUC and rows (with ``buckets``: each
    row's bucket index and the bucket names) of the model's predictions on these rows
    (``predict_fn``: across processes, each rank predicts a slice and they are gathered)."""
    p = predict_fn(model, batcher, rows)
    out = {f"{prefix}_auc": auc(labels, p), f"{prefix}_logloss": logloss(labels, p)}
    if users is not None:
        out[f"{prefix}_gauc"] = gauc(labels, p, users)
    if buckets is not None:
        out.update(bucket_metrics(labels, p, buckets[0], buckets[1], prefix))
    return out


def load_data(cfg: TrainConfig) -> CTRData:
    """Load the splits of ``cfg.data.path`` a run uses (train, test and a validation split)."""
    if not cfg.data.path:
        raise ValueError("data.path: no data set given (a folder with schema.yaml)")
    want = [cfg.data.train_split, cfg.data.test_split]
    return load_ctr(cfg.data.path, want + [cfg.data.valid_split] * bool(cfg.data.valid_split))


def prepare_data(cfg: TrainConfig, data: CTRData | None = None) -> CTRData:
    """Load ``cfg.data.path`` (unless given) and apply the configured transforms."""
    return apply_transforms(load_data(cfg) if data is None else data, cfg.data, cfg.seed)


def valid_split_name(cfg: TrainConfig) -> str | None:
    """The split evaluated as validation (``valid_*`` metrics), if any."""
    if cfg.data.valid_split:
        return cfg.data.valid_split
    return CARVED if cfg.data.valid_share > 0 else None


def build(cfg: TrainConfig, data: CTRData) -> tuple[torch.nn.Module, Optimizer]:
    """Model (optionally from ``cfg.init_from``, with ``cfg.freeze`` groups fixed) + optimizer."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.vocab_sizes, [data.field_vocab(f) for f in data.fields],
                        len(data.single_fields)).to(cfg.device)
    if cfg.init_from:
        ck = load_checkpoint(cfg.init_from, cfg.device, required=("model",))
        check_state_shapes(model.state_dict(), ck["model"], cfg.init_from)
        model.load_state_dict(ck["model"])
    groups = dict(model.param_groups())  # type: ignore[operator]
    for g in cfg.freeze:
        if g not in groups:
            raise ValueError(f"freeze: unknown parameter group {g!r} (choose {sorted(groups)})")
        for p in groups[g]:
            p.requires_grad_(False)
    return model, build_optimizer(model, cfg.optim)


def config_hooks(cfg: TrainConfig) -> list[str]:
    """The settings of ``cfg`` that a hook applies (``hooks_from_config`` builds them); train()
    refuses to ignore one silently."""
    return [k for k, on in (("init.embeddings", bool(cfg.init.embeddings)),
                            ("single_stage", cfg.single_stage.weight > 0),
                            ("early_stop", bool(cfg.early_stop.metric)),
                            ("meda", cfg.meda.enabled),
                            ("freq_lr", cfg.freq_lr.threshold > 0),
                            ("freeze_after", cfg.freeze_after.epoch > 0),
                            ("tracking", cfg.tracking != "none")) if on]


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB: ``VmHWM`` of ``/proc/self/status``
    on Linux (``ru_maxrss`` carries a parent's peak over fork + exec, so a worker process
    would report its launcher's), else ``ru_maxrss``."""
    import resource
    import sys

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1024 * 1024) if sys.platform == "darwin" else kb / 1024


def stopped_early(hooks: Sequence[Hook]) -> bool:
    """True when a hook ended the run on purpose (early stopping): it counts as finished."""
    return any(getattr(h, "stopped", False) for h in hooks)


@dataclass
class RunSetup:
    """A CTR run, checked and built, before anything is written (see :func:`setup_run`)."""

    cfg: TrainConfig
    run_dir: Path
    hooks: list[Hook]
    data: CTRData
    state: State
    batcher: Batcher
    evaluate: Callable[[], dict[str, Any]]
    batches: Callable[[int], Iterator[np.ndarray]]
    valid_split: str | None
    oov: dict[str, float]


def setup_run(cfg: TrainConfig, run_dir: str | Path | None = None, hooks: Sequence[Hook] = (),
              data: CTRData | None = None, parallel: Any = None) -> RunSetup:
    """Check everything a run needs (device, output folder, data, model, every hook's own
    requirements) and build it, writing nothing. ``train`` starts with it; ``compare`` calls it
    for each remedy before training any of them. With ``parallel`` (one rank of several),
    ranks other than 0 get a scratch folder and evaluation predictions are gathered."""
    check_device(cfg.device)
    set_threads(cfg.threads)
    run_dir = Path(run_dir or Path(cfg.out_dir) / run_name(cfg))
    if parallel is not None:  # rank 0 writes run_dir, the others a scratch folder
        parallel.set_threads(cfg.threads)
        run_dir = parallel.run_dir(run_dir)
    check_writable_dir(run_dir)
    hooks = list(hooks)
    missing = [k for k in config_hooks(cfg) if k not in {getattr(h, "applies", "") for h in hooks}]
    if missing:
        raise ValueError(f"{', '.join(missing)}: set, but no hook applies it; pass "
                         "hooks=oneepoch.remedies.hooks_from_config(cfg) (remedies) and "
                         "oneepoch.tracking.tracking_hooks(cfg) (tracking) to train()")
    if data is None:
        data = load_data(cfg)
    oov = oov_shares(data, cfg.data.test_split)  # before a filter / hash would inflate it
    data = apply_transforms(data, cfg.data, cfg.seed)
    model, opt = build(cfg, data)
    train_split, test_split = data.splits[cfg.data.train_split], data.splits[cfg.data.test_split]
    batcher = Batcher(train_split, cfg.batch_size, cfg.device)
    eval_train = Batcher(train_split, cfg.eval.batch_size, cfg.device)
    eval_test = Batcher(test_split, cfg.eval.batch_size, cfg.device)
    n_sub = min(cfg.eval.train_rows, len(train_split))
    sub = np.sort(np.random.default_rng([cfg.seed, 99]).choice(len(train_split), n_sub, False))
    sub_users = None if train_split.user is None else np.asarray(train_split.user[sub])
    vname = valid_split_name(cfg)
    valid = data.splits[vname] if vname else None
    eval_valid = Batcher(valid, cfg.eval.batch_size, cfg.device) if valid is not None else None
    b = eval_buckets(data, cfg.eval, cfg.data.train_split, cfg.data.test_split)
    buckets = None if b is None else (b[0], b[1])  # test AUC per ID-frequency bucket
    s = State(cfg, data, model, opt, run_dir, batcher.steps())
    for h in hooks:
        h.check(s)
    pred = predict
    if parallel is not None:
        parallel.check(hooks, s)
        pred = parallel.predict(predict)  # each rank a slice, then gathered

    def evaluate_now() -> dict[str, Any]:
        out = evaluate(model, eval_test, None, test_split.label, test_split.user, "test",
                       buckets, pred)
        out.update(evaluate(model, eval_train, sub, train_split.label[sub], sub_users, "train",
                            None, pred))
        if eval_valid is not None and valid is not None:
            out.update(evaluate(model, eval_valid, None, valid.label, valid.user, "valid",
                                None, pred))
        return out

    def batches(epoch: int) -> Iterator[np.ndarray]:
        return iter(batcher.epoch_rows(epoch_order(len(train_split), epoch, cfg.shuffle,
                                                   cfg.seed)))

    return RunSetup(cfg, run_dir, hooks, data, s, batcher, evaluate_now, batches, vname, oov)


def train(cfg: TrainConfig, run_dir: str | Path | None = None, hooks: Sequence[Hook] = (),
          resume: bool = False, data: CTRData | None = None, parallel: Any = None
          ) -> TrainResult:
    """Train ``cfg.epochs`` epochs with evaluation many times per epoch; see module doc.

    ``hooks`` plug probes and remedies in (build the config's own with
    :func:`oneepoch.remedies.hooks_from_config`). Everything that can be checked (settings,
    device, data, model, the checkpoint to resume from) is checked before the run folder is
    touched (:func:`setup_run`); the folder is locked while the run writes it.

    ``parallel``: this process's place in a run across processes (torchrun), e.g.
    ``oneepoch.distributed.DataParallelRun.from_env(cfg.device, cfg.threads)`` (``None`` on one
    process); then each rank trains its slice of every global batch (docs/distributed.md).
    The caller closes it.
    """
    if parallel is None:
        return _train(cfg, run_dir, hooks, resume, data, None)
    try:
        return _train(cfg, run_dir, hooks, resume, data, parallel)
    except BaseException as e:
        parallel.fail(e)  # the other ranks name this one when they stop
        raise


def _train(cfg: TrainConfig, run_dir: str | Path | None, hooks: Sequence[Hook], resume: bool,
           data: CTRData | None, dp: Any) -> TrainResult:
    t0 = time.time()
    out_dir = Path(run_dir or Path(cfg.out_dir) / run_name(cfg))
    r = setup_run(cfg, out_dir, hooks, data, dp)
    s, hooks, run_dir, vname = r.state, r.hooks, r.run_dir, r.valid_split
    model, opt = s.model, s.optimizer
    if dp is None:
        lock, ck = open_run(run_dir, to_dict(cfg), resume, model, s.steps_per_epoch, cfg.device)
        make_step = lambda: build_step(model, opt, r.batcher, hooks, s)  # noqa: E731
    else:  # batches stay global: the step trains this rank's slice of each
        lock, ck = dp.open_run(open_run, out_dir, to_dict(cfg), resume, model,
                               s.steps_per_epoch, cfg.device)
        make_step = lambda: dp.build_step(model, opt, r.batcher, hooks, s)  # noqa: E731
    try:
        loop = Loop(s, make_step, hooks, r.batches,
                    r.evaluate, cfg.epochs, eval_steps(cfg, s.steps_per_epoch),
                    cfg.checkpoint_keep, sync=getattr(opt, "sync", lambda: None),
                    progress=cfg.progress and (dp is None or dp.is_writer),
                    headline="test_auc", batch_size=cfg.batch_size, t0=t0)
        if ck is not None:
            loop.restore(ck)
        try:
            loop.run()
        except TrainingDiverged as e:
            base = {"step_path": loop.step.path, "step_path_reason": loop.step.reason}
            atomic_write_json(run_dir / "summary.json", {
                **base, "verdict": "invalid run: no verdict", "error": str(e), "steps": s.step,
                "finished": False, "seconds": time.time() - loop.t0})
            raise
        total = s.steps_per_epoch * cfg.epochs
        if not s.rows:
            raise ValueError(f"{run_dir}: no evaluation happened (eval settings?)")
        v = one_epoch_verdict([r["epoch"] for r in s.rows], [r["test_auc"] for r in s.rows],
                              [r["step"] for r in s.rows], cfg.min_drop)
        secs = time.time() - loop.t0
        base = {"step_path": loop.step.path, "step_path_reason": loop.step.reason}
        summary = {"verdict": v.line(), "verdict_detail": v.to_dict(), "seconds": secs,
                   "steps": s.step, "samples_per_s": s.step * cfg.batch_size / max(secs, 1e-9),
                   **base, "peak_rss_mib": peak_rss_mib(), "oov_test_share": r.oov,
                   "finished": s.step >= total or stopped_early(hooks)}
        if dp is not None:
            summary["world_size"] = dp.ctx.world_size
        if vname:
            summary["validation"] = {"split": vname, "rows": len(r.data.splits[vname]),
                                     "carved_by": cfg.data.valid_by if vname == CARVED else None}
        for h in hooks:
            summary.update(h.summary())
        atomic_write_json(run_dir / "summary.json", summary)
    finally:
        lock.release()
    return TrainResult(out_dir, s.rows, v, secs)


__all__ = ["Hook", "State", "TrainResult", "build", "epoch_order", "eval_steps", "predict",
           "prepare_data", "read_metrics", "run_name", "set_threads", "train"]
