"""Two cores, two ways: one 2-thread training against two 1-thread trainings at once (the most a
2-core machine gives this workload without any synchronisation). Writes
benchmarks/results/pair.json.

    python benchmarks/bench_pair.py [--rounds 10] [--seconds 1.5] [--data DIR]

Two worker processes each build paper A's base model on the built-in synthetic data and then,
round by round and each for ``--seconds``: worker 0 trains alone on one thread, worker 1 alone
on one thread, both at once on one thread each, worker 0 on two threads (the fused steps in
one native call per 20 batches, as ``train()`` runs them between evaluations). A shared VM's
speed drifts, so only a round's own timings are compared: per round the pair's summed
samples/s and the 2-thread samples/s over the mean of the two solo runs; medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from oneepoch.io import atomic_write_json

RESULTS = Path(__file__).parent / "results"


def worker(data: str, batch: int) -> None:
    """Build, warm up, print "ready"; then per stdin line "threads start seconds": wait for
    the wall-clock start, train for that long, print samples/s."""
    import torch

    from oneepoch.config import TrainConfig, load_config
    from oneepoch.data.batcher import Batcher
    from oneepoch.training.fused import FusedStep
    from oneepoch.training.trainer import build, epoch_order, prepare_data

    cfg = load_config(TrainConfig, "ctr", [f"data.path={data}", f"batch_size={batch}"])
    data_ = prepare_data(cfg)
    model, opt = build(cfg, data_)
    model.train()
    tr = data_.splits["train"]
    batcher = Batcher(tr, batch)
    fast = FusedStep.build(model, opt, batcher)
    if fast is None:
        raise SystemExit("bench_pair: the fused step does not apply here")
    order = epoch_order(len(tr), 0, "every", 0)
    group = max(1, min(20, len(order) // batch)) * batch
    if len(order) < 2 * batch:
        raise SystemExit(f"bench_pair: {len(order)} training rows, fewer than 2 batches")

    def rows():  # endless groups of 20 batches, epoch after epoch
        while True:
            for a in range(0, len(order) - group + 1, group):
                yield order[a:a + group]

    it = rows()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        fast.steps(next(it))
    print("ready", flush=True)
    for line in sys.stdin:
        threads, start, seconds = int(line.split()[0]), *map(float, line.split()[1:])
        torch.set_num_threads(threads)
        fast.steps(next(it)[:2 * batch])
        while time.time() < start:
            pass
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            fast.steps(next(it))
            n += group
        print(n / (time.perf_counter() - t), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=1.5, help="per timing")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--data", help="data set (default: the built-in one bench_core uses)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true", help="print only (tests)")
    a = ap.parse_args()
    if not a.data:
        from oneepoch.data.synthetic import SynthConfig
        from oneepoch.recipes.demo import ensure_synthetic

        a.data = str(Path("runs") / "bench-data")
        ensure_synthetic(Path(a.data), SynthConfig(n_train=400_000))
    if a.worker:
        worker(a.data, a.batch)
        return
    cmd = [sys.executable, __file__, "--worker", "--data", a.data, "--batch", str(a.batch)]
    ws = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
          for _ in range(2)]
    try:
        for w in ws:
            if w.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
                raise SystemExit("bench_pair: a worker failed to start")

        def timed(jobs: list[tuple[int, int]]) -> list[float]:
            start = time.time() + 0.2
            for k, threads in jobs:
                ws[k].stdin.write(f"{threads} {start} {a.seconds}\n")  # type: ignore[union-attr]
                ws[k].stdin.flush()  # type: ignore[union-attr]
            return [float(ws[k].stdout.readline()) for k, _ in jobs]  # type: ignore[union-attr]

        rounds = []
        for r in range(a.rounds):
            solo = timed([(0, 1)]) + timed([(1, 1)])
            pair = timed([(0, 1), (1, 1)])
            two = timed([(0, 2)])[0]
            base = statistics.mean(solo)
            rounds.append({"solo": solo, "pair": pair, "two_threads": two,
                           "pair_speedup": sum(pair) / base, "two_thread_speedup": two / base})
            print(f"round {r}: one thread {solo[0]:,.0f} / {solo[1]:,.0f} samples/s; two "
                  f"1-thread runs at once {sum(pair) / base:.2f}x; one 2-thread run "
                  f"{two / base:.2f}x", flush=True)
    finally:
        for w in ws:
            w.stdin.close()  # type: ignore[union-attr]
            w.wait()
    med = {k: float(statistics.median(r[k] for r in rounds))
           for k in ("pair_speedup", "two_thread_speedup")}
    res = {"batch": a.batch, "seconds": a.seconds, "rounds": rounds, **med,
           "two_thread_of_pair": med["two_thread_speedup"] / med["pair_speedup"]}
    print(f"median over {a.rounds} rounds: two 1-thread runs at once {med['pair_speedup']:.2f}x "
          f"one alone; one 2-thread run {med['two_thread_speedup']:.2f}x "
          f"({100 * res['two_thread_of_pair']:.0f}% of the pair)")
    if a.no_write:
        print(json.dumps(res))
        return
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "pair.json", res)
    print(f"wrote {RESULTS / 'pair.json'}")


if __name__ == "__main__":
    main()
