"""Core speed: training samples/s of paper A's base model (1 and 2 threads), evaluation
rows/s, AUC over 10^7 predictions, and peak RSS. Writes benchmarks/results/core.json.

    python benchmarks/bench_core.py [--rows 400000] [--steps 50] [--rounds 3] [--repeats 3]

Fresh processes with a fixed thread count (as a user runs ``threads=N``) on the built-in
synthetic data, alternating 1, 2, 1, 2, ... for ``--repeats`` repetitions so that both thread
counts see the same drift of a shared machine; each times ``--rounds`` rounds of ``--steps``
batches after warm-up, through the step ``train()`` uses (the fused native step; set
``ONEEPOCH_FUSED=0`` to time the autograd path), then one profiled round per thread count.
Reported: the median per thread count and the median of the paired
ratios as the speed-up. Evaluation and AUC are timed in every process (medians).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from oneepoch.io import atomic_write_json

RESULTS = Path(__file__).parent / "results"


def worker(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from oneepoch import kernels
    from oneepoch.config import TrainConfig, load_config
    from oneepoch.data.batcher import Batcher
    from oneepoch.metrics import auc
    from oneepoch.training.fused import PHASES, FusedStep
    from oneepoch.training.trainer import build, epoch_order, predict, prepare_data

    kernels.lib()
    cfg = load_config(TrainConfig, "ctr", [f"data.path={args.data}", f"batch_size={args.batch}"])
    data = prepare_data(cfg)
    model, opt = build(cfg, data)
    model.train()
    tr = data.splits["train"]
    batcher = Batcher(tr, cfg.batch_size)
    fast = FusedStep.build(model, opt, batcher)  # as train() does; None: autograd
    order = epoch_order(len(tr), 0, "every", 0)
    need = (20 + (args.rounds + 1) * len(args.threads) * args.steps) * cfg.batch_size
    it = batcher.epoch_rows(np.concatenate([order] * (need // len(order) + 1)))
    lossf = torch.nn.functional.binary_cross_entropy_with_logits

    def steps(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            rows = next(it)
            if fast is not None:
                fast(rows)
                continue
            b = batcher.get(rows)
            loss = lossf(model(b), b.label)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return time.perf_counter() - t

    for threads in args.threads:  # warm every thread count's pool
        torch.set_num_threads(threads)
        steps(10)
    rates: dict[int, list[float]] = {t: [] for t in args.threads}
    for _ in range(args.rounds):  # thread counts alternate, so they share the machine's state
        for threads in args.threads:
            torch.set_num_threads(threads)
            rates[threads].append(args.steps * cfg.batch_size / steps(args.steps))
    profile = {}
    if fast is not None:  # where a step's time goes (thread 0's view, barrier waits included)
        for threads in args.threads:
            torch.set_num_threads(threads)
            prof = fast.enable_profile()
            steps(args.steps)
            profile[threads] = {k: float(v) * 1e3 / args.steps
                                for k, v in zip(PHASES, prof, strict=True)}
        fast.c.prof = None
    runs = [{"threads": t, "batch": cfg.batch_size, "train_samples_per_s": float(np.median(r)),
             "train_rounds": r, "step": "fused" if fast is not None else "autograd",
             "profile_ms": profile.get(t, {})} for t, r in rates.items()]
    torch.set_num_threads(1)
    te = data.splits["test"]
    ev = Batcher(te, 16384)
    predict(model, ev)
    t = time.perf_counter()
    reps = 3
    for _ in range(reps):
        predict(model, ev)
    runs[0]["eval_rows_per_s"] = reps * len(te) / (time.perf_counter() - t)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 10_000_000)
    s = (rng.random(10_000_000) + 0.1 * y).astype(np.float32)
    t = time.perf_counter()
    auc(y, s)
    runs[0]["auc_1e7_seconds"] = time.perf_counter() - t
    base = rates[args.threads[0]]
    speedups = {t: float(np.median([x / y for x, y in zip(r, base, strict=True)]))
                for t, r in rates.items()}
    return {"runs": runs, "speedup_per_round_median": speedups,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--steps", type=int, default=50, help="steps per round")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per process")
    ap.add_argument("--repeats", type=int, default=3, help="processes per thread count")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--data", help="data set (default: generate the built-in one)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    if not a.data:
        from oneepoch.data.synthetic import SynthConfig
        from oneepoch.recipes.demo import ensure_synthetic

        a.data = str(Path("runs") / "bench-data")
        ensure_synthetic(Path(a.data), SynthConfig(n_train=a.rows))
    # Fresh processes with a fixed thread count (as a user runs threads=N), alternating
    # 1, 2, 1, 2, ... so every thread count sees the same drift of a shared machine.
    per: dict[int, list[dict]] = {t: [] for t in a.threads}
    for rep in range(a.repeats):
        for t in a.threads:
            cmd = [sys.executable, __file__, "--worker", "--data", a.data, "--steps",
                   str(a.steps), "--rounds", str(a.rounds), "--batch", str(a.batch),
                   "--threads", str(t)]
            env = {**os.environ, "OMP_NUM_THREADS": str(t), "MKL_NUM_THREADS": str(t)}
            r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True,
                                          env=env).stdout.strip().splitlines()[-1])
            r["runs"][0]["peak_rss_mib"] = r["peak_rss_mib"]
            per[t].append(r["runs"][0])
            print(f"repeat {rep} threads={t}: {r['runs'][0]['train_samples_per_s']:,.0f} "
                  "samples/s", flush=True)
    runs = []
    for t, rs in per.items():
        rounds = [x for r in rs for x in r["train_rounds"]]
        run = {"threads": t, "batch": a.batch, "train_samples_per_s": float(statistics.median(
            [r["train_samples_per_s"] for r in rs])), "train_rounds": rounds,
            "process_medians": [r["train_samples_per_s"] for r in rs],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in rs), "step": rs[0]["step"],
            "profile_ms": {k: float(statistics.median([r["profile_ms"][k] for r in rs]))
                           for k in rs[0]["profile_ms"]}}
        for k in ("eval_rows_per_s", "auc_1e7_seconds"):
            vals = [r[k] for r in rs if k in r]
            if vals:
                run[k] = float(statistics.median(vals))
        runs.append(run)
    base = per[a.threads[0]]
    speedup = {t: float(statistics.median([x["train_samples_per_s"] / y["train_samples_per_s"]
                                           for x, y in zip(rs, base, strict=True)]))
               for t, rs in per.items()}
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "python": platform.python_version()}, "runs": runs,
               "speedup_per_round_median": speedup, "repeats": a.repeats}
    for run in runs:
        line = (f"threads={run['threads']}: train {run['train_samples_per_s']:,.0f} samples/s "
                f"(median of {a.repeats} processes; rounds "
                f"{min(run['train_rounds']):,.0f}-{max(run['train_rounds']):,.0f}; batch "
                f"{run['batch']}), peak RSS {run['peak_rss_mib']:,.0f} MiB")
        if "eval_rows_per_s" in run:
            line += (f"; eval {run['eval_rows_per_s']:,.0f} rows/s; AUC over 1e7 predictions "
                     f"{run['auc_1e7_seconds']:.2f} s")
        print(line, flush=True)
        if run["profile_ms"]:
            print("  profile of a step (ms, median of processes): " + ", ".join(
                f"{k} {v:.3f}" for k, v in run["profile_ms"].items()), flush=True)
    for t, x in speedup.items():
        if t != a.threads[0]:
            print(f"{t}-thread speed-up (median of the paired process ratios): {x:.2f}x")
    import torch

    results["torch"] = torch.__version__
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "core.json", results)
    print(f"wrote {RESULTS / 'core.json'}")


if __name__ == "__main__":
    main()
