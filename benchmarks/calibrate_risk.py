"""Calibrate ``oneepoch data risk``'s rule: risk figures beside the measured one-epoch drop.

For each data set (the built-in synthetic one and variants of its world, and every real sample
in ../shared/data/ that is present), prepares it under ``--work`` (unless there already), runs
:func:`oneepoch.data.risk.data_risk` and the base model (``oneepoch train --config ctr``,
3 epochs, one thread), and tabulates the riskiest field's shares beside the drop in test AUC
right after the end of epoch 1 (the verdict's first boundary) and the verdict. Writes
``benchmarks/results/risk_calibration.json`` and prints the Markdown table of
docs/diagnostics.md.

    python benchmarks/calibrate_risk.py --work /tmp/oe-risk-calib [--seeds 0 1] [--only synth]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from oneepoch.data.risk import data_risk, rare_seen_share
from oneepoch.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
if not SHARED.exists():
    SHARED = Path("/work/shared/data")
RESULTS = Path(__file__).parent / "results"

# name -> (how to make it, CLI arguments, extra training settings)
SETS: dict[str, tuple[str, list[str], list[str]]] = {
    "synth": ("synth", [], []),
    "synth n_items=20k": ("synth", ["n_items=20000"], []),
    "synth n_items=50k": ("synth", ["n_items=50000"], []),
    "synth n_items=150k": ("synth", ["n_items=150000"], []),
    "synth n_items=2M": ("synth", ["n_items=2000000"], []),
    "synth item_zipf=1.2": ("synth", ["item_zipf=1.2"], []),
    "synth item_bias_std=0": ("synth", ["item_bias_std=0"], []),
    "synth n_items=2M item_bias_std=0": ("synth", ["n_items=2000000", "item_bias_std=0"], []),
    "ml-100k": ("movielens", [str(SHARED / "ml-100k")], ["batch_size=128"]),
    "ml-100k split=global": ("movielens", [str(SHARED / "ml-100k"), "split=global"],
                             ["batch_size=128"]),
    "amazon-book-kgat": ("interactions", [str(SHARED / "amazon-book-kgat/interactions.csv.gz"),
                                          "split=split"], ["eval.per_epoch=10"]),
    "taobao-mb": ("interactions", [str(SHARED / "taobao-mb/interactions.csv.gz"), "label=buy",
                                   "where=view", "split=view_split"], []),
}


def cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "oneepoch.cli", *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}")


def make(name: str, out: Path) -> bool:
    kind, args, _ = SETS[name]
    if (out / "schema.yaml").exists():
        return True
    if kind == "synth":
        cli("data", "synth", "--out", str(out), *(["--set", *args] if args else []))
        return True
    raw = Path(args[0])
    if not raw.exists():
        print(f"skip {name}: {raw} not found", file=sys.stderr)
        return False
    sets = args[1:]
    cli("data", "prepare", kind, "--raw", str(raw), "--out", str(out), "--quiet",
        *(["--set", *sets] if sets else []))
    return True


def bucket_curves(ddir: Path, run: Path, seed: int = 0) -> list[dict]:
    """Train the base model on ``ddir`` with per-bucket test AUC at every evaluation (a hook
    predicting the test split once more: this measures, it does not time) and write the run's
    report, with its per-bucket figure."""
    import numpy as np

    from oneepoch.config import TrainConfig, load_config
    from oneepoch.data.batcher import Batcher
    from oneepoch.data.risk import frequency_buckets
    from oneepoch.metrics import bucket_metrics
    from oneepoch.report.run_report import build_report
    from oneepoch.training.trainer import Hook, predict, train

    class Buckets(Hook):
        def on_train_start(self, s):  # noqa: ANN001
            self.b, self.names, _ = frequency_buckets(s.data, s.cfg.eval.bucket_field,
                                                      s.cfg.eval.bucket_bounds)
            test = s.data.splits[s.cfg.data.test_split]
            self.batcher = Batcher(test, s.cfg.eval.batch_size, s.cfg.device)
            self.y = np.asarray(test.label)

        def on_eval(self, s, row):  # noqa: ANN001
            p = predict(s.model, self.batcher)
            row.update(bucket_metrics(self.y, p, self.b, self.names))

    cfg = load_config(TrainConfig, "ctr", [f"data.path={ddir}", "epochs=3", "threads=1",
                                           "progress=false", f"seed={seed}",
                                           f"out_dir={run.parent}", f"name={run.name}"])
    rows = train(cfg, hooks=[Buckets()]).metrics
    build_report([run])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/oe-risk-calib")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--only", nargs="*", help="data-set names (default: all)")
    ap.add_argument("--bucket-curves", metavar="NAME",
                    help="instead: one run on this data set with per-bucket test AUC")
    args = ap.parse_args()
    work = Path(args.work)
    if args.bucket_curves:
        slug = args.bucket_curves.replace(" ", "_").replace("=", "-")
        make(args.bucket_curves, work / "data" / slug)
        rows = bucket_curves(work / "data" / slug, work / "buckets" / slug)
        keep = [r for r in rows if abs(r["epoch"] * 4 - round(r["epoch"] * 4)) < 1e-6 or
                0.99 < r["epoch"] < 1.2 or 1.99 < r["epoch"] < 2.2]
        names = [k[9:] for k in rows[0] if k.startswith("test_auc_")]
        print("| epoch | test AUC | " + " | ".join(f"{n} ({rows[-1]['test_n_' + n]:,})"
                                                   for n in names) + " |")
        print("|---:|---:|" + "---:|" * len(names))
        for r in keep:
            print(f"| {r['epoch']:.2f} | {r['test_auc']:.4f} | " +
                  " | ".join(f"{r['test_auc_' + n]:.4f}" for n in names) + " |")
        print(f"report: {work / 'buckets' / slug / 'report.html'}")
        return
    rows = []
    for name in args.only or list(SETS):
        slug = name.replace(" ", "_").replace("=", "-")
        ddir = work / "data" / slug
        if not make(name, ddir):
            continue
        r = data_risk(ddir)
        worst = max(r["fields"], key=rare_seen_share)
        vocab = worst["vocab_row_share"] or worst["row_share"]
        for seed in args.seeds:
            run = work / "runs" / f"{slug}-s{seed}"
            if not (run / "summary.json").exists():
                cli("train", "--config", "ctr", f"data.path={ddir}", "epochs=3", "threads=1",
                    "progress=false", f"seed={seed}", f"out_dir={run.parent}", f"name={run.name}",
                    *SETS[name][2])
            summ = json.loads((run / "summary.json").read_text())
            det = summ["verdict_detail"]
            b1 = det["boundaries"][0] if det["boundaries"] else {}
            rows.append({
                "data": name, "seed": seed, "level": r["level"], "field": worst["field"],
                "rows_le": {str(k): worst["row_share"][k] for k in r["ks"]},
                "rare_seen": rare_seen_share(worst),
                "vocab_rows_le": {str(k): vocab[k] for k in r["ks"]},
                "train_ids": worst["train_ids"], "test_rows": worst["test_rows"],
                "drop_epoch1": b1.get("drop", float("nan")),
                "drop_epoch2": (det["boundaries"][1]["drop"] if len(det["boundaries"]) > 1
                                else float("nan")),
                "change_before": b1.get("change_before", float("nan")),
                "phenomenon": det["phenomenon"], "best_epoch": det["best_epoch"],
                "best_auc": det["best_auc"], "verdict": summ["verdict"],
            })
            print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "risk_calibration.json"
    if args.only:  # merge into earlier results
        old = json.loads(out.read_text()) if out.exists() else []
        keep = {(x["data"], x["seed"]) for x in rows}
        rows = [x for x in old if (x["data"], x["seed"]) not in keep] + rows
    atomic_write_text(out, json.dumps(rows, indent=1))
    print(table(rows))


def table(rows: list[dict]) -> str:
    """The calibration table (Markdown): one line per data set, seeds side by side."""
    lines = ["| data | field | test rows: unseen / seen 1-2 / seen <= 5 | pooled with history "
             "<= 2 | rule | drop after epoch 1 (pt, per seed) | after epoch 2 | best epoch |",
             "|---|---|---|---|---|---|---|---|"]
    by: dict[str, list[dict]] = {}
    for x in rows:
        by.setdefault(x["data"], []).append(x)
    for name, xs in by.items():
        x = xs[0]
        r = x["rows_le"]
        lines.append(
            f"| {name} | {x['field']} | {100 * r['0']:.1f}% / {100 * x['rare_seen']:.1f}% / "
            f"{100 * r['5']:.1f}% | {100 * x['vocab_rows_le']['2']:.1f}% | {x['level']} | "
            + ", ".join(f"{100 * y['drop_epoch1']:+.2f}" for y in xs) + " | "
            + ", ".join(f"{100 * y['drop_epoch2']:+.2f}" for y in xs) + " | "
            + ", ".join(f"{y['best_epoch']:.2f}" for y in xs) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
