"""Stage-1 (paper B) throughput: positive pairs/s of one training step of ``oneepoch
pretrain`` at dim 64, batch 4096, 4096 uniform negatives (in-batch negatives too), with
row-wise sparse Adam on 10^6-row user and item tables, at 1 and 2 threads; beside it the bound
set by the step's three GEMMs (forward logits and the two gradient products) at the same
shapes, timed alone in their fastest row blocking, and oneepoch's fraction of it (the median
of the per-round fractions, a step and the GEMMs timed back to back); and the rate
of full-catalogue evaluation (held-out pairs ranked against every item for Hit/Recall/NDCG@K).
Writes benchmarks/results/pretrain.json.

    python benchmarks/bench_pretrain.py [--rows 1000000] [--steps 5] [--threads 1,2]

One subprocess; after warm-up, ``--steps`` rounds in which the thread counts alternate (a step
and the bound's GEMMs at 1 thread, then at 2, ...), so both see the same state of a shared
machine; medians per thread count, and the median of the per-round ratios as the speed-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from oneepoch.io import atomic_write_json

RESULTS = Path(__file__).parent / "results"


def worker(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from oneepoch.config import load_config
    from oneepoch.pretrain.config import PretrainConfig
    from oneepoch.pretrain.model import TwoTower
    from oneepoch.pretrain.train import Stage1Step
    from oneepoch.training.optim import build_optimizer

    b, n, d, rows = args.batch, args.negatives, args.dim, args.rows
    cfg = load_config(PretrainConfig, "pretrain", [f"batch_size={b}", f"loss.n_uniform={n}",
                                                   f"model.dim={d}"])

    class _Data:  # catalogue facts the step needs (popularity only matters with logQ)
        n_users, n_items = rows, rows

        def item_freq(self) -> np.ndarray:
            return np.full(rows, 1.0 / rows)

    model = TwoTower(rows, rows, d)
    opt = build_optimizer(model, cfg.optim)
    step = Stage1Step(model, cfg, _Data())
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    # Zipf-like item popularity, so batches repeat popular rows as real logs do
    pop = 1.0 / np.arange(1, rows + 1) ** 0.9
    cdf = np.cumsum(pop / pop.sum())

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        u = torch.from_numpy(rng.integers(1, rows, b))
        i = torch.from_numpy(np.minimum(np.searchsorted(cdf, rng.random(b)), rows - 1))
        return u, i.clamp(min=1)

    def one_step() -> float:
        u, i = batch()
        t = time.perf_counter()
        loss = step.loss(u, i, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    # The bound: the step's three products (logits u c^T, then g c and g^T u), timed alone in
    # the fastest row blocking (whole 4096 x 8192 products are memory-bound on this machine).
    a = torch.randn(b, d)
    c = torch.randn(b + n, d)
    gc = torch.zeros(b + n, d)

    def gemms(block: int) -> float:
        t = time.perf_counter()
        for r in range(0, b, block):
            z = a[r:r + block] @ c.t()
            z @ c
            gc.addmm_(z.t(), a[r:r + block])
        return time.perf_counter() - t

    blocks = tuple(sorted({k for k in (128, 256, 512) if k < b} | {b}))
    for threads in args.threads:  # warm-up
        torch.set_num_threads(threads)
        one_step()
        one_step()
    times: dict[int, list[float]] = {t: [] for t in args.threads}
    gemm: dict[int, dict[int, list[float]]] = {t: {k: [] for k in blocks} for t in args.threads}
    for _ in range(args.steps):  # thread counts alternate: both see the same machine state
        for threads in args.threads:
            torch.set_num_threads(threads)
            times[threads].append(one_step())
            for k in blocks:
                gemm[threads][k].append(gemms(k))
    # full-catalogue evaluation: held-out pairs ranked against every item (Hit/Recall/NDCG@K)
    from oneepoch.pretrain.evaluate import ranking_metrics

    ut, it = model.tables()
    uu = rng.integers(1, rows, args.eval_pairs)
    ii = rng.integers(1, rows, args.eval_pairs)
    ranking_metrics(ut, it, uu[:32], ii[:32], cfg.eval.ks, candidate_start=1)
    flops = 3 * 2 * b * (b + n) * d
    runs = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        t = time.perf_counter()
        ranking_metrics(ut, it, uu, ii, cfg.eval.ks, candidate_start=1)
        eval_s = time.perf_counter() - t
        med = {k: float(np.median(v)) for k, v in gemm[threads].items()}
        best = min(med, key=med.get)
        step_s, gemm_s = float(np.median(times[threads])), med[best]
        # the fraction per round (the step and the bound's GEMMs timed back to back), median:
        # a shared machine's speed drifts between rounds, not within one
        frac = [g / s for g, s in zip(gemm[threads][best], times[threads], strict=True)]
        runs.append({"threads": threads, "pairs_per_s": b / step_s, "step_ms": 1000 * step_s,
                     "step_ms_rounds": [1000 * x for x in times[threads]],
                     "gemm_ms_rounds": [1000 * x for x in gemm[threads][best]],
                     "gemm_bound_pairs_per_s": b / gemm_s,
                     "fraction_of_bound": float(np.median(frac)),
                     "fraction_of_bound_rounds": frac,
                     "fraction_of_medians": gemm_s / step_s,
                     "gemm_gflops": flops / gemm_s / 1e9, "gemm_block_rows": best,
                     "gemm_ms_by_block": {k: 1000 * v for k, v in med.items()},
                     "eval_pairs_per_s": args.eval_pairs / eval_s, "eval_pairs": args.eval_pairs,
                     "eval_ks": list(cfg.eval.ks)})
    base = times[args.threads[0]]
    speedup = {t: float(np.median([x / y for x, y in zip(base, v, strict=True)]))
               for t, v in times.items()}
    return {"runs": runs, "speedup_per_round_median": speedup}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of each table")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--negatives", type=int, default=4096)
    p.add_argument("--steps", type=int, default=11, help="rounds (one step per thread count)")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--eval-pairs", type=int, default=256,
                   help="held-out pairs ranked against the full catalogue (evaluation rate)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.threads = [int(t) for t in str(args.threads).split(",")]
    if args.worker:
        print(json.dumps(worker(args)))
        return
    out = {"shape": {"rows": args.rows, "dim": args.dim, "batch": args.batch,
                     "uniform_negatives": args.negatives, "in_batch": True},
           "machine": platform.processor() or platform.machine()}
    cmd = [sys.executable, __file__, "--worker", "--threads", ",".join(map(str, args.threads)),
           "--rows", str(args.rows), "--dim", str(args.dim), "--batch", str(args.batch),
           "--negatives", str(args.negatives), "--steps", str(args.steps), "--eval-pairs",
           str(args.eval_pairs)]
    r = json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                  text=True).stdout.strip().splitlines()[-1])
    out.update(r)
    for run in r["runs"]:
        print(f"stage 1, {run['threads']} thread(s): {run['pairs_per_s']:,.0f} pairs/s "
              f"({run['step_ms']:.0f} ms/step, median of {len(run['step_ms_rounds'])}); GEMM "
              f"bound {run['gemm_bound_pairs_per_s']:,.0f} pairs/s ({run['gemm_gflops']:.0f} "
              f"GFLOP/s in {run['gemm_block_rows']}-row blocks); "
              f"{100 * run['fraction_of_bound']:.0f}% of it (median of per-round fractions); "
              "full-catalogue evaluation "
              f"{run['eval_pairs_per_s']:,.0f} held-out pairs/s against {args.rows:,} items")
    for t, x in r["speedup_per_round_median"].items():
        if int(t) != args.threads[0]:
            print(f"speed-up {t} vs {args.threads[0]} thread(s), median of per-round ratios: "
                  f"{x:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "pretrain.json", out)


if __name__ == "__main__":
    main()
