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

Each epoch end writes ``RUN/checkpoints/epoch-NNN/`` atomically (only the latest is kept): the
tables and temperature, the row-wise optimizer state with its step counts, the torch RNG and
negative-sampling generator states, the evaluation rows so far and the step / epoch counters, in
safetensors + JSON (:mod:`oneepoch.training.checkpoint`). ``pretrain(cfg, run_dir,
resume=True)`` continues from the latest one and ends with the tables and metrics of an
uninterrupted run (each epoch's order depends only on (seed, epoch)); ``epochs=`` may be raised.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from tqdm.auto import tqdm

from oneepoch.config import to_dict
from oneepoch.io import atomic_write_json, atomic_write_text
from oneepoch.pretrain.config import PretrainConfig
from oneepoch.pretrain.data import EngagementData, load_engagements
from oneepoch.pretrain.evaluate import ranking_metrics
from oneepoch.pretrain.losses import bce_loss, contrastive_loss
from oneepoch.pretrain.model import TwoTower
from oneepoch.training.checkpoint import (
    clear_run_state,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    restore_optim_keys,
    save_checkpoint,
)
from oneepoch.training.optim import Optimizer, build_optimizer

LOSSES = ("contrastive", "bce")


@dataclass
class PretrainResult:
    run_dir: Path
    metrics: list[dict[str, Any]]
    export_dir: Path | None
    seconds: float
    pairs_per_s: float


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
            b = len(i_rows) if lc.in_batch else 0
            logq = torch.log(b * self.q[cand] + lc.n_uniform / (self.n_items - 1))
        return contrastive_loss(m.users(u_rows), m.items(cand), m.tau(), i_rows, cand, logq,
                                lc.in_batch, lc.chunk)


def _write_rows(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    tmp = run_dir / "metrics.parquet.tmp"
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, run_dir / "metrics.parquet")


def _eval_points(steps_per_epoch: int, epochs: int, per_epoch: int) -> set[int]:
    k = max(1, per_epoch)
    pts = {0}
    for e in range(epochs):
        pts |= {e * steps_per_epoch + round(j * steps_per_epoch / k) for j in range(1, k + 1)}
    return pts


def _restore(path: Path, model: TwoTower, opt: Optimizer, gen: torch.Generator,
             steps_per_epoch: int) -> dict[str, Any]:
    """Load a checkpoint written by :func:`pretrain` into the model, optimizer and generator
    (and the global torch RNG); returns it. Refuses one whose shapes do not fit this run."""
    ck = load_checkpoint(path)
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ck["model"].items()}
    if got != have or int(ck["steps_per_epoch"]) != steps_per_epoch:
        raise ValueError(
            f"{path}: cannot resume: the checkpoint has tables {got} and "
            f"{ck['steps_per_epoch']} steps per epoch, these settings give {have} and "
            f"{steps_per_epoch} (model.dim, batch_size or the data changed; resume with the "
            "run's own settings)")
    model.load_state_dict(ck["model"])
    opt.load_state_dict({"sparse": ck["optim"]["sparse"],
                         "dense": restore_optim_keys(ck["optim"]["dense"])})
    torch.set_rng_state(ck["torch_rng"])
    gen.set_state(ck["generator"])
    return ck


def pretrain(cfg: PretrainConfig, run_dir: str | Path | None = None,
             data: EngagementData | None = None, resume: bool = False) -> PretrainResult:
    """Train user and item ID tables on engagement pairs; see the module doc.

    With ``resume``, continue from the latest checkpoint of ``run_dir`` (from scratch when it
    has none); without, stale checkpoints of an earlier run in ``run_dir`` are removed.
    """
    from oneepoch.embeddings import export_embeddings

    t0 = time.time()
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError(f"epochs / batch_size: must be >= 1 (got {cfg.epochs}, "
                         f"{cfg.batch_size})")
    if data is None:
        if not cfg.data.path:
            raise ValueError("data.path: no engagement data set given (a folder with "
                             "schema.yaml, format: engagements)")
        data = load_engagements(cfg.data.path, cfg.data.train_split, cfg.data.test_split,
                                cfg.data.holdout, cfg.data.surfaces, cfg.seed)
    run_dir = Path(run_dir or Path(cfg.out_dir) / run_name(cfg))
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    mc, lc = cfg.model, cfg.loss
    model = TwoTower(data.n_users, data.n_items, mc.dim, mc.init_std, mc.normalize,
                     lc.temperature, lc.learn_temperature, lc.tau_min, lc.tau_max)
    opt = build_optimizer(model, cfg.optim)
    step_fn = Stage1Step(model, cfg, data)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(data.train_user)
    tu, ti = torch.from_numpy(data.train_user), torch.from_numpy(data.train_item)
    steps_per_epoch = -(-n // cfg.batch_size)
    evals = _eval_points(steps_per_epoch, cfg.epochs, cfg.eval.per_epoch)
    erng = np.random.default_rng([cfg.seed, 99])
    held = erng.choice(len(data.test_user), min(cfg.eval.max_pairs, len(data.test_user)), False)
    tsub = erng.choice(n, min(cfg.eval.train_pairs, n), False)
    eval_sets = {"test": (data.test_user[held], data.test_item[held]),
                 "train": (data.train_user[tsub], data.train_item[tsub])}
    rows: list[dict[str, Any]] = []
    train_secs = 0.0
    pairs_done = 0
    step, start_epoch = 0, 0
    ckpts = list_checkpoints(run_dir)
    if resume and ckpts:
        ck = _restore(ckpts[-1], model, opt, gen, steps_per_epoch)
        step, start_epoch = int(ck["step"]), int(ck["epoch"])
        rows = ck["rows"]  # metrics written after the checkpoint are recomputed
        train_secs, pairs_done = float(ck["train_secs"]), int(ck["pairs_done"])
        t0 -= float(ck["elapsed_s"])
        _write_rows(run_dir, rows)
    elif not resume:
        clear_run_state(run_dir)
    # written once the checkpoint is known to fit, so a refused resume leaves the run as it was
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))

    def do_eval(step: int, loss_sum: float, n_loss: int) -> None:
        model.eval()
        ut, it = model.tables()
        tau = float(model.tau().detach())
        row: dict[str, Any] = {"step": step, "epoch": step / steps_per_epoch,
                               "train_loss": loss_sum / n_loss if n_loss else None, "tau": tau}
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
        row["elapsed_s"] = time.time() - t0
        row["pairs_per_s"] = pairs_done / train_secs if train_secs else None
        rows.append(row)
        _write_rows(run_dir, rows)
        model.train()

    if step == 0:
        do_eval(0, 0.0, 0)
    k0 = f"test_hit@{min(cfg.eval.ks)}"
    bar = tqdm(total=steps_per_epoch * cfg.epochs * cfg.batch_size,
               initial=min(step, steps_per_epoch * cfg.epochs) * cfg.batch_size, unit="pair",
               unit_scale=True, disable=not cfg.progress, dynamic_ncols=True, mininterval=1.0,
               desc=run_dir.name)
    for epoch in range(start_epoch, cfg.epochs):
        order = torch.from_numpy(np.random.default_rng([cfg.seed, epoch + 1]).permutation(n))
        loss_sum, n_loss = 0.0, 0
        for a in range(0, n, cfg.batch_size):
            ts = time.perf_counter()
            idx = order[a:a + cfg.batch_size]
            loss = step_fn.loss(tu[idx], ti[idx], gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
            model.clamp_temperature()
            train_secs += time.perf_counter() - ts
            pairs_done += len(idx)
            step += 1
            loss_sum, n_loss = loss_sum + float(loss.detach()), n_loss + 1
            bar.update(len(idx))
            if step in evals:
                do_eval(step, loss_sum, n_loss)
                loss_sum, n_loss = 0.0, 0
                bar.set_postfix(epoch=f"{step / steps_per_epoch:.2f}",
                                hit=f"{rows[-1][k0]:.4f}", tau=f"{rows[-1]['tau']:.3f}")
        save_checkpoint(run_dir / "checkpoints" / f"epoch-{epoch + 1:03d}", {
            "model": model.state_dict(), "optim": opt.state_dict(), "step": step,
            "epoch": epoch + 1, "steps_per_epoch": steps_per_epoch,
            "torch_rng": torch.get_rng_state(), "generator": gen.get_state(), "rows": rows,
            "train_secs": train_secs, "pairs_done": pairs_done, "elapsed_s": time.time() - t0})
        prune_checkpoints(run_dir, 1)
    bar.close()
    export_dir = None
    if cfg.export:
        ut, it = model.tables()
        export_dir = export_embeddings(run_dir / "embeddings", ut, it, data.users, data.items, {
            "dim": mc.dim, "temperature": float(model.tau().detach()), "normalized": mc.normalize,
            "loss": lc.type, "epochs": cfg.epochs, "steps": step,
            "data_sources": list(data.sources), "surfaces": cfg.data.surfaces,
            "train_pairs": n, "eval": {k: v for k, v in rows[-1].items()
                                       if isinstance(v, (int, float)) and v is not None},
            "config": to_dict(cfg)})
    secs = time.time() - t0
    pps = pairs_done / train_secs if train_secs else float("nan")
    summary = {"seconds": secs, "steps": step, "pairs_per_s": pps, "train_pairs": n,
               "heldout_pairs": len(data.test_user), "heldout_unknown": data.heldout_unknown,
               "users": data.n_users - 1, "items": data.n_items - 1,
               "export": str(export_dir) if export_dir else None, "finished": True,
               "last": rows[-1]}
    atomic_write_json(run_dir / "summary.json", summary)
    return PretrainResult(run_dir, rows, export_dir, secs, pps)

