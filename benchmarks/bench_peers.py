"""oneepoch vs DeepCTR-Torch vs FuxiCTR, side by side in the same run (paper A's base model).

Same synthetic data, same model (7 fields, emb dim 8, MLP 200-80-1 with Dice, Adam 1e-3,
batch 1024), one training epoch each; the systems alternate (A B C A B C ...) for ``--rounds``
rounds at 1 and at 2 threads, and the median samples/s of each and its ratio to oneepoch are
printed and written to benchmarks/results/peers.json. The peers run in ``.venv-bench``
(``benchmarks/peers/setup_venv.sh``, see benchmarks/peers/README.md); a peer that cannot be set
up or run is reported with the exact reason.

    python benchmarks/bench_peers.py [--rows 200000] [--rounds 3]

Timed region for oneepoch: the epoch's batch loop (the step ``train()`` takes: the fused native
step, which reads its rows straight from the pre-encoded arrays), after the data set was encoded,
like the peers' preprocessing. Each
run starts once the machine is idle again (a peer's Ray workers can take seconds to exit).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from oneepoch.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]

RESULTS = Path(__file__).parent / "results"
BENCH_PY = ROOT / ".venv-bench" / "bin" / "python"
PEERS = ("deepctr", "fuxictr")


def oneepoch_epoch(data: str, threads: int, max_rows: int, batch: int) -> dict:
    import torch

    from oneepoch import kernels
    from oneepoch.config import TrainConfig, load_config
    from oneepoch.data.batcher import Batcher
    from oneepoch.training.fused import FusedStep
    from oneepoch.training.trainer import build, epoch_order, prepare_data

    torch.set_num_threads(threads)
    kernels.lib()  # built (once per machine) before the timed epoch
    cfg = load_config(TrainConfig, "ctr", [f"data.path={data}", f"batch_size={batch}"])
    d = prepare_data(cfg)
    model, opt = build(cfg, d)
    model.train()
    tr = d.splits["train"]
    n = min(max_rows, len(tr)) if max_rows else len(tr)
    order = epoch_order(len(tr), 0, "every", 0)[:n]
    batcher = Batcher(tr, batch)
    fast = FusedStep.build(model, opt, batcher)  # the step train() takes
    lossf = torch.nn.functional.binary_cross_entropy_with_logits
    t = time.perf_counter()
    total = 0.0
    for rows in batcher.epoch_rows(order):
        if fast is not None and len(rows) > 1:
            total += fast(rows) * len(rows)
            continue
        b = batcher.get(rows)
        opt.zero_grad()
        loss = lossf(model(b), b.label)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(b)
    secs = time.perf_counter() - t
    return {"system": "oneepoch", "threads": threads, "rows": int(n), "seconds": secs,
            "samples_per_s": n / secs, "train_logloss": total / n, "activation": "dice",
            "notes": "fused native step" if fast is not None else "autograd step"}


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + v[4]  # total, idle + iowait


def wait_quiet(max_s: float = 30.0, idle: float = 0.9) -> float:
    """Wait (up to ``max_s``) until the machine is idle for a 0.5 s window, so a run does not
    start while the previous one's processes (e.g. a peer's Ray workers) are still exiting;
    returns the seconds waited."""
    if not os.path.exists("/proc/stat"):
        return 0.0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_s:
        a = _cpu_times()
        time.sleep(0.5)
        b = _cpu_times()
        if b[0] > a[0] and (b[1] - a[1]) / (b[0] - a[0]) >= idle:
            break
    return time.perf_counter() - t0


def run_one(system: str, data: str, threads: int, rows: int, batch: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if system == "oneepoch":
        cmd = [sys.executable, __file__, "--oneepoch-worker", "--data", data, "--threads",
               str(threads), "--rows", str(rows), "--batch", str(batch)]
    else:
        if not BENCH_PY.exists():
            return {"system": system, "threads": threads,
                    "error": "no .venv-bench (benchmarks/peers/setup_venv.sh failed or not run)"}
        cmd = [str(BENCH_PY), str(Path(__file__).parent / "peers" / "run_peer.py"), "--system",
               system, "--data", data, "--threads", str(threads), "--batch", str(batch)]
        if rows:
            cmd += ["--max-rows", str(rows)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in r.stdout.strip().splitlines() if ln.startswith("{")]
    if not lines:
        return {"system": system, "threads": threads,
                "error": f"exit {r.returncode}: {(r.stderr or r.stdout).strip()[-800:]}"}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000, help="training rows per epoch")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--data", help="data set (default: built-in synthetic, generated once)")
    ap.add_argument("--skip-setup", action="store_true", help="do not run setup_venv.sh")
    ap.add_argument("--oneepoch-worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.oneepoch_worker:
        print(json.dumps(oneepoch_epoch(a.data, a.threads[0], a.rows, a.batch)))
        return
    if not a.data:
        from oneepoch.data.synthetic import SynthConfig
        from oneepoch.recipes.demo import ensure_synthetic

        a.data = str(ROOT / "runs" / "bench-peers-data")
        ensure_synthetic(Path(a.data), SynthConfig(n_train=a.rows, n_test=20_000))
        from oneepoch.data.dataset import load_ctr

        load_ctr(a.data)  # encode once, outside any timing
    if not a.skip_setup:
        r = subprocess.run(["bash", str(Path(__file__).parent / "peers" / "setup_venv.sh")],
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(f"peer setup failed (exit {r.returncode}): {r.stderr.strip()[-500:]}")
    systems = ("oneepoch", *PEERS)
    runs = []
    for threads in a.threads:
        for rnd in range(a.rounds):
            for s in systems:
                waited = wait_quiet()
                res = run_one(s, a.data, threads, a.rows, a.batch)
                res["round"], res["waited_for_idle_s"] = rnd, round(waited, 1)
                runs.append(res)
                msg = (f"{res['samples_per_s']:,.0f} samples/s" if "samples_per_s" in res
                       else f"ERROR {res['error']}")
                print(f"threads={threads} round {rnd} {s}: {msg}", flush=True)
    summary = []
    for threads in a.threads:
        med = {}
        for s in systems:
            ok = [r["samples_per_s"] for r in runs if r["system"] == s
                  and r["threads"] == threads and "samples_per_s" in r]
            errs = [r["error"] for r in runs if r["system"] == s and r["threads"] == threads
                    and "error" in r]
            med[s] = statistics.median(ok) if ok else None
            summary.append({"system": s, "threads": threads, "median_samples_per_s": med[s],
                            "n": len(ok), "errors": sorted(set(errs))})
        for row in summary[-len(systems):]:
            m, base = row["median_samples_per_s"], med["oneepoch"]
            row["oneepoch_over_system"] = base / m if m and base else None
            ratio = f"oneepoch is {base / m:.1f}x" if m and base else ""
            shown = f"{m:,.0f} samples/s" if m else "no result: " + "; ".join(row["errors"])
            print(f"threads={threads} {row['system']:>9}: median {shown} {ratio}")
    RESULTS.mkdir(exist_ok=True)
    out = {"rows": a.rows, "batch": a.batch, "rounds": a.rounds, "data": a.data,
           "summary": summary, "runs": runs}
    atomic_write_json(RESULTS / "peers.json", out)
    print(f"wrote {RESULTS / 'peers.json'}")


if __name__ == "__main__":
    main()
