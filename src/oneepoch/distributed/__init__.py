"""Training across processes and machines on ``torch.distributed`` (launched by ``torchrun``).

``oneepoch train`` under ``torchrun`` (or ``oneepoch train --nproc N``) finds the launcher's
environment (:func:`from_env`) and trains data-parallel: every rank holds the whole model,
trains a contiguous slice of each global batch, and the gradients are summed across ranks
before the optimizer's update (:mod:`oneepoch.distributed.parallel`). Rank 0 writes the run
folder; the other ranks keep a private scratch folder, deleted at the end.

The trainer hooks in at one place, :class:`DataParallelRun`, handed to it by the caller (the
``train`` / ``pretrain`` commands build it from torchrun's environment):

    >>> dp = DataParallelRun.from_env(cfg.device)   # None when not launched  # doctest: +SKIP
    >>> train(cfg, parallel=dp); dp.close()                                 # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from oneepoch.distributed.env import (
    DEFAULT_TIMEOUT_S,
    DistContext,
    DistributedError,
    env_rank,
    from_env,
    launched,
)
from oneepoch.distributed.parallel import (
    DataParallelStep,
    check_hooks,
    rank_bounds,
    rank_slice,
    sharded_predict,
    writer_predict,
)
from oneepoch.io import atomic_write_json


class _NoLock:
    def release(self) -> None:
        pass


class DataParallelRun:
    """What a training function swaps in when it runs as one rank of several."""

    def __init__(self, ctx: DistContext, shard_tables: str = "") -> None:
        self.ctx = ctx
        self.scratch: Path | None = None
        self.shard_tables = shard_tables  # "" = replicated; else a TorchRec sharding

    @classmethod
    def from_env(cls, device: str = "cpu", threads: int = 0, shard_tables: str = ""
                 ) -> DataParallelRun | None:
        """This process's place in a torchrun run (``None`` when not launched). With
        ``shard_tables`` (auto, table_wise, column_wise), the ID tables (stage 1's, or the
        CTR model's) are sharded by TorchRec (the distributed extra)."""
        if shard_tables:
            from oneepoch.distributed.plan import require_torchrec
            require_torchrec()  # before joining: a clear error on every rank
            if not launched():
                raise ValueError(f"--shard-tables {shard_tables}: shards the ID tables across "
                                 "the processes of a distributed run; launch with --nproc N "
                                 "or torchrun (docs/distributed.md)")
        ctx = from_env(device, threads)
        return None if ctx is None else cls(ctx, shard_tables)

    @property
    def is_writer(self) -> bool:
        return self.ctx.is_writer

    def set_threads(self, threads: int) -> None:
        """``threads=0`` (all cores): this machine's cores shared among its local ranks."""
        if threads == 0:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.ctx.local_world_size))

    def run_dir(self, run_dir: Path) -> Path:
        """Rank 0 writes ``run_dir``; the others a private scratch folder."""
        if self.ctx.is_writer:
            return run_dir
        self.scratch = Path(tempfile.mkdtemp(prefix=f"oneepoch-rank{self.ctx.rank}-"))
        out = self.scratch / run_dir.name
        out.mkdir()
        return out

    def check(self, hooks: Sequence[Any], state: Any = None) -> None:
        """Refuse, before the run folder is written, what this run cannot do across ranks
        (with sharded tables and the run's ``state``: also what they cannot run)."""
        check_hooks(self.ctx, hooks)
        if self.shard_tables and state is not None:
            from oneepoch.distributed.sharded_ctr import check_sharded_train
            check_sharded_train(state.cfg, hooks)

    def open_run(self, open_run: Callable[..., Any], run_dir: Path, config: dict[str, Any],
                 resume: bool, model: torch.nn.Module, steps_per_epoch: int,
                 device: str = "cpu") -> tuple[Any, dict[str, Any] | None]:
        """Rank 0 takes the run folder (``open_run``); every rank gets its checkpoint to resume
        from (sent by rank 0, so no shared file system is needed), or all fail with rank 0's
        error."""
        lock, ck, err = _NoLock(), None, None
        if self.ctx.is_writer:
            try:
                lock, ck = open_run(run_dir, config, resume, model, steps_per_epoch, device)
            except Exception as e:  # noqa: BLE001 - sent to the other ranks, then re-raised
                err = e
        msg = [None if err is None else f"{type(err).__name__}: {err}", ck]
        with self.ctx.collective("sending the checkpoint to resume from"):
            dist.broadcast_object_list(msg, src=0)
        if err is not None:
            raise err
        if msg[0] is not None:
            raise DistributedError(f"rank 0 could not open the run folder: {msg[0]}")
        self._run_dir = run_dir
        if self.ctx.is_writer and not self.shard_tables:
            self.write_plan(run_dir, model)
        return lock, msg[1]

    def write_plan(self, run_dir: Path, model: torch.nn.Module | None = None,
                   sharded: Any = None) -> dict[str, Any]:
        """Print and write ``RUN/sharding_plan.json``: where each ID table lives, replicated
        on every rank (data-parallel: ``model``'s tables) or as TorchRec placed the
        ``sharded`` tables (a :class:`~oneepoch.distributed.sharded.ShardedTables`)."""
        if sharded is not None:
            tables = sharded.plan_dict()
            plan = {"world_size": self.ctx.world_size, "backend": self.ctx.backend,
                    "asked": self.shard_tables, "tables": tables,
                    "how": "TorchRec DistributedModelParallel; optimizer fused in FBGEMM"}
            line = "TorchRec sharding plan: " + ", ".join(
                f"{n} {t['sharding']} on ranks {t['ranks']}" for n, t in tables.items())
        else:
            groups = dict(model.param_groups()) if hasattr(model, "param_groups") else {}
            names = {id(p): n for n, p in model.named_parameters()} if model else {}
            tables = {names[id(p)]: {"rows": int(p.shape[0]), "dim": int(p.shape[1]),
                                     "sharding": "data_parallel",
                                     "ranks": list(range(self.ctx.world_size))}
                      for p in groups.get("embedding", []) if p.dim() == 2}
            plan = {"world_size": self.ctx.world_size, "backend": self.ctx.backend,
                    "tables": tables, "how": "every table replicated on every rank; row "
                    "gradients all-gathered and summed each step (docs/distributed.md)"}
            line = "sharding plan: " + ", ".join(
                f"{n} {t['rows']:,}x{t['dim']} data_parallel" for n, t in tables.items())
        atomic_write_json(run_dir / "sharding_plan.json", plan)
        w = self.ctx.world_size
        print(f"{w} process{'es' if w != 1 else ''} ({self.ctx.backend}); {line}", flush=True)
        return plan

    def _sharded_plan(self, tables: Any) -> None:
        """Rank 0 writes the sharded tables' plan into the run folder (once it is open)."""
        run_dir = getattr(self, "_run_dir", None)
        if self.ctx.is_writer and run_dir is not None:
            self.write_plan(run_dir, sharded=tables)

    def build_step(self, model: torch.nn.Module, opt: Any, batcher: Any, hooks: Sequence[Any],
                   state: Any) -> Any:
        """The CTR step on this rank: replicated tables, or (``shard_tables``) the model's ID
        tables sharded by TorchRec (the loop calls its ``refresh``)."""
        if not self.shard_tables:
            return DataParallelStep(self.ctx, model, opt, batcher, hooks, state)
        from oneepoch.distributed.sharded_ctr import build_sharded_step
        step = build_sharded_step(self.ctx, model, opt, batcher, hooks, state,
                                  self.shard_tables)
        step.root = getattr(self, "_run_dir", None)  # every rank writes its checkpoint shards there
        self._sharded_plan(step.tables)
        return step

    def check_stage1(self, cfg: Any) -> None:
        """Refuse, before the run folder is written, what stage 1 cannot run here (with
        sharded tables: an optimizer FBGEMM does not fuse, another loss, ``select.metric``)."""
        if self.shard_tables:
            from oneepoch.distributed.stage1 import check_sharded_stage1
            check_sharded_stage1(cfg)

    def stage1_step(self, stepper: Any) -> Any:
        """Stage 1's step on this rank (wraps one process's ``Stage1Stepper``); with sharded
        tables, the loop calls its ``refresh``."""
        from oneepoch.distributed.stage1 import DataParallelStage1, ShardedStage1
        if not self.shard_tables:
            return DataParallelStage1(self.ctx, stepper)
        step = ShardedStage1(self.ctx, stepper, self.shard_tables)
        step.root = getattr(self, "_run_dir", None)  # every rank writes its checkpoint shards there
        self._sharded_plan(step.tables)
        return step

    def predict(self, predict: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
        """``train``'s predictions for evaluation: each rank a slice, gathered; with sharded
        tables on rank 0 (the only rank holding the whole table), sent to the others."""
        if self.shard_tables:
            return writer_predict(self.ctx, predict)
        return sharded_predict(self.ctx, predict)

    def fail(self, err: BaseException) -> None:
        """Post this rank's error for the others (they name it when they stop)."""
        self.ctx.post_error(err)

    def close(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
        self.ctx.close()


def run_as_rank(command: str, work: Callable[[DataParallelRun | None], Any], device: str = "cpu",
                threads: int = 0, shard_tables: str = "") -> tuple[Any, int | None]:
    """Run a command's ``work(parallel)`` as this process's rank (``parallel`` is ``None`` when
    not launched by torchrun); returns ``(result, None)`` where the command reports (one
    process, or rank 0), ``(None, 0)`` on the other ranks, ``(None, 1)`` after printing the
    error when a rank stopped or the ranks could not meet."""
    import sys

    par = None
    try:
        par = DataParallelRun.from_env(device, threads, shard_tables)
        result = work(par)
    except DistributedError as e:
        print(f"oneepoch {command}: error: {e}", file=sys.stderr)
        return None, 1
    finally:
        if par is not None:
            par.close()
    return (result, None) if env_rank() == 0 else (None, 0)


__all__ = ["DEFAULT_TIMEOUT_S", "DataParallelRun", "DataParallelStep", "DistContext",
           "DistributedError", "env_rank", "from_env", "launched", "rank_bounds", "rank_slice",
           "run_as_rank"]
