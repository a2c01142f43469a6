"""Scale: training step time and peak RSS with a 10^5 vs a 10^7-ID item table (dim 8, 64).

Paper A's base model shape (5 single-ID fields, 2 histories of up to 20 items sharing the item
table, MLP 200-80-1 with Dice, Adam) on random Zipf-distributed batches of 1024, through the
step ``train()`` takes; each setting runs in a fresh subprocess, one thread, and the two table
sizes alternate (10^5, 10^7, 10^5, 10^7, ...) for ``--repeats`` processes each, so both see the
same drift of a shared machine; medians of the processes. Writes benchmarks/results/scale.json.

    python benchmarks/bench_scale.py [--steps 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from oneepoch.io import atomic_write_json

RESULTS = Path(__file__).parent / "results"


def worker(n_items: int, dim: int, steps: int) -> dict:
    import numpy as np
    import torch

    from oneepoch.config import ModelConfig, OptimConfig
    from oneepoch.data.batcher import Batch
    from oneepoch.models.ctr import build_model
    from oneepoch.training.fused import FusedStep
    from oneepoch.training.optim import build_optimizer

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    vocabs = {"age": 11, "gender": 4, "item": n_items + 1, "cate": 201, "scene": 20}
    fields = ["age", "gender", "item", "cate", "scene", "item", "cate"]
    model = build_model(ModelConfig(emb_dim=dim), vocabs, fields, n_single=5)
    opt = build_optimizer(model, OptimConfig())
    bsz, max_len = 1024, 20

    def zipf(size: tuple[int, ...]) -> torch.Tensor:
        r = np.minimum(rng.zipf(1.3, size), n_items)  # heavy-tailed over the whole table
        return torch.from_numpy(r.astype(np.int64))

    def batch() -> Batch:
        ids = torch.stack([torch.randint(1, 11, (bsz,)), torch.randint(1, 4, (bsz,)),
                           zipf((bsz,)), torch.randint(1, 201, (bsz,)),
                           torch.randint(1, 20, (bsz,))], 1)
        lens = torch.randint(5, max_len + 1, (bsz,))
        return Batch(ids, [zipf((bsz, max_len)), torch.randint(1, 201, (bsz, max_len))],
                     [lens, lens], (torch.rand(bsz) < 0.5).float())

    batches = [batch() for _ in range(20)]
    lossf = torch.nn.functional.binary_cross_entropy_with_logits
    model.train()
    fast = None if FusedStep.why_not(model, opt) else FusedStep(model, opt, bsz, [max_len] * 2)

    def run(n: int) -> tuple[float, float]:
        t, c = time.perf_counter(), time.thread_time()
        for i in range(n):
            b = batches[i % len(batches)]
            if fast is not None:  # the step train() takes
                fast.step_batch(b)
                continue
            opt.zero_grad()
            lossf(model(b), b.label).backward()
            opt.step()
        return (time.perf_counter() - t) / n, (time.thread_time() - c) / n

    run(10)
    rounds = sorted(run(steps) for _ in range(3))
    return {"n_items": n_items, "dim": dim, "table_rows": model.embedding.table_rows,
            "step": "fused" if fast is not None else "autograd",
            "step_ms_wall": rounds[1][0] * 1e3, "step_ms_cpu": rounds[1][1] * 1e3,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5, help="processes per setting")
    ap.add_argument("--worker", nargs=2, type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1], a.steps)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = []
    for dim in (8, 64):
        per: dict[int, list[dict]] = {10**5: [], 10**7: []}
        for _ in range(a.repeats):
            for n in per:
                r = subprocess.run([sys.executable, __file__, "--worker", str(n), str(dim),
                                    "--steps", str(a.steps)], capture_output=True, text=True,
                                   env=env)
                if r.returncode:
                    raise SystemExit(f"bench_scale worker (dim {dim}, {n:,} IDs) failed:\n"
                                     f"{r.stderr[-3000:]}")
                per[n].append(json.loads(r.stdout.strip().splitlines()[-1]))
        for n, rs in per.items():
            res = dict(rs[0])
            for k in ("step_ms_wall", "step_ms_cpu"):
                res[k] = statistics.median(x[k] for x in rs)
                res[k + "_processes"] = [x[k] for x in rs]
            res["peak_rss_mib"] = max(x["peak_rss_mib"] for x in rs)
            out.append(res)
            print(f"dim {dim:>2}, {n:>10,} item IDs: step {res['step_ms_wall']:.2f} ms wall / "
                  f"{res['step_ms_cpu']:.2f} ms CPU (median of {len(rs)} processes), peak RSS "
                  f"{res['peak_rss_mib']:,.0f} MiB", flush=True)
        small, big = out[-2], out[-1]
        pairs = [b / s for s, b in zip(small["step_ms_cpu_processes"],  # run back to back
                                       big["step_ms_cpu_processes"], strict=True)]
        big["ratio_to_1e5_pairs"] = pairs
        big["ratio_to_1e5_median"] = statistics.median(pairs)
        print(f"dim {dim}: 10^7 / 10^5 step time (CPU) = "
              f"{big['step_ms_cpu'] / small['step_ms_cpu']:.2f}x (medians); "
              f"{big['ratio_to_1e5_median']:.2f}x (median of the processes run back to back: "
              + ", ".join(f"{x:.2f}" for x in pairs) + ")")
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "scale.json", out)
    print(f"wrote {RESULTS / 'scale.json'}")


if __name__ == "__main__":
    main()
