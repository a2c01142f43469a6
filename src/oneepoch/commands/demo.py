"""``oneepoch demo``: the one-epoch phenomenon on built-in data, DNN vs LR."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train DNN and LR on built-in synthetic data; write a report",
                       description="Generate the built-in synthetic data set (once), train "
                       "paper A's Embedding & MLP model and an LR model for 3 epochs with dense "
                       "evaluation, and write an overlaid report with the one-epoch verdict.")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="training settings applied to both runs, e.g. epochs=2")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from oneepoch.recipes.demo import run_demo

    report = run_demo(args.out, args.overrides, progress=not args.no_progress)
    print(f"report: {report}")
    return 0
