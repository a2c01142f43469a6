"""``oneepoch train``: multi-epoch CTR training with dense evaluation and a verdict."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a CTR model for several epochs",
        description="Train a CTR model (DNN or LR) for several epochs, evaluating test and train "
        "AUC/GAUC/logloss many times per epoch; writes runs/<name>/ with metrics.parquet, "
        "checkpoints, curves.png, report.html and the one-epoch verdict.",
        epilog="example: oneepoch train --config ctr data.path=my_data model.type=lr optim.lr=0.01")
    p.add_argument("--config", default="ctr",
                   help="YAML file or built-in preset name (default: ctr = paper A's base)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a killed run from its last epoch checkpoint")
    p.add_argument("--shard-tables", metavar="SHARDING", default="",
                   choices=["", "auto", "table_wise", "column_wise"],
                   help="under torchrun / --nproc: shard the model's ID tables (one per "
                   "vocabulary) with TorchRec (auto = its planner's choice); needs the "
                   "distributed extra and optim.name=sgd or adagrad")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train data-parallel on N local processes (as torchrun "
                   "--nproc_per_node N); see docs/distributed.md")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings, e.g. epochs=4")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from oneepoch.commands import config_and_run_dir
    from oneepoch.config import TrainConfig, check_device
    from oneepoch.distributed import run_as_rank
    from oneepoch.distributed.launch import launch_local
    from oneepoch.remedies import hooks_from_config
    from oneepoch.report.run_report import build_report
    from oneepoch.tracking import tracking_hooks
    from oneepoch.training.trainer import train

    if args.nproc is not None:
        cfg, _ = config_and_run_dir(args, TrainConfig)  # bad settings: one error, no launch
        check_device(cfg.device)
        if args.shard_tables:
            from oneepoch.distributed.plan import require_torchrec
            from oneepoch.distributed.sharded_ctr import check_sharded_train
            require_torchrec()
            check_sharded_train(cfg, hooks_from_config(cfg))
        return launch_local(args.nproc, ["train", "--config", args.config, *(
            ["--resume", args.resume] if args.resume else []), *(
            ["--shard-tables", args.shard_tables] if args.shard_tables else []),
            *args.overrides])
    cfg, run_dir = config_and_run_dir(args, TrainConfig)
    res, rc = run_as_rank("train", lambda par: train(
        cfg, run_dir, hooks=[*hooks_from_config(cfg), *tracking_hooks(cfg)],
        resume=run_dir is not None, parallel=par), cfg.device, cfg.threads,
        args.shard_tables or "")
    if rc is not None:  # another rank (rank 0 reports), or a rank failed
        return rc
    report = build_report([res.run_dir])
    print(res.verdict.line())
    print(f"run: {res.run_dir}\nreport: {report}")
    return 0
