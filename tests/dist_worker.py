"""One rank of a distributed test run (started by tests/test_distributed.py with RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT set): ``python dist_worker.py SPEC.json``.

SPEC: {"overrides": [...], "pretrain": true (stage 1) or absent, "shard": a TorchRec sharding
(tables sharded; "" or absent: replicated), "resume": true (continue from the run folder's
last checkpoint), "config_hooks": true (the config's remedies and
the collapse probe), "log_rows": path or null (each training batch's rows, per rank),
"die": {"rank": r, "step": k} or {"epoch": e} (every rank) or null}.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from oneepoch.config import TrainConfig, load_config
from oneepoch.data.batcher import Batcher
from oneepoch.distributed import DataParallelRun
from oneepoch.training.hooks import Hook
from oneepoch.training.trainer import train


class Die(Hook):
    """Ends this process abruptly (as a kill would) at a step or an epoch start."""

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.rank = int(os.environ["RANK"])

    def after_step(self, s) -> None:
        if "step" in self.spec and self.rank == self.spec["rank"] and s.step == self.spec["step"]:
            os._exit(3)

    def on_epoch_start(self, s) -> None:
        if s.epoch == self.spec.get("epoch", -1):
            os._exit(9)


class Rows(Hook):
    """Records the rows of each of the model's ID tables this rank holds at the end."""

    rows: dict = {}

    def on_train_end(self, s) -> None:
        self.rows = {n: int(p.shape[0]) for g, ps in s.model.param_groups() if g == "embedding"
                     for n, p in s.model.named_parameters() if any(p is q for q in ps)}


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    if spec.get("pretrain"):
        from oneepoch.pretrain import PretrainConfig, pretrain
        par = DataParallelRun.from_env("cpu", shard_tables=spec.get("shard", ""))
        rows = Rows()
        res = pretrain(load_config(PretrainConfig, "pretrain", spec["overrides"]), parallel=par,
                       resume=bool(spec.get("resume")),
                       hooks=[rows, *([Die(spec["die"])] if spec.get("die") else [])])
        par.close()
        print(json.dumps({"rank": os.environ["RANK"], "export": str(res.export_dir),
                          "table_rows": rows.rows}))
        return
    cfg = load_config(TrainConfig, None, spec["overrides"])
    if spec.get("log_rows"):
        get, bs, log = Batcher.get, cfg.batch_size, []

        def logged(self, rows):
            if self.batch_size == bs:
                log.append(np.asarray(rows).copy())
            return get(self, rows)

        Batcher.get = logged
    rows = Rows()
    hooks = [rows, *([Die(spec["die"])] if spec.get("die") else [])]
    if spec.get("config_hooks"):  # the config's remedies, and the collapse probe
        from oneepoch.probes.collapse import CollapseProbe
        from oneepoch.remedies import hooks_from_config
        hooks += [*hooks_from_config(cfg), CollapseProbe()]
    par = DataParallelRun.from_env(cfg.device, shard_tables=spec.get("shard", ""))
    try:
        res = train(cfg, hooks=hooks, parallel=par, resume=bool(spec.get("resume")))
    finally:
        par.close()
    if spec.get("log_rows"):
        np.save(f"{spec['log_rows']}.rank{os.environ['RANK']}.npy",
                np.concatenate(log) if log else np.zeros(0, np.int64))
    print(json.dumps({"rank": os.environ["RANK"], "final": res.metrics[-1]["test_auc"],
                      "table_rows": rows.rows}))


if __name__ == "__main__":
    main()
