"""``oneepoch compare``: remedies side by side against early stopping inside an epoch."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from oneepoch.remedies.catalog import REMEDIES

    p = sub.add_parser(
        "compare", help="remedies side by side against early stopping, on your data",
        description="Train the early-stopped baseline and each remedy with several seeds on "
        "the same splits (validation: the data set's 'valid' split, else 10%% of train carved "
        "out; every point is selected on it, never on test); write compare.md / compare.json "
        "/ compare.png / report.html with the selected test AUC and where, the AUC at each "
        "epoch end, the drop after each boundary, the gain over early stopping and how many "
        "seeds beat it, train time and peak RSS; end with the remedies that beat early "
        "stopping beyond seed noise, or 'none does here'. Finished runs are skipped on a "
        "re-run; killed ones resume. Remedies: " + ", ".join(REMEDIES),
        epilog="example: oneepoch compare data/ml100k --remedies meda,freq-lr,hash "
        "--epochs 4 --seeds 3")
    p.add_argument("data", help="data-set folder (schema.yaml + Parquet)")
    p.add_argument("--remedies", required=True, metavar="A,B,...",
                   help="comma-separated remedy names (the baseline is always included)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--workers", type=int, default=0,
                   help="parallel runs (default: one per core)")
    p.add_argument("--out", help="output folder (default runs/compare/<data name>)")
    p.add_argument("--export", help="pre-trained embeddings (RUN/embeddings) for two-stage-*")
    p.add_argument("--valid", help="validation: a split name, share:F (random share of "
                   "train), order:F (the last rows of train); default: the 'valid' split, "
                   "else share:0.1")
    p.add_argument("--patience", type=int, default=0,
                   help="stop after this many evaluations without improvement (default 0: "
                   "train every epoch, select the best point)")
    p.add_argument("--config", default="ctr", help="base preset (default ctr)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="settings applied to every run, e.g. eval.per_epoch=20")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from oneepoch.recipes.compare import run_compare

    remedies = [r.strip() for r in args.remedies.split(",") if r.strip()]
    out = args.out or str(Path("runs") / "compare" / Path(args.data).name)
    res = run_compare(args.data, remedies, args.epochs, args.seeds, out, args.workers,
                      args.overrides, args.export, args.valid, args.patience, args.config)
    print(res.files["md"].read_text())
    print(f"figure: {res.files['png']}\nreport: {res.files['html']}  [{res.seconds:.0f} s]")
    return 0
