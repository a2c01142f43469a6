"""The stage-1 training loop: multi-epoch, row-wise sparse updates, evaluation several times
per epoch, export of the tables at the end.

    >>> from oneepoch.config import load_config
    >>> cfg = load_config(PretrainConfig, "pretrain", ["data.path=runs/hsu2024/data/engagements"])
    >>> res = pretrain(cfg)                                          # doctest: +SKIP
    >>> res.metrics[-1]["test_hit@3"], res.export_dir                # doctest: +SKIP

Each evaluation row (``RUN/metrics.parquet``) holds, for the held-out pairs (``test_``) and a
fixed subset of training pairs (``train_``): ``hit@K``, ``recall@K``, ``ndcg@K`` against the
full catalogue, ``full_loss`` (full-catalogue softmax) and ``sampled_loss`` (the training loss
with fixed negatives); plus ``train_loss`` (mean over the steps since the last evaluation),
``tau``, ``epoch``, ``step``, ``elapsed_s`` and ``pairs_per_s`` (training steps only).

Each epoch end writes ``RUN/checkpoints/epoch-NNN/`` atomically (``checkpoint_keep`` kept): the
tables and temperature, the row-wise optimizer state with its step counts, the torch RNG and
negative-sampling generator states, the evaluation rows so far and the step / epoch counters, in
safetensors + JSON (:mod:`oneepoch.training.checkpoint`). ``pretrain(cfg, run_dir,
resume=True)`` continues from the latest one and ends with the tables and metrics of an
uninterrupted run (each epoch's order depends only on (seed, epoch)); ``epochs=`` may be raised.

**Keeping the best point** (``select.metric``, e.g. ``test_hit@3`` or ``test_full_loss``;
losses are lower-is-better): the early-stopping hook of the remedies
(:class:`~oneepoch.remedies.early_stopping.EarlyStopping`) keeps a copy of the tables at the
best evaluation so far, stops after ``select.patience`` evaluations without an improvement
(0 = train every epoch), and puts the best tables back at the end; the export is then the
best point's tables (also written as ``RUN/checkpoints/final/``), and ``meta.json`` and
``summary.json`` say which point (``selected: {epoch, step, metric, value}``). Without it the
export is the last point (``selected`` names the last evaluation).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oneepoch.config import to_dict
from oneepoch.io import atomic_write_json, check_writable_dir
from oneepoch.pretrain.config import PretrainConfig
from oneepoch.pretrain.data import EngagementData, load_engagements
from oneepoch.pretrain.evaluate import ranking_metrics
from oneepoch.pretrain.losses import bce_loss, contrastive_loss, logq_correction
from oneepoch.pretrain.model import TwoTower
from oneepoch.training.hooks import Hook, State
from oneepoch.training.loop import Loop, eval_points, open_run
from oneepoch.training.optim import Optimizer, build_optimizer

LOSSES = ("contrastive", "bce")


@dataclass
class PretrainResult:
    run_dir: Path
    metrics: list[dict[str, Any]]
    export_dir: Path | None
    seconds: float
    pairs_per_s: float
    selected: dict[str, Any] | None = None  # the exported point (see selected_point)


def run_name(cfg: PretrainConfig) -> str:
    if cfg.name:
        return cfg.name
    data = Path(cfg.data.path).name or "data"
    return f"pretrain-{data}-{cfg.loss.type}-d{cfg.model.dim}-s{cfg.seed}"


class Stage1Step:
    """One loss evaluation of a batch of positive pairs (shared by training and evaluation)."""

    def __init__(self, model: TwoTower, cfg: PretrainConfig, data: EngagementData) -> None:
        if cfg.loss.type not in LOSSES:
            raise ValueError(f"loss.type: unknown loss {cfg.loss.type!r} (choose {LOSSES})")
        if cfg.loss.type == "contrastive" and not cfg.loss.in_batch and cfg.loss.n_uniform <= 0:
            raise ValueError("loss: in_batch=false needs n_uniform > 0 (no negatives otherwise)")
        self.model, self.cfg = model, cfg
        self.n_items = data.n_items
        self.q = torch.from_numpy(data.item_freq()).float()

    def negatives(self, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        """Item rows drawn uniformly from the catalogue (rows 1..n_items-1)."""
        return torch.randint(1, self.n_items, shape, generator=gen)

    def loss(self, u_rows: torch.Tensor, i_rows: torch.Tensor, gen: torch.Generator
             ) -> torch.Tensor:
        m, lc = self.model, self.cfg.loss
        if lc.type == "bce":
            neg = self.negatives((len(u_rows), lc.bce_negatives), gen)
            scale = 1.0 / m.tau() if m.normalize else 1.0
            return bce_loss(m.users(u_rows), m.items(i_rows), m.items(neg), i_rows, neg, scale)
        neg = self.negatives((lc.n_uniform,), gen)
        cand = torch.cat([i_rows, neg])
        logq = None
        if lc.logq:
            logq = logq_correction(self.q[cand], len(i_rows) if lc.in_batch else 0,
                                   lc.n_uniform, self.n_items)
        return contrastive_loss(m.users(u_rows), m.items(cand), m.tau(), i_rows, cand, logq,
                                lc.in_batch, lc.chunk)


class Stage1Stepper:
    """One batch of positive pairs per call, through autograd (the loop's
    :class:`~oneepoch.training.loop.Step`); keeps the negative sampler's generator and the
    training clock (pairs/s counts training steps only)."""

    path = "autograd"
    reason = "stage 1 trains through autograd (its blocked softmax is one native call)"

    def __init__(self, fn: Stage1Step, opt: Optimizer, data: EngagementData, seed: int) -> None:
        self.fn, self.opt, self.model = fn, opt, fn.model
        self.gen = torch.Generator().manual_seed(seed)
        self.tu = torch.from_numpy(data.train_user)
        self.ti = torch.from_numpy(data.train_item)
        self.train_secs, self.pairs_done = 0.0, 0

    def run(self, batches: Iterator[np.ndarray], limit: int) -> list[float]:
        rows = next(batches, None)
        if rows is None:
            return []
        ts = time.perf_counter()
        idx = torch.from_numpy(rows)
        loss = self.fn.loss(self.tu[idx], self.ti[idx], self.gen)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.model.clamp_temperature()
        self.train_secs += time.perf_counter() - ts
        self.pairs_done += len(idx)
        return [float(loss.detach())]

    @property
    def pairs_per_s(self) -> float | None:
        return self.pairs_done / self.train_secs if self.train_secs else None

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.gen.get_state(), "train_secs": self.train_secs,
                "pairs_done": self.pairs_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["generator"])
        self.train_secs = float(state["train_secs"])
        self.pairs_done = int(state["pairs_done"])


def selected_point(rows: list[dict[str, Any]], hooks: Sequence[Hook],
                   metric: str) -> dict[str, Any]:
    """``{epoch, step, metric, value}`` of the exported point: the selecting hook's best row
    (the hook that ``applies`` ``select``), else the last evaluation (``metric`` "last")."""
    sel = [h for h in hooks if getattr(h, "applies", "") == "select"
           and getattr(h, "best_row", None)]
    row = sel[-1].best_row if sel else rows[-1]
    key = sel[-1].key if sel else ""
    return {"epoch": float(row["epoch"]), "step": int(row["step"]), "metric": key or "last",
            "value": float(row[key]) if key and row.get(key) is not None else None,
            "stopped_early": bool(sel and sel[-1].stopped)}


def pretrain(cfg: PretrainConfig, run_dir: str | Path | None = None,
             data: EngagementData | None = None, resume: bool = False,
             hooks: Sequence[Hook | None] = (), parallel: Any = None) -> PretrainResult:
    """Train user and item ID tables on engagement pairs; see the module doc.

    ``parallel``: as for :func:`oneepoch.training.trainer.train` (a
    ``oneepoch.distributed.DataParallelRun``, or ``None`` on one process).

    With ``resume``, continue from the latest checkpoint of ``run_dir`` (from scratch when it
    has none); without, stale checkpoints of an earlier run in ``run_dir`` are removed. The
    loop, the run folder's checks and lock, checkpoints and resume are those of ``train``
    (:class:`oneepoch.training.loop.Loop`). ``hooks`` plug into the loop (e.g. the tracking
    hook of :func:`oneepoch.tracking.tracking_hooks`); ``select.metric`` needs the hook that
    applies it (pretrain imports no remedy):
    ``hooks=[oneepoch.remedies.early_stopping.select_hook(cfg)]``.
    """
    t0 = time.time()
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError(f"epochs / batch_size: must be >= 1 (got {cfg.epochs}, "
                         f"{cfg.batch_size})")
    run_dir = Path(run_dir or Path(cfg.out_dir) / run_name(cfg))
    if parallel is None:
        return _pretrain(cfg, run_dir, data, resume, t0, None, hooks)
    parallel.set_threads(cfg.threads)
    try:
        return _pretrain(cfg, run_dir, data, resume, t0, parallel, hooks)
    except BaseException as e:
        parallel.fail(e)  # the other ranks name this one when they stop
        raise


def _pretrain(cfg: PretrainConfig, run_dir: Path, data: EngagementData | None, resume: bool,
              t0: float, dp: Any, hooks: Sequence[Hook | None] = ()) -> PretrainResult:
    from oneepoch.embeddings import export_embeddings

    out_dir = run_dir
    if dp is not None:  # rank 0 writes run_dir, the others a scratch folder
        run_dir = dp.run_dir(run_dir)
    check_writable_dir(run_dir)
    if data is None:
        if not cfg.data.path:
            raise ValueError("data.path: no engagement data set given (a folder with "
                             "schema.yaml, format: engagements)")
        data = load_engagements(cfg.data.path, cfg.data.train_split, cfg.data.test_split,
                                cfg.data.holdout, cfg.data.surfaces, cfg.seed,
                                cfg.data.subsample)
    torch.manual_seed(cfg.seed)
    mc, lc = cfg.model, cfg.loss
    model = TwoTower(data.n_users, data.n_items, mc.dim, mc.init_std, mc.normalize,
                     lc.temperature, lc.learn_temperature, lc.tau_min, lc.tau_max)
    opt = build_optimizer(model, cfg.optim)
    step_fn = Stage1Step(model, cfg, data)
    stepper = Stage1Stepper(step_fn, opt, data, cfg.seed)
    n = len(data.train_user)
    steps_per_epoch = -(-n // cfg.batch_size)
    erng = np.random.default_rng([cfg.seed, 99])
    held = erng.choice(len(data.test_user), min(cfg.eval.max_pairs, len(data.test_user)), False)
    tsub = erng.choice(n, min(cfg.eval.train_pairs, n), False)
    eval_sets = {"test": (data.test_user[held], data.test_item[held]),
                 "train": (data.train_user[tsub], data.train_item[tsub])}

    def evaluate_now() -> dict[str, Any]:
        model.eval()
        ut, it = model.tables()
        tau = float(model.tau().detach())
        row: dict[str, Any] = {"tau": tau}
        for prefix, (uu, ii) in eval_sets.items():
            m = ranking_metrics(ut, it, uu, ii, cfg.eval.ks, tau, cfg.eval.batch_size,
                                cfg.eval.exclude_seen, data.train_user, data.train_item,
                                candidate_start=1)
            with torch.no_grad():
                g = torch.Generator().manual_seed(12345)
                ls = [float(step_fn.loss(torch.from_numpy(uu[a:a + cfg.batch_size]),
                                         torch.from_numpy(ii[a:a + cfg.batch_size]), g))
                      for a in range(0, len(uu), cfg.batch_size)]
            m["sampled_loss"] = float(np.mean(ls)) if ls else float("nan")
            row.update({f"{prefix}_{k}": v for k, v in m.items()})
        row["pairs_per_s"] = stepper.pairs_per_s
        model.train()
        return row

    def batches(epoch: int) -> Iterator[np.ndarray]:
        order = np.random.default_rng([cfg.seed, epoch + 1]).permutation(n)
        return (order[a:a + cfg.batch_size] for a in range(0, n, cfg.batch_size))

    hooks = [h for h in hooks if h is not None]  # select_hook(cfg) is None when off
    if cfg.select.metric and not any(getattr(h, "applies", "") == "select" for h in hooks):
        raise ValueError("select.metric: set, but no hook applies it; pass hooks="
                         "[oneepoch.remedies.early_stopping.select_hook(cfg)] to pretrain() "
                         "(last in the list), or set select.metric=''")
    if dp is not None and dp.shard_tables:
        dp.check_stage1(cfg)  # what sharded tables refuse, before the folder is touched
    s = State(cfg, data, model, opt, run_dir, steps_per_epoch)
    for h in hooks:
        h.check(s)
    step: Any = stepper
    if dp is None:
        lock, ck = open_run(run_dir, to_dict(cfg), resume, model, steps_per_epoch)
    else:  # batches stay global: the step trains this rank's slice of each
        lock, ck = dp.open_run(open_run, out_dir, to_dict(cfg), resume, model, steps_per_epoch)
        step = dp.stage1_step(stepper)
    evaluate = getattr(step, "on_writer", lambda f: f)(evaluate_now)  # sharded: on rank 0
    try:
        loop = Loop(s, step, hooks, batches, evaluate, cfg.epochs,
                    eval_points(steps_per_epoch, cfg.epochs, cfg.eval.per_epoch),
                    cfg.checkpoint_keep, sync=getattr(opt, "sync", lambda: None),
                    progress=cfg.progress and (dp is None or dp.is_writer),
                    headline=f"test_hit@{min(cfg.eval.ks)}",
                    unit="pair", batch_size=cfg.batch_size, t0=t0)
        if ck is not None:
            loop.restore(ck)
            if "step_state" not in ck:  # checkpoints of older versions
                stepper.load_state_dict(ck)
        loop.run()
        loop.bring_up_to_date()
        rows = s.rows
        selected = selected_point(rows, hooks, cfg.select.metric)
        export_dir = None
        if cfg.export and (dp is None or dp.is_writer):
            ut, it = model.tables()
            export_dir = export_embeddings(run_dir / "embeddings", ut, it, data.users,
                                           data.items, {
                "dim": mc.dim, "temperature": float(model.tau().detach()),
                "normalized": mc.normalize, "loss": lc.type, "epochs": cfg.epochs,
                "steps": s.step, "data_sources": list(data.sources),
                "surfaces": cfg.data.surfaces, "train_pairs": n,
                "subsample": cfg.data.subsample, "selected": selected,
                "eval": {k: v for k, v in _row_at(rows, selected["step"]).items()
                         if isinstance(v, (int, float)) and v is not None},
                "config": to_dict(cfg)})
        secs = time.time() - loop.t0
        pps = stepper.pairs_per_s or float("nan")
        summary = {"seconds": secs, "steps": s.step, "pairs_per_s": pps, "train_pairs": n,
                   "heldout_pairs": len(data.test_user),
                   "heldout_unknown": data.heldout_unknown, "users": data.n_users - 1,
                   "items": data.n_items - 1, "export": str(export_dir) if export_dir else None,
                   "step_path": step.path, "step_path_reason": step.reason,
                   "finished": True, "last": rows[-1], "selected": selected}
        if dp is not None:
            summary["world_size"] = dp.ctx.world_size
        for h in hooks:
            summary.update({k: v for k, v in h.summary().items() if k != "selected"})
        atomic_write_json(run_dir / "summary.json", summary)
    finally:
        lock.release()
    if dp is not None and not dp.is_writer:  # rank 0 wrote the export
        export_dir = out_dir / "embeddings" if cfg.export else None
    return PretrainResult(out_dir, rows, export_dir, secs, pps, selected)


def _row_at(rows: list[dict[str, Any]], step: int) -> dict[str, Any]:
    """The last evaluation row at global step ``step`` (the exported point's metrics)."""
    return next((r for r in reversed(rows) if r["step"] == step), rows[-1])
