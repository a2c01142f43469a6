"""``oneepoch plan``: TorchRec's sharding plan and per-rank memory for ID tables on a cluster
that need not exist here (no GPU needed)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="TorchRec's sharding plan for ID tables on N ranks (no GPU needed)",
        description="Run TorchRec's EmbeddingShardingPlanner for the given ID tables on a "
        "topology of --world-size ranks and print its plan (table-wise / row-wise / ...) and "
        "the memory each rank would hold. Needs the distributed extra (TorchRec + FBGEMM).",
        epilog="example: oneepoch plan --tables item=1e9:64,user=1e8:64 --world-size 64 "
        "--device cuda --hbm-gib 80")
    p.add_argument("--tables", required=True, help="name=rows:dim,... e.g. item=1e9:64")
    p.add_argument("--world-size", type=int, required=True, help="ranks (GPUs or processes)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="the ranks' device (default: cuda)")
    p.add_argument("--hbm-gib", type=float,
                   help="GPU memory per rank in GiB (cuda; default: TorchRec's)")
    p.add_argument("--ddr-gib", type=float,
                   help="host memory per rank in GiB (default: TorchRec's)")
    p.add_argument("--local-world-size", type=int,
                   help="ranks per machine (default: 8 on cuda, 1 on cpu)")
    p.add_argument("--batch-size", type=int, default=512, help="per-rank batch (cost model)")
    p.add_argument("--out", metavar="FILE.json", help="also write the plan as JSON")
    p.add_argument("--stats", action="store_true", help="also print TorchRec's full statistics")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from oneepoch.distributed.plan import parse_tables, plan_tables
    from oneepoch.io import atomic_write_text

    for key, v, low in (("--world-size", args.world_size, 1), ("--batch-size", args.batch_size, 1),
                        ("--local-world-size", args.local_world_size, 1),
                        ("--hbm-gib", args.hbm_gib, 1e-9), ("--ddr-gib", args.ddr_gib, 1e-9)):
        if v is not None and v < low:
            raise ValueError(f"{key} {v:g}: must be {'positive' if low < 1 else '>= 1'}")
    if args.device == "cpu" and args.hbm_gib is not None:
        raise ValueError("--hbm-gib: GPU memory, for --device cuda; CPU ranks plan with "
                         "--ddr-gib")
    if args.world_size > 4096:
        print(f"planning for {args.world_size:,} ranks: TorchRec's planner takes a while at "
              "this size (16,384 ranks: ~30 s here)", flush=True)
    plan = plan_tables(parse_tables(args.tables), args.world_size, args.device, args.hbm_gib,
                       args.ddr_gib, args.local_world_size, args.batch_size)
    print(plan.summary())
    print()
    print(plan.torchrec_text)
    if args.stats:
        print(plan.stats_text)
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(plan.to_dict(), indent=1))
        print(f"plan: {args.out}")
    return 0
