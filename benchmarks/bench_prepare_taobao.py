"""Time and peak memory of preparing a UserBehavior-format file of a given size.

Generates ``--rows`` rows in Taobao UserBehavior's format (user, item, category, behaviour,
timestamp; no header) into a scratch folder outside the repository, runs
``oneepoch data prepare taobao-userbehavior`` on it in a child process, and reports wall time
and the child's peak RSS (``ru_maxrss``). The generated file and the output are deleted
afterwards unless ``--keep``.

    .venv/bin/python benchmarks/bench_prepare_taobao.py --rows 10_000_000 --dir /tmp/oe-bench
    .venv/bin/python benchmarks/bench_prepare_taobao.py --rows 100_000_000 --dir /tmp/oe-bench

The generator mimics the real file's shape: ~101 rows per user, grouped by user, timestamps
in random order within a user over 2017-11-25..2017-12-03, behaviours pv 89.5% / cart 5.5% /
fav 2.9% / buy 2.1%, 4.16M items with a heavy-tailed popularity, 9,439 categories (one per
item).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

ROWS_PER_USER = 101
N_ITEMS = 4_162_024
N_CATES = 9_439
T0, T1 = 1511539200, 1512316800
BEHAVIOR_P = {"pv": 0.895, "cart": 0.055, "fav": 0.029, "buy": 0.021}


def generate(path: Path, rows: int, seed: int = 0, chunk: int = 2_000_000) -> float:
    """Write ``rows`` UserBehavior-format rows to ``path``; return seconds taken."""
    t = time.monotonic()
    rng = np.random.default_rng(seed)
    names = np.array(list(BEHAVIOR_P), dtype=object)
    probs = np.array(list(BEHAVIOR_P.values()))
    opts = pacsv.WriteOptions(include_header=False, quoting_style="none")
    done = 0
    with pacsv.CSVWriter(str(path), pa.schema([
            ("user", pa.int64()), ("item", pa.int64()), ("category", pa.int64()),
            ("behavior", pa.string()), ("timestamp", pa.int64())]), write_options=opts) as w:
        while done < rows:
            n = min(chunk, rows - done)
            user = 1 + (done + np.arange(n)) // ROWS_PER_USER  # grouped by user, like the file
            rank = (N_ITEMS * rng.random(n) ** 3).astype(np.int64)  # heavy-tailed popularity
            item = 1 + (rank * 2_654_435_761) % 5_163_070  # scattered IDs, one category each
            cate = 1 + (item * 40_503) % N_CATES
            beh = names[np.searchsorted(np.cumsum(probs), rng.random(n) * probs.sum())]
            ts = rng.integers(T0, T1, n)
            w.write_table(pa.table({"user": user, "item": item, "category": cate,
                                    "behavior": pa.array(beh, type=pa.string()),
                                    "timestamp": ts}))
            done += n
            print(f"  generated {done:,} / {rows:,} rows", file=sys.stderr, flush=True)
    return time.monotonic() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=lambda s: int(s.replace("_", "")), default=10_000_000)
    p.add_argument("--dir", default="/tmp/oneepoch-bench-taobao",
                   help="scratch folder (outside the repository)")
    p.add_argument("--keep", action="store_true", help="keep the generated file and output")
    p.add_argument("--json", help="also write the result to this file")
    p.add_argument("--set", nargs="*", default=[], help="preparer options, key=value")
    args = p.parse_args(argv)
    scratch = Path(args.dir)
    repo = Path(__file__).resolve().parents[1]
    if scratch.resolve().is_relative_to(repo):
        p.error(f"--dir {scratch} is inside the repository; use a scratch folder")
    scratch.mkdir(parents=True, exist_ok=True)
    raw, out = scratch / "UserBehavior.csv", scratch / "prepared"
    try:
        gen_s = generate(raw, args.rows)
        size = raw.stat().st_size
        print(f"generated {args.rows:,} rows ({size / 1e9:.2f} GB) in {gen_s:.0f} s",
              file=sys.stderr)
        cmd = [sys.executable, "-m", "oneepoch.cli", "data", "prepare", "taobao-userbehavior",
               "--raw", str(raw), "--out", str(out), "--overwrite", *(
                   ["--set", *args.set] if args.set else [])]
        t = time.monotonic()
        proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
        wall = time.monotonic() - t
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if proc.returncode:
            print(f"preparer failed (exit {proc.returncode})", file=sys.stderr)
            return proc.returncode
        summary = json.loads((out / "prepare.json").read_text())
        res = {"rows": args.rows, "file_gb": round(size / 1e9, 3), "seconds": round(wall, 1),
               "rows_per_s": round(args.rows / wall), "peak_rss_gib": round(peak_kib / 2**20, 3),
               "samples": summary["samples"], "engagements": summary["extra"].get("engagements")}
        print(json.dumps(res))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
