"""Core speed: training samples/s of paper A's base model (1 and 2 threads), evaluation
rows/s, AUC over 10^7 predictions, and peak RSS. Writes benchmarks/results/core.json.

    python benchmarks/bench_core.py [--rows 400000] [--steps 50] [--rounds 9] [--repeats 3]

``--repeats`` fresh processes on the built-in synthetic data; in each, after warm-up, the
thread counts alternate round by round (``--rounds`` rounds of ``--steps`` batches per thread
count, 1, 2, 1, 2, ...) through the step ``train()`` uses (the fused native step; set
``ONEEPOCH_FUSED=0`` to time the autograd path), each round followed by the MLP's GEMMs alone
at the same thread count (bench_limit's measure: the machine's own speed-up and ceiling at that
moment), then one profiled round and the evaluation and AUC timings per thread count. A shared
VM's speed drifts from minute to minute (up to 30% here), so only rounds timed back to back are
compared: the speed-up is the median of the per-round ratios (pooled over processes), samples/s
the median of the rounds.

Then the Adam semantics of the ID table (``optim.embedding_update``): the same fused step with
``dense`` (the default: every row decays and moves every step, caught up in closed form) and
``lazy`` (only the batch's rows), alternating round by round (``--update-rounds`` rounds per
thread count); the figure is the median of the per-round dense / lazy ratios. In the same
rounds, the ``adamar`` remedy (``optim.row_decay_alpha``, ``--adamar-alpha``, on the base
model's settings): its figure is the median of the per-round AdamAR / base ratios.
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
    need = (20 + (args.rounds + 1 + args.update_rounds) * len(args.threads) * args.steps) \
        * cfg.batch_size
    it = batcher.epoch_rows(np.concatenate([order] * (need // len(order) + 1)))
    lossf = torch.nn.functional.binary_cross_entropy_with_logits
    other = "lazy" if cfg.optim.embedding_update == "dense" else "dense"
    cfg2 = load_config(TrainConfig, "ctr", [f"data.path={args.data}", f"batch_size={args.batch}",
                                            f"optim.embedding_update={other}"])
    model2, opt2 = build(cfg2, data)
    model2.train()
    fast2 = FusedStep.build(model2, opt2, Batcher(tr, cfg.batch_size))
    it2 = fast2.batcher.epoch_rows(np.concatenate([order] * (need // len(order) + 1))) \
        if fast2 is not None else None
    cfg3 = load_config(TrainConfig, "ctr", [f"data.path={args.data}", f"batch_size={args.batch}",
                                            f"optim.row_decay_alpha={args.adamar_alpha}"])
    model3, opt3 = build(cfg3, data)  # the adamar remedy on the base model
    model3.train()
    fast3 = FusedStep.build(model3, opt3, Batcher(tr, cfg.batch_size))
    it3 = fast3.batcher.epoch_rows(np.concatenate([order] * (need // len(order) + 1))) \
        if fast3 is not None else None

    def steps(n: int, second: bool | str = False) -> float:
        t = time.perf_counter()
        if second == "adamar":  # the base settings + AdamAR, same data order
            fast3.steps(np.concatenate([next(it3) for _ in range(n)]))  # type: ignore
            return time.perf_counter() - t
        if second:  # the other embedding_update, same data order
            fast2.steps(np.concatenate([next(it2) for _ in range(n)]))  # type: ignore
            return time.perf_counter() - t
        if fast is not None:  # as train() between evaluations: the steps in one native call
            fast.steps(np.concatenate([next(it) for _ in range(n)]))
            return time.perf_counter() - t
        for _ in range(n):
            rows = next(it)
            b = batcher.get(rows)
            loss = lossf(model(b), b.label)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return time.perf_counter() - t

    for threads in args.threads:  # warm every thread count's pool
        torch.set_num_threads(threads)
        steps(10)
    from bench_limit import measure  # the MLP's GEMMs alone: the machine's own speed-up

    rates: dict[int, list[float]] = {t: [] for t in args.threads}
    gemm: dict[int, list[float]] = {t: [] for t in args.threads}
    for _ in range(args.rounds):  # thread counts alternate, so they share the machine's state
        for threads in args.threads:
            torch.set_num_threads(threads)
            rates[threads].append(args.steps * cfg.batch_size / steps(args.steps))
            gemm[threads].append(measure(threads, cfg.batch_size, reps=30, best_of=3))
    profile = {}
    if fast is not None:  # where a step's time goes (thread 0's view, barrier waits included)
        for threads in args.threads:
            torch.set_num_threads(threads)
            prof = fast.enable_profile()
            steps(args.steps)
            profile[threads] = {k: float(v) * 1e3 / args.steps
                                for k, v in zip(PHASES, prof, strict=True)}
        fast.c.prof = None
    updates: dict[int, dict[str, list[float]]] = {}
    if fast is not None and fast2 is not None:  # dense vs lazy (vs AdamAR), round by round
        variants: list[bool | str] = [False, True] + (["adamar"] if fast3 is not None else [])
        for threads in args.threads:
            torch.set_num_threads(threads)
            for second in variants[1:]:
                steps(10, second)  # warm-up of the other models
        for _ in range(args.update_rounds):
            for threads in args.threads:
                torch.set_num_threads(threads)
                u = updates.setdefault(threads, {"dense": [], "lazy": []})
                for second in variants:
                    mode = "adamar" if second == "adamar" else \
                        other if second else cfg.optim.embedding_update
                    u.setdefault(mode, []).append(
                        args.steps * cfg.batch_size / steps(args.steps, second))
    runs = [{"threads": t, "batch": cfg.batch_size, "train_samples_per_s": float(np.median(r)),
             "train_rounds": r, "gemm_gflops_rounds": gemm[t],
             "step": "fused" if fast is not None else "autograd",
             "embedding_update": cfg.optim.embedding_update,
             "adamar_step": "fused" if fast3 is not None else FusedStep.why_not(model3, opt3),
             "update_rounds": updates.get(t, {}),
             "profile_ms": profile.get(t, {})} for t, r in rates.items()]
    te = data.splits["test"]
    ev = Batcher(te, 16384)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 10_000_000)
    s = (rng.random(10_000_000) + 0.1 * y).astype(np.float32)
    for run in runs:  # evaluation and AUC at each thread count
        torch.set_num_threads(run["threads"])
        predict(model, ev)
        t = time.perf_counter()
        reps = 3
        for _ in range(reps):
            predict(model, ev)
        run["eval_rows_per_s"] = reps * len(te) / (time.perf_counter() - t)
        t = time.perf_counter()
        auc(y, s)
        run["auc_1e7_seconds"] = time.perf_counter() - t
    base = rates[args.threads[0]]
    speedups = {t: float(np.median([x / y for x, y in zip(r, base, strict=True)]))
                for t, r in rates.items()}
    return {"runs": runs, "speedup_per_round_median": speedups,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--steps", type=int, default=50, help="steps per round")
    ap.add_argument("--rounds", type=int, default=9,
                    help="timed rounds per thread count and process")
    ap.add_argument("--repeats", type=int, default=3, help="processes")
    ap.add_argument("--update-rounds", type=int, default=5,
                    help="dense vs lazy vs AdamAR rounds per thread count and process (0: skip)")
    ap.add_argument("--adamar-alpha", type=float, default=1e-3,
                    help="optim.row_decay_alpha of the AdamAR rounds (the adamar remedy's)")
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
    # Fresh processes; inside each the thread counts alternate round by round.
    per: dict[int, list[dict]] = {t: [] for t in a.threads}
    ratios: dict[int, list[float]] = {t: [] for t in a.threads}
    gemm_ratios: dict[int, list[float]] = {t: [] for t in a.threads}
    upd: dict[int, dict[str, list[float]]] = {t: {"dense": [], "lazy": [], "adamar": []}
                                              for t in a.threads}
    fractions: dict[int, list[float]] = {t: [] for t in a.threads}
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_limit import gemm_flops_per_sample

    flops = gemm_flops_per_sample()
    for rep in range(a.repeats):
        cmd = [sys.executable, __file__, "--worker", "--data", a.data, "--steps", str(a.steps),
               "--rounds", str(a.rounds), "--batch", str(a.batch), "--update-rounds",
               str(a.update_rounds), "--adamar-alpha", str(a.adamar_alpha),
               "--threads", *map(str, a.threads)]
        top = str(max(a.threads))
        env = {**os.environ, "OMP_NUM_THREADS": top, "MKL_NUM_THREADS": top}
        r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True,
                                      env=env).stdout.strip().splitlines()[-1])
        base_rounds = r["runs"][0]["train_rounds"]
        base_gemm = r["runs"][0]["gemm_gflops_rounds"]
        for run in r["runs"]:
            run["peak_rss_mib"] = r["peak_rss_mib"]
            per[run["threads"]].append(run)
            for mode, rounds in run.get("update_rounds", {}).items():
                upd[run["threads"]][mode] += rounds
            ratios[run["threads"]] += [x / y for x, y in zip(run["train_rounds"], base_rounds,
                                                             strict=True)]
            gemm_ratios[run["threads"]] += [
                x / y for x, y in zip(run["gemm_gflops_rounds"], base_gemm, strict=True)]
            fractions[run["threads"]] += [  # of the GEMM ceiling timed in the same round
                x * flops / (g * 1e9) for x, g in zip(run["train_rounds"],
                                                      run["gemm_gflops_rounds"], strict=True)]
        print(f"process {rep}: " + ", ".join(
            f"{run['threads']} thread(s) {run['train_samples_per_s']:,.0f} samples/s"
            for run in r["runs"]), flush=True)
    runs = []
    for t, rs in per.items():
        rounds = [x for r in rs for x in r["train_rounds"]]
        run = {"threads": t, "batch": a.batch, "train_samples_per_s": float(statistics.median(
            rounds)), "train_rounds": rounds,
            "process_medians": [r["train_samples_per_s"] for r in rs],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in rs), "step": rs[0]["step"],
            "profile_ms": {k: float(statistics.median([r["profile_ms"][k] for r in rs]))
                           for k in rs[0]["profile_ms"]}}
        for k in ("eval_rows_per_s", "auc_1e7_seconds"):
            vals = [r[k] for r in rs if k in r]
            if vals:
                run[k] = float(statistics.median(vals))
        run["gemm_gflops"] = float(statistics.median(
            [x for r in rs for x in r["gemm_gflops_rounds"]]))
        run["embedding_update"] = rs[0].get("embedding_update")
        u = upd[t]
        if u["dense"] and u["lazy"]:  # rounds timed back to back: dense first, then lazy
            run["dense_vs_lazy"] = {
                "dense_samples_per_s": float(statistics.median(u["dense"])),
                "lazy_samples_per_s": float(statistics.median(u["lazy"])),
                "ratio_per_round_median": float(statistics.median(
                    [x / y for x, y in zip(u["dense"], u["lazy"], strict=True)])),
                "dense_rounds": u["dense"], "lazy_rounds": u["lazy"]}
        base = u.get(run["embedding_update"] or "dense", [])
        if u["adamar"] and base:  # the same rounds: base, (other,) then AdamAR
            run["adamar_vs_base"] = {
                "alpha": a.adamar_alpha, "step": rs[0].get("adamar_step"),
                "adamar_samples_per_s": float(statistics.median(u["adamar"])),
                "base_samples_per_s": float(statistics.median(base)),
                "ratio_per_round_median": float(statistics.median(
                    [x / y for x, y in zip(u["adamar"], base, strict=True)])),
                "adamar_rounds": u["adamar"]}
        run["fraction_of_gemm_ceiling"] = float(statistics.median(fractions[t]))
        runs.append(run)
    speedup = {t: float(statistics.median(x)) for t, x in ratios.items()}
    gemm_speedup = {t: float(statistics.median(x)) for t, x in gemm_ratios.items()}
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "python": platform.python_version()}, "runs": runs,
               "speedup_per_round_median": speedup, "gemm_speedup_per_round_median": gemm_speedup,
               "repeats": a.repeats}
    for run in runs:
        line = (f"threads={run['threads']}: train {run['train_samples_per_s']:,.0f} samples/s "
                f"(median of {len(run['train_rounds'])} rounds in {a.repeats} processes; "
                f"rounds "
                f"{min(run['train_rounds']):,.0f}-{max(run['train_rounds']):,.0f}; batch "
                f"{run['batch']}), peak RSS {run['peak_rss_mib']:,.0f} MiB; "
                f"{100 * run['fraction_of_gemm_ceiling']:.0f}% of the GEMM ceiling timed in the "
                f"same rounds ({run['gemm_gflops']:.0f} GFLOP/s)")
        if "eval_rows_per_s" in run:
            line += (f"; eval {run['eval_rows_per_s']:,.0f} rows/s; AUC over 1e7 predictions "
                     f"{run['auc_1e7_seconds']:.2f} s")
        print(line, flush=True)
        if run["profile_ms"]:
            print("  profile of a step (ms, median of processes): " + ", ".join(
                f"{k} {v:.3f}" for k, v in run["profile_ms"].items()), flush=True)
        if "dense_vs_lazy" in run:
            dl = run["dense_vs_lazy"]
            print(f"  Adam on the ID table: dense {dl['dense_samples_per_s']:,.0f} samples/s, "
                  f"lazy {dl['lazy_samples_per_s']:,.0f}; dense / lazy (median of "
                  f"{len(dl['dense_rounds'])} back-to-back rounds) "
                  f"{100 * dl['ratio_per_round_median']:.0f}%", flush=True)
        if "adamar_vs_base" in run:
            ar = run["adamar_vs_base"]
            print(f"  AdamAR (row_decay_alpha={ar['alpha']:g}, {ar['step']} step): "
                  f"{ar['adamar_samples_per_s']:,.0f} samples/s, base "
                  f"{ar['base_samples_per_s']:,.0f}; AdamAR / base (median of "
                  f"{len(ar['adamar_rounds'])} back-to-back rounds) "
                  f"{100 * ar['ratio_per_round_median']:.0f}%", flush=True)
    for t, x in speedup.items():
        if t != a.threads[0]:
            print(f"{t}-thread speed-up (median of the per-round ratios, rounds back to back): "
                  f"{x:.2f}x; the MLP's GEMMs alone in the same rounds: "
                  f"{gemm_speedup[t]:.2f}x")
    import torch

    results["torch"] = torch.__version__
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "core.json", results)
    print(f"wrote {RESULTS / 'core.json'}")


if __name__ == "__main__":
    main()
