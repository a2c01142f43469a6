"""``oneepoch sweep``: a grid of training runs with seeds, an overlay figure and a summary."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep", help="train a grid of settings with several seeds and summarise",
        description="Train every point of a grid of settings with several seeds (one run folder "
        "per point and seed, parallel processes each limited to one thread; finished runs are "
        "skipped on a re-run), then write sweep.png (test AUC against epochs, mean +/- std per "
        "point) and summary.md / summary.json / summary.html (best AUC and where, AUC at the end "
        "of epoch 1, the drop at epoch 2, final AUC; mean +/- std over seeds).",
        epilog="example: oneepoch sweep --config ctr --grid optim.name=adam,sgd "
        "--grid optim.lr=1e-3,1e-1 --seeds 3 data.path=runs/demo/data epochs=2")
    p.add_argument("--config", default="ctr",
                   help="YAML file or built-in preset name (default: ctr)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a setting and its values (repeatable; the grid is their product; "
                   "list values in brackets: model.hidden=[200,80],[400,160])")
    p.add_argument("--seeds", type=int, default=3, help="seeds per point (default 3)")
    p.add_argument("--out", default="runs/sweep", help="output folder (default runs/sweep)")
    p.add_argument("--workers", type=int, default=0,
                   help="parallel runs (default: one per core)")
    p.add_argument("--probe", action="append", default=[], metavar="NAME[:k=v,...]",
                   help="attach a probe to every run: updates, adistance[:every=2,rows=4000]")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="settings applied to every run, e.g. data.path=DIR epochs=2")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from oneepoch.recipes.sweep import parse_grid, run_sweep

    res = run_sweep(args.config, parse_grid(args.grid), args.seeds, args.out, args.workers,
                    args.overrides, args.probe)
    print((res.out / "summary.md").read_text())
    print(f"figure: {res.files['png']}\nsummary: {res.files['html']}  [{res.seconds:.0f} s]")
    return 0
