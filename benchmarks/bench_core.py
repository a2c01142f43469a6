"""Core speed: training samples/s of paper A's base model (1 and 2 threads), evaluation
rows/s, AUC over 10^7 predictions, and peak RSS. Writes benchmarks/results/core.json.

    python benchmarks/bench_core.py [--rows 400000] [--steps 150] [--data DIR]

Each measurement runs in a fresh subprocess (so thread settings and RSS are its own) on the
built-in synthetic data; training is timed over ``--steps`` batches after 20 warm-up steps,
as the median of 3 rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from oneepoch.io import atomic_write_json

RESULTS = Path(__file__).parent / "results"


def worker(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from oneepoch.config import TrainConfig, load_config
    from oneepoch.data.batcher import Batcher
    from oneepoch.metrics import auc
    from oneepoch.training.trainer import build, epoch_order, predict, prepare_data

    torch.set_num_threads(args.threads)
    cfg = load_config(TrainConfig, "ctr", [f"data.path={args.data}", f"batch_size={args.batch}"])
    data = prepare_data(cfg)
    model, opt = build(cfg, data)
    tr = data.splits["train"]
    batcher = Batcher(tr, cfg.batch_size)
    order = epoch_order(len(tr), 0, "every", 0)
    it = batcher.epoch(np.concatenate([order] * 4))
    lossf = torch.nn.functional.binary_cross_entropy_with_logits

    def steps(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            b = next(it)
            loss = lossf(model(b), b.label)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return time.perf_counter() - t

    steps(20)
    rates = sorted(args.steps * cfg.batch_size / steps(args.steps) for _ in range(3))
    out = {"threads": args.threads, "batch": cfg.batch_size,
           "train_samples_per_s": rates[1], "train_rounds": rates}
    if args.eval:
        te = data.splits["test"]
        ev = Batcher(te, 16384)
        predict(model, ev)
        t = time.perf_counter()
        reps = 3
        for _ in range(reps):
            p = predict(model, ev)
        out["eval_rows_per_s"] = reps * len(te) / (time.perf_counter() - t)
        rng = np.random.default_rng(0)
        y = rng.integers(0, 2, 10_000_000)
        s = (rng.random(10_000_000) + 0.1 * y).astype(np.float32)
        t = time.perf_counter()
        auc(y, s)
        out["auc_1e7_seconds"] = time.perf_counter() - t
        del p
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--data", help="data set (default: generate the built-in one)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--eval", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    if not a.data:
        from oneepoch.data.synthetic import SynthConfig
        from oneepoch.recipes.demo import ensure_synthetic

        a.data = str(Path("runs") / "bench-data")
        ensure_synthetic(Path(a.data), SynthConfig(n_train=a.rows))
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "python": platform.python_version()}, "runs": []}
    for threads in (1, 2):
        cmd = [sys.executable, __file__, "--worker", "--data", a.data, "--threads", str(threads),
               "--steps", str(a.steps), "--batch", str(a.batch)] + (["--eval"] if threads == 1
                                                                     else [])
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True,
                                      env=env).stdout.strip().splitlines()[-1])
        results["runs"].append(r)
        line = (f"threads={threads}: train {r['train_samples_per_s']:,.0f} samples/s "
                f"(batch {r['batch']}), peak RSS {r['peak_rss_mib']:,.0f} MiB")
        if "eval_rows_per_s" in r:
            line += (f"; eval {r['eval_rows_per_s']:,.0f} rows/s; AUC over 1e7 predictions "
                     f"{r['auc_1e7_seconds']:.2f} s")
        print(line, flush=True)
    one, two = (r["train_samples_per_s"] for r in results["runs"])
    print(f"2-thread speed-up: {two / one:.2f}x")
    import torch

    results["torch"] = torch.__version__
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "core.json", results)
    print(f"wrote {RESULTS / 'core.json'}")


if __name__ == "__main__":
    main()
