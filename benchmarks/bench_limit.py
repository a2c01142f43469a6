"""The machine's limit for paper A's base model: measured matmul GFLOP/s on the MLP's shapes
(56-200-80-1, batch 1024: 3 forward GEMMs, 5 backward ones) and the resulting compute ceiling
in samples/s (about 164 kFLOP per sample forward + backward). Writes results/limit.json.

    python benchmarks/bench_limit.py [--threads 1 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from oneepoch.io import atomic_write_json

RESULTS = Path(__file__).parent / "results"
DIMS = (56, 200, 80, 1)


def gemm_flops_per_sample(dims: tuple[int, ...] = DIMS) -> int:
    """Forward (x W) + backward (dX = dY W^T except for the input layer's own input, which
    feeds the embeddings and is counted too; dW = X^T dY): 3 x 2 x sum(d_in x d_out)."""
    return 3 * 2 * sum(a * b for a, b in zip(dims[:-1], dims[1:], strict=False))


def measure(threads: int, batch: int = 1024, reps: int = 300, best_of: int = 5) -> float:
    """GFLOP/s of the MLP's GEMMs at ``threads`` threads: the best of ``best_of`` timings of
    ``reps / best_of`` passes (3 GEMMs per layer), after warm-up."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, d, generator=g) for d in DIMS]
    ws = [torch.randn(b, a, generator=g) for a, b in zip(DIMS[:-1], DIMS[1:], strict=False)]

    def once() -> None:
        for i, w in enumerate(ws):
            torch.mm(xs[i], w.t())  # forward
            torch.mm(xs[i + 1], w)  # dX
            torch.mm(xs[i + 1].t(), xs[i])  # dW

    for _ in range(min(20, reps)):
        once()
    best = float("inf")
    per = max(1, reps // best_of)
    for _ in range(best_of):
        t = time.perf_counter()
        for _ in range(per):
            once()
        best = min(best, (time.perf_counter() - t) / per)
    return gemm_flops_per_sample() * batch / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    a = ap.parse_args()
    fps = gemm_flops_per_sample()
    out = {"flops_per_sample": fps, "runs": []}
    for t in a.threads:
        gf = measure(t)
        ceiling = gf * 1e9 / fps
        out["runs"].append({"threads": t, "gflops": gf, "ceiling_samples_per_s": ceiling})
        print(f"threads={t}: {gf:.1f} GFLOP/s on the MLP's GEMMs -> compute ceiling "
              f"{ceiling:,.0f} samples/s ({fps / 1e3:.0f} kFLOP/sample)")
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "limit.json", out)


if __name__ == "__main__":
    main()
