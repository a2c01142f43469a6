"""Training across processes: samples/s of paper A's base model and pairs/s of stage 1 on 1
and 2 processes (gloo, one thread each), the speed-up of 2 over 1 on the same distributed code
path, and the distributed path at 1 process against the single-process path ``train()`` takes
(the fused native step for the base model). Writes benchmarks/results/dist.json.

    python benchmarks/bench_dist.py [--rows 400000] [--steps 40] [--rounds 3]
        [--batches 1024,8192] [--stage1-rows 1000000] [--stage1-steps 6]

Each configuration is a fresh launch (ranks as subprocesses with RANK/WORLD_SIZE/MASTER_*
set, as torchrun would); after warm-up, rank 0 times ``--steps`` global batches between two
barriers. The configurations alternate round by round (single, distributed x1, distributed
x2, two singles at once), so each round's four share the machine's state; speed-ups are medians
of the per-round ratios. The machine's own ceiling is measured too: two independent
one-process runs at once (no communication), their summed speed over one run alone. The base
model is timed at each global batch of ``--batches`` (the paper's 1024 first): the speed-up
depends on how much of a step is split across ranks, so the worker also reports, on the
distributed path, the share of rank 0's step spent synchronising the gradients and in the
row-wise update (which every rank does for the whole global batch). Tables are replicated
(data-parallel): the sharding plan used is ``data_parallel`` for every table. With the
distributed extra installed, the base model (at the first batch) and stage 1 are also timed
once on 2 processes with TorchRec-sharded tables (the planner's plan, Adagrad fused in FBGEMM;
the replicated path runs Adam, so the two are not a like-for-like comparison).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from oneepoch.io import atomic_write_json

RESULTS = Path(__file__).parent / "results"


def _timer(spent: dict[str, float]):
    """``timed(fn, key)``: ``fn`` adding its wall time to ``spent[key]``."""
    def timed(fn, key):
        def run(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            spent[key] += time.perf_counter() - t0
            return out
        return run
    return timed


def ctr_worker(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from oneepoch.config import TrainConfig, load_config
    from oneepoch.data.batcher import Batcher
    from oneepoch.distributed import DataParallelRun
    from oneepoch.training.hooks import State
    from oneepoch.training.steps import build_step
    from oneepoch.training.trainer import build, epoch_order, prepare_data

    torch.set_num_threads(1)
    shard = "auto" if args.path == "sharded" else ""
    cfg = load_config(TrainConfig, "ctr", [f"data.path={args.data}", "threads=1",
                                           f"batch_size={args.batch}", *(
                                               ["optim.name=adagrad", "optim.lr=0.05"]
                                               if shard else [])])
    dp = DataParallelRun.from_env(cfg.device, 1, shard) if args.path != "single" else None
    data = prepare_data(cfg)
    model, opt = build(cfg, data)
    tr = data.splits["train"]
    batcher = Batcher(tr, cfg.batch_size)
    s = State(cfg, data, model, opt, Path("."), batcher.steps())
    step = build_step(model, opt, batcher, [], s) if dp is None else \
        dp.build_step(model, opt, batcher, [], s)
    spent = {"sync": 0.0, "update": 0.0}
    timed = _timer(spent)

    if dp is not None and not shard:  # where rank 0's step goes
        step.sync = timed(step.sync, "sync")
        step.opt.step = timed(step.opt.step, "update")
    reps = -(-(args.steps + 5) * cfg.batch_size // len(tr)) + 1
    order = epoch_order(len(tr), 0, "every", 0)
    it = batcher.epoch_rows(np.concatenate([order] * reps))
    step.run(it, 5)
    if dp is not None:
        dp.ctx.barrier()
    spent.update(sync=0.0, update=0.0)
    t = time.perf_counter()
    done = 0
    while done < args.steps:
        done += len(step.run(it, args.steps - done))
    if dp is not None:
        dp.ctx.barrier()
    secs = time.perf_counter() - t
    out = {"samples_per_s": args.steps * cfg.batch_size / secs, "step": step.path,
           "batch": cfg.batch_size, "table_rows": int(model.embedding.table_rows)
           if hasattr(model, "embedding") else None}
    if dp is not None and not shard:
        out["sync_share"] = spent["sync"] / secs
        out["update_share"] = spent["update"] / secs
    if shard:
        out["plan"] = {n: t["sharding"] for n, t in step.tables.plan_dict().items()}
    if dp is not None:
        out["world_size"] = dp.ctx.world_size
        dp.close()
    return out


def stage1_worker(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from oneepoch.config import load_config
    from oneepoch.distributed import DataParallelRun
    from oneepoch.pretrain.config import PretrainConfig
    from oneepoch.pretrain.model import TwoTower
    from oneepoch.pretrain.train import Stage1Step, Stage1Stepper
    from oneepoch.training.optim import build_optimizer

    torch.set_num_threads(1)
    shard = "auto" if args.path == "sharded" else ""
    dp = DataParallelRun.from_env("cpu", 1, shard) if args.path != "single" else None
    rows, b = args.stage1_rows, args.stage1_batch
    cfg = load_config(PretrainConfig, "pretrain", [
        f"batch_size={b}", "model.dim=64", f"loss.n_uniform={args.stage1_batch}",
        *(["optim.name=adagrad", "optim.lr=0.05"] if shard else [])])
    rng = np.random.default_rng(0)
    pop = 1.0 / np.arange(1, rows + 1) ** 0.9  # Zipf-like items, as real logs
    cdf = np.cumsum(pop / pop.sum())
    n = b * (args.stage1_steps + 3)

    class _Data:
        n_users = n_items = rows
        train_user = rng.integers(1, rows, n)
        train_item = np.clip(np.searchsorted(cdf, rng.random(n)), 1, rows - 1)

        def item_freq(self) -> np.ndarray:
            return np.full(rows, 1.0 / rows)

    torch.manual_seed(0)
    model = TwoTower(rows, rows, 64)
    opt = build_optimizer(model, cfg.optim)
    inner = Stage1Stepper(Stage1Step(model, cfg, _Data()), opt, _Data(), 0)
    step = inner if dp is None else dp.stage1_step(inner)
    spent = {"sync": 0.0, "update": 0.0}
    timed = _timer(spent)

    if dp is not None and not shard:
        step.sync = timed(step.sync, "sync")
        step.opt.step = timed(step.opt.step, "update")
    it = (np.arange(a, a + b) for a in range(0, n, b))
    step.run(it, 1)
    if dp is not None:
        dp.ctx.barrier()
    spent.update(sync=0.0, update=0.0)
    t = time.perf_counter()
    for _ in range(args.stage1_steps):
        step.run(it, 1)
    if dp is not None:
        dp.ctx.barrier()
    secs = time.perf_counter() - t
    out = {"pairs_per_s": args.stage1_steps * b / secs, "step": step.path}
    if dp is not None and not shard:
        out["sync_share"] = spent["sync"] / secs
        out["update_share"] = spent["update"] / secs
    if shard:
        out["plan"] = {n: t["sharding"] for n, t in step.tables.plan_dict().items()}
    if dp is not None:
        out["world_size"] = dp.ctx.world_size
        dp.close()
    return out


def torchrec_loads() -> bool:
    try:
        from oneepoch.distributed.plan import require_torchrec
        require_torchrec()
        return True
    except ValueError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, what: str, path: str, world: int) -> dict:
    """One configuration: ``world`` ranks; rank 0's result. ``single`` x ``world``: that many
    independent one-process runs at once, their summed speed (the machine's own ceiling for
    ``world`` processes: no communication, nothing shared but the machine)."""
    cmd = [sys.executable, __file__, "--worker", what, "--path", path, "--data", args.data,
           "--steps", str(args.steps), "--batch", str(args.batch),
           "--stage1-rows", str(args.stage1_rows), "--stage1-batch", str(args.stage1_batch),
           "--stage1-steps", str(args.stage1_steps)]
    port, procs = free_port(), []
    for r in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if path != "single":
            env.update(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                       LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"{what} {path} x{world}: a rank failed")
    res = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    if path == "single":
        for key in ("samples_per_s", "pairs_per_s"):
            if key in res[0]:
                res[0][key] = sum(r[key] for r in res)
    return res[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="CTR data set (default: the built-in synthetic one)")
    p.add_argument("--rows", type=int, default=400_000, help="synthetic training rows")
    p.add_argument("--steps", type=int, default=40, help="timed global batches (base model)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", default="1024,8192",
                   help="global batch sizes of the base model (the paper's 1024 first)")
    p.add_argument("--batch", type=int, default=1024, help=argparse.SUPPRESS)
    p.add_argument("--stage1-rows", type=int, default=1_000_000, help="rows of each table")
    p.add_argument("--stage1-batch", type=int, default=4096, help="pairs (= uniform negatives)")
    p.add_argument("--stage1-steps", type=int, default=6)
    p.add_argument("--only", choices=["ctr", "stage1"], help="one of the two benchmarks")
    p.add_argument("--worker", choices=["ctr", "stage1"], help=argparse.SUPPRESS)
    p.add_argument("--path", choices=["single", "dist", "sharded"], default="dist",
                   help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(ctr_worker(a) if a.worker == "ctr" else stage1_worker(a)))
        return
    if not a.data:
        from oneepoch.data.synthetic import SynthConfig
        from oneepoch.recipes.demo import ensure_synthetic

        a.data = str(Path("runs") / "bench-data")
        ensure_synthetic(Path(a.data), SynthConfig(n_train=a.rows))
    configs = [("single", 1), ("dist", 1), ("dist", 2), ("single", 2)]
    out: dict = {"machine": platform.processor() or platform.machine(),
                 "cpus": os.cpu_count(), "backend": "gloo", "threads_per_process": 1,
                 "sharding_plan": "data_parallel (every table replicated on every rank; "
                                  "gradients summed across ranks)"}
    load: list[float] = []
    out["loadavg"] = load
    batches = [int(b) for b in a.batches.split(",") if b.strip()]
    jobs = [("ctr", b) for b in batches] + [("stage1", a.stage1_batch)]
    for what, batch in jobs:
        if a.only and a.only != what:
            continue
        key, unit = ("samples_per_s", "samples/s") if what == "ctr" else ("pairs_per_s",
                                                                          "pairs/s")
        a.batch = batch
        rounds: dict[str, list[float]] = {f"{pa}x{w}": [] for pa, w in configs}
        shares: dict[str, list[float]] = {"sync_share": [], "update_share": []}
        for _ in range(a.rounds):
            for pa, w in configs:
                res = launch(a, what, pa, w)
                rounds[f"{pa}x{w}"].append(res[key])
                if (pa, w) == ("dist", 2) and "sync_share" in res:
                    for k in shares:
                        shares[k].append(res[k])
                load.append(round(os.getloadavg()[0], 2))  # a shared machine: say how busy
        if torchrec_loads() and (what == "stage1" or batch == batches[0]):
            # TorchRec-sharded tables, Adagrad fused in FBGEMM: one round
            res = launch(a, what, "sharded", 2)
            out[f"{what}_sharded_x2"] = {unit.split("/")[0] + "_per_s": res[key],
                                         "batch": batch, "plan": res.get("plan"),
                                         "optimizer": "adagrad fused in FBGEMM (one round)"}
            print(f"{what}, tables sharded by TorchRec on 2 processes ({res.get('plan')}), "
                  f"global batch {batch}, Adagrad fused in FBGEMM: {res[key]:,.0f} {unit} "
                  "(one round)")
        med = {k: statistics.median(v) for k, v in rounds.items()}
        sp = statistics.median(x / y for x, y in zip(rounds["distx2"], rounds["distx1"],
                                                     strict=True))
        ratio = statistics.median(x / y for x, y in zip(rounds["distx1"], rounds["singlex1"],
                                                        strict=True))
        ceiling = statistics.median(x / y for x, y in zip(rounds["singlex2"], rounds["singlex1"],
                                                          strict=True))
        entry = {"unit": unit, "batch": batch, "rounds": rounds, "median": med,
                 "speedup_2_over_1_dist": sp, "dist1_over_single": ratio,
                 "machine_ceiling_2_over_1": ceiling}
        entry.update({k: statistics.median(v) for k, v in shares.items() if v})
        if what == "stage1":
            out["stage1"] = entry
        else:
            out.setdefault("ctr_by_batch", []).append(entry)
            if batch == batches[0]:
                out["ctr"] = entry
        name = "base model (paper A)" if what == "ctr" else "stage 1 (two-tower)"
        where = (f"; at 2 processes rank 0 spends {entry['sync_share']:.0%} of its step "
                 f"synchronising and {entry['update_share']:.0%} in the row-wise update"
                 if "sync_share" in entry else "")
        print(f"{name}, global batch {batch}: one process {med['singlex1']:,.0f} {unit}; "
              f"distributed x1 {med['distx1']:,.0f}, x2 {med['distx2']:,.0f} {unit}; speed-up "
              f"2 over 1 process {sp:.2f}x (target >= 1.7x); distributed x1 / one process "
              f"{ratio:.2f} (medians of {a.rounds} rounds){where}; two independent one-process "
              f"runs at once give {ceiling:.2f}x one (this machine's ceiling)")
    print(f"sharding plan used: {out['sharding_plan']}")
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "dist.json", out)


if __name__ == "__main__":
    main()
