"""The monitor's cost outside evaluation: the time of one ``Monitor.step(loss)`` call (the
counter, the loss sum, the schedule look-up) against one training step of paper A's base
model (batch 1024, the fused step ``train()`` uses; ``ONEEPOCH_FUSED=0``: autograd), at one
thread. Writes benchmarks/results/monitor.json; the issue's bound is 2% of a step.

    python benchmarks/bench_monitor.py [--rows 400000] [--steps 200] [--calls 200000]

The base step is timed one batch at a time (``--steps`` of them, the median), as a user's own
loop calls it; the monitor's call is timed over ``--calls`` calls that fall between
evaluations, with the loss handed over as a Python float and as a 0-d tensor.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from oneepoch.io import atomic_write_json

RESULTS = Path(__file__).parent / "results"


def measure(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from oneepoch.config import TrainConfig, load_config
    from oneepoch.data.batcher import Batcher
    from oneepoch.monitor import Monitor
    from oneepoch.training.fused import FusedStep
    from oneepoch.training.trainer import build, epoch_order, prepare_data

    torch.set_num_threads(1)
    cfg = load_config(TrainConfig, "ctr", [f"data.path={args.data}", f"batch_size={args.batch}"])
    data = prepare_data(cfg)
    model, opt = build(cfg, data)
    model.train()
    tr = data.splits["train"]
    batcher = Batcher(tr, cfg.batch_size)
    fast = FusedStep.build(model, opt, batcher)
    order = epoch_order(len(tr), 0, "every", 0)
    it = batcher.epoch_rows(np.concatenate([order] * (
        (args.steps + 20) * cfg.batch_size // len(order) + 1)))
    lossf = torch.nn.functional.binary_cross_entropy_with_logits

    def one() -> float:
        rows = next(it)
        t = time.perf_counter()
        if fast is not None:
            fast.steps(rows)
        else:
            b = batcher.get(rows)
            loss = lossf(model(b), b.label)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return time.perf_counter() - t

    for _ in range(10):
        one()
    step_s = statistics.median(one() for _ in range(args.steps))

    with tempfile.TemporaryDirectory() as tmp:
        x = torch.zeros(4, 1)
        sets = [(x, torch.tensor([0.0, 1.0, 0.0, 1.0]))]
        # between evaluations only: no evaluation falls inside the timed calls
        mon = Monitor(Path(tmp) / "run", 10 ** 9, sets, predict=lambda b: b[:, 0],
                      keep_best="none", epochs=1, per_epoch=1, at_start=False)
        loss_t = torch.tensor(0.5)
        out = {}
        for name, loss in (("float", 0.5), ("tensor", loss_t)):
            best = float("inf")
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(args.calls):
                    mon.step(loss)
                best = min(best, (time.perf_counter() - t) / args.calls)
            out[name] = best
        mon.close()
    worst = max(out.values())
    return {"machine": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "batch": cfg.batch_size, "threads": 1,
            "step_path": "fused" if fast is not None else "autograd",
            "base_step_ms": step_s * 1e3, "monitor_step_us_float": out["float"] * 1e6,
            "monitor_step_us_tensor": out["tensor"] * 1e6,
            "overhead_pct_of_step": 100 * worst / step_s, "bound_pct": 2.0,
            "within_bound": bool(100 * worst / step_s < 2.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--steps", type=int, default=200, help="base steps timed")
    ap.add_argument("--calls", type=int, default=200_000, help="monitor calls timed")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--data", help="data set (default: the built-in one, as bench_core)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    a = ap.parse_args()
    if not a.data:
        from oneepoch.data.synthetic import SynthConfig
        from oneepoch.recipes.demo import ensure_synthetic

        a.data = str(Path("runs") / "bench-data")
        ensure_synthetic(Path(a.data), SynthConfig(n_train=a.rows))
    r = measure(a)
    print(json.dumps(r))
    print(f"monitor.step: {r['monitor_step_us_tensor']:.2f} us (tensor loss), "
          f"{r['monitor_step_us_float']:.2f} us (float) vs a base step of "
          f"{r['base_step_ms']:.2f} ms: {r['overhead_pct_of_step']:.3f}% (bound 2%)")
    if not a.no_write:
        RESULTS.mkdir(exist_ok=True)
        atomic_write_json(RESULTS / "monitor.json", r)


if __name__ == "__main__":
    main()
