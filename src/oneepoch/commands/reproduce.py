"""``oneepoch reproduce PAPER``: each figure / table of the two papers from one command.

Papers: ``zhang2022`` (paper A, recipes/zhang2022.py) and ``hsu2024`` (paper B,
recipes/hsu2024.py). Each recipe module provides
``reproduce(opts: oneepoch.recipes.ReproduceOptions) -> int``.
"""

from __future__ import annotations

import argparse
import importlib

PAPERS = {"zhang2022": "oneepoch.recipes.zhang2022", "hsu2024": "oneepoch.recipes.hsu2024"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce", help="reproduce a paper's figure or table (zhang2022, hsu2024)",
        description="Run the experiments behind a figure or table of paper A (zhang2022: "
        "Zhang et al., CIKM 2022) or paper B (hsu2024: Hsu et al., RecSys 2024) and write its "
        "PNG, table and an HTML report with the paper's claim beside what was measured.")
    p.add_argument("paper", choices=sorted(PAPERS))
    p.add_argument("--figure", help="figure number (or 'all')")
    p.add_argument("--table", help="table number")
    p.add_argument("--data", help="data-set folder (default: the built-in synthetic data)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per setting (default 3)")
    p.add_argument("--quick", action="store_true", help="a small preset (for tests / a look)")
    p.add_argument("--out", default="runs/reproduce", help="output folder")
    p.add_argument("--workers", type=int, default=0,
                   help="parallel processes (default: one per core)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="training settings applied to every run")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        mod = importlib.import_module(PAPERS[args.paper])
    except ModuleNotFoundError as e:
        raise ValueError(f"reproduce {args.paper}: not available in this version ({e})") from e
    from oneepoch.recipes import ReproduceOptions

    opts = ReproduceOptions(figure=args.figure, table=args.table, data=args.data,
                            seeds=args.seeds, quick=args.quick, out=args.out,
                            workers=args.workers, overrides=list(args.overrides or []))
    return int(mod.reproduce(opts) or 0)
