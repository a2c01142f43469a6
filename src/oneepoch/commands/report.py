"""``oneepoch report``: rebuild a run's report, or overlay several runs."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="rebuild report.html for one run or overlay several",
                       description="Rebuild curves.png and report.html from run folders' "
                       "metrics. With several runs, writes one overlaid report to --out.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="output folder (default: the first run's folder)")
    p.add_argument("--title", default="", help="report title")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from oneepoch.report.run_report import build_report

    print(f"report: {build_report(args.runs, args.out, args.title)}")
    return 0
