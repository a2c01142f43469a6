"""``oneepoch pretrain``: stage 1 of paper B (user and item ID tables on engagement logs)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain", help="pre-train user and item ID embeddings on engagement logs (paper B)",
        description="Train user and item ID tables (score = dot product) with paper B's "
        "contrastive loss (in-batch + uniform negatives, learned clamped temperature, optional "
        "logQ correction and L2 normalisation) or BCE with random negatives, for many epochs; "
        "evaluate Hit@K / Recall@K / NDCG@K against the full catalogue several times per "
        "epoch; checkpoint each epoch end; export RUN/embeddings/ for downstream models "
        "(init.embeddings=...).",
        epilog="example: oneepoch pretrain --config pretrain data.path=DATA/engagements "
        "model.dim=32 loss.logq=true model.normalize=true")
    p.add_argument("--config", default="pretrain",
                   help="YAML file or built-in preset name (default: pretrain)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a killed run from its last epoch checkpoint (settings from "
                   "RUN_DIR/config.yaml; overrides such as epochs=N apply on top)")
    p.add_argument("--shard-tables", metavar="SHARDING", default="",
                   choices=["", "auto", "table_wise", "column_wise"],
                   help="under torchrun / --nproc: shard the user and item tables with "
                   "TorchRec (auto = its planner's choice); needs the distributed extra and "
                   "optim.name=sgd or adagrad")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="pre-train data-parallel on N local processes (as torchrun "
                   "--nproc_per_node N); see docs/distributed.md")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings, e.g. epochs=20")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from oneepoch.commands import config_and_run_dir
    from oneepoch.distributed import run_as_rank
    from oneepoch.distributed.launch import launch_local
    from oneepoch.pretrain import PretrainConfig, pretrain
    from oneepoch.remedies.early_stopping import select_hook
    from oneepoch.tracking import tracking_hooks

    if args.nproc is not None:
        cfg, _ = config_and_run_dir(args, PretrainConfig)  # bad settings: one error, no launch
        if args.shard_tables:
            from oneepoch.distributed.plan import require_torchrec
            from oneepoch.distributed.stage1 import check_sharded_stage1
            require_torchrec()
            check_sharded_stage1(cfg)
        return launch_local(args.nproc, ["pretrain", "--config", args.config, *(
            ["--resume", args.resume] if args.resume else []), *(
            ["--shard-tables", args.shard_tables] if args.shard_tables else []),
            *args.overrides])
    cfg, run_dir = config_and_run_dir(args, PretrainConfig)
    res, rc = run_as_rank("pretrain", lambda par: pretrain(
        cfg, run_dir, resume=run_dir is not None, parallel=par,
        hooks=[*tracking_hooks(cfg, report=False), select_hook(cfg)]),
        "cpu", cfg.threads, args.shard_tables or "")
    if rc is not None:  # another rank (rank 0 reports), or a rank failed
        return rc
    last = res.metrics[-1]
    ks = cfg.eval.ks
    best = max(res.metrics, key=lambda r: r[f"test_hit@{ks[0]}"])
    print(f"held-out Hit@{ks[0]}: last {last[f'test_hit@{ks[0]}']:.4f} (epoch "
          f"{last['epoch']:.2f}), best {best[f'test_hit@{ks[0]}']:.4f} (epoch "
          f"{best['epoch']:.2f}); tau {last['tau']:.4f}; {res.pairs_per_s:,.0f} pairs/s")
    sel = res.selected
    if sel and sel["metric"] != "last":
        print(f"exported the point selected on {sel['metric']}: {sel['value']:.4f} at epoch "
              f"{sel['epoch']:.2f}" + (" (stopped early)" if sel["stopped_early"] else ""))
    print(f"run: {res.run_dir}")
    if res.export_dir:
        print(f"embeddings: {res.export_dir}  (use: init.embeddings={res.export_dir})")
    return 0
