"""Benchmark of the diagnostics: ``oneepoch data risk`` on a 10^8-row file, and the cost of
per-bucket test AUC against the evaluation it rides on.

1. Writes a CTR data set of ``--rows`` training rows (default 10^8) into a temporary folder:
   ``user_id`` (uniform over 10^7), ``item_id`` (skewed over 10^7: ``floor(N u^3)``),
   ``cate_id`` (1,000), a label, in row groups of 2^20 rows, plus a 10^6-row test split; then
   runs ``data_risk`` in a fresh process and records its wall time and peak RSS (targets:
   under 120 s and 2 GiB at 10^8 rows). The folder is deleted afterwards unless ``--keep``.
2. Trains nothing: builds paper A's base model on a default-sized synthetic data set (50,000
   test rows) and times one test evaluation (forward pass + AUC + logloss, as the trainer does)
   against :func:`oneepoch.metrics.bucket_metrics` on the same predictions (buckets computed
   once per run by :func:`oneepoch.data.risk.frequency_buckets`, as the trainer does).

Writes ``benchmarks/results/risk.json``.

    python benchmarks/bench_risk.py [--rows 100_000_000] [--dir /tmp/oe-bench-risk] [--keep]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from oneepoch.io import atomic_write_text

RESULTS = Path(__file__).parent / "results"
GROUP = 1 << 20
N_IDS = 10_000_000

_RUN = """
import json, resource, sys, time
from oneepoch.data.risk import data_risk
t = time.perf_counter()
r = data_risk(sys.argv[1])
print(json.dumps({"seconds": time.perf_counter() - t, "level": r["level"],
                  "expectation": r["expectation"], "io": r["io"],
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_data(d: Path, rows: int, test_rows: int = 1_000_000, seed: int = 0) -> float:
    """The benchmark's data set; returns the files' size in GiB."""
    rng = np.random.default_rng(seed)
    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()),
                        ("cate_id", pa.int32()), ("label", pa.int8())])

    def chunk(n: int) -> pa.Table:
        u = rng.random(n)
        u *= u * u
        return pa.table({"user_id": rng.integers(0, N_IDS, n),
                         "item_id": (u * N_IDS).astype(np.int64),
                         "cate_id": rng.integers(0, 1000, n, dtype=np.int32),
                         "label": (rng.random(n) < 0.1).astype(np.int8)}, schema)

    d.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(d / "train.parquet", schema) as w:
        for a in range(0, rows, GROUP):
            w.write_table(chunk(min(GROUP, rows - a)))
    pq.write_table(chunk(test_rows), d / "test.parquet", row_group_size=GROUP)
    (d / "schema.yaml").write_text("label: label\nfeatures: {user_id: id, item_id: id, "
                                   "cate_id: id}\nsplits: {train: train.parquet, "
                                   "test: test.parquet}\n")
    return sum(p.stat().st_size for p in d.glob("*.parquet")) / 2**30


def bench_risk(rows: int, root: Path | None, keep: bool) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="oe-bench-risk-", dir=root))
    try:
        t = time.perf_counter()
        gib = write_data(tmp / "data", rows)
        gen = time.perf_counter() - t
        print(f"wrote {rows:,} rows ({gib:.2f} GiB) in {gen:.0f} s", flush=True)
        out = subprocess.run([sys.executable, "-c", _RUN, str(tmp / "data")], check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        r.update(rows=rows, file_gib=gib, generate_seconds=gen,
                 rows_per_s=(rows + r["io"]["test_rows"]) / r["seconds"])
        print(f"data risk: {r['seconds']:.1f} s ({r['rows_per_s']:,.0f} rows/s), peak RSS "
              f"{r['peak_rss_mib']:,.0f} MiB; {r['expectation']}", flush=True)
        return r
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def bench_buckets(root: Path | None, repeats: int = 5) -> dict:
    import torch

    from oneepoch.config import TrainConfig, load_config
    from oneepoch.data.batcher import Batcher
    from oneepoch.data.dataset import load_ctr
    from oneepoch.data.risk import frequency_buckets
    from oneepoch.data.synthetic import SynthConfig, write_synthetic
    from oneepoch.metrics import auc, bucket_metrics, logloss
    from oneepoch.training.trainer import build, predict

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="oe-bench-buckets-", dir=root))
    try:
        write_synthetic(tmp / "synth", SynthConfig())
        data = load_ctr(tmp / "synth")
        cfg = load_config(TrainConfig, "ctr", [f"data.path={tmp / 'synth'}", "threads=1"])
        model, _ = build(cfg, data)
        test = data.splits["test"]
        batcher = Batcher(test, cfg.eval.batch_size, cfg.device)
        labels = np.asarray(test.label)
        t = time.perf_counter()
        buckets, names, ranges = frequency_buckets(data, cfg.eval.bucket_field,
                                                   cfg.eval.bucket_bounds)
        assign = time.perf_counter() - t
        ev, bk = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            p = predict(model, batcher)
            auc(labels, p)
            logloss(labels, p)
            ev.append(time.perf_counter() - t)
            t = time.perf_counter()
            m = bucket_metrics(labels, p, buckets, names)
            bk.append(time.perf_counter() - t)
        r = {"test_rows": len(labels), "eval_seconds_median": float(np.median(ev)),
             "bucket_seconds_median": float(np.median(bk)), "assign_seconds_once": assign,
             "buckets": ranges, "rows_per_bucket": {n: m[f"test_n_{n}"] for n in names}}
        r["bucket_share_of_eval"] = r["bucket_seconds_median"] / r["eval_seconds_median"]
        print(f"per-bucket AUC: {1e3 * r['bucket_seconds_median']:.1f} ms per evaluation of "
              f"{len(labels):,} test rows = {100 * r['bucket_share_of_eval']:.1f}% of the "
              f"evaluation ({1e3 * r['eval_seconds_median']:.0f} ms; 1 thread); bucket "
              f"assignment once per run {1e3 * assign:.1f} ms", flush=True)
        return r
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=lambda s: int(s.replace("_", "")), default=100_000_000)
    ap.add_argument("--dir", help="parent folder of the temporary data (default: system temp)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--skip-risk", action="store_true")
    args = ap.parse_args()
    root = Path(args.dir) if args.dir else None
    if root:
        root.mkdir(parents=True, exist_ok=True)
    out = {"machine_cores": __import__("os").cpu_count()}
    if not args.skip_risk:
        out["risk"] = bench_risk(args.rows, root, args.keep)
    out["buckets"] = bench_buckets(root)
    out["peak_rss_mib_parent"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "risk.json"
    atomic_write_text(path, json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
