"""Which stage-1 settings keep the contrastive loss from overfitting on a sparse log?

One-factor-at-a-time sweep around ``configs/hsu2024_pretrain.yaml`` on a subsampled engagement
log (``data.subsample``): uniform negatives, temperature (fixed / bounds), logQ, weight decay
on the tables, embedding dimension. Each run trains every epoch and is evaluated at every
epoch end; a variant's curve is classified by the Figure-2 rule
(:func:`oneepoch.recipes.hsu2024.curve_shape`). Runs are cached (a finished run with the same
settings is reused), so the script can be stopped and started again.

    python benchmarks/stage1_sweep.py --data runs/fig2/hsu2024/full/data/engagements \\
        --subsample 0.1 --seeds 2 --out runs/stage1_sweep

Prints a Markdown table and writes ``OUT/sweep.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oneepoch.config import load_config, to_dict
from oneepoch.io import atomic_write_text
from oneepoch.pretrain import PretrainConfig, pretrain
from oneepoch.recipes.hsu2024 import STAGE1_CONFIG, curve_shape
from oneepoch.remedies.early_stopping import select_hook
from oneepoch.runfolder import read_metrics, reuse

VARIANTS: dict[str, list[str]] = {
    "base (512 uniform, tau 0.07 learned in [0.02, 0.5], logQ, wd 0, dim 32)": [],
    "in-batch only (0 uniform)": ["loss.n_uniform=0"],
    "128 uniform": ["loss.n_uniform=128"],
    "2048 uniform": ["loss.n_uniform=2048"],
    "8192 uniform": ["loss.n_uniform=8192"],
    "tau fixed 0.07": ["loss.learn_temperature=false"],
    "tau fixed 0.2": ["loss.learn_temperature=false", "loss.temperature=0.2"],
    "tau learned in [0.1, 0.5]": ["loss.temperature=0.1", "loss.tau_min=0.1"],
    "tau learned in [0.02, 0.1]": ["loss.tau_max=0.1"],
    "logQ off": ["loss.logq=false"],
    "weight decay 1e-4": ["optim.weight_decay=0.0001"],
    "weight decay 1e-3": ["optim.weight_decay=0.001"],
    "weight decay 1e-2": ["optim.weight_decay=0.01"],
    "dim 8": ["model.dim=8"],
    "dim 16": ["model.dim=16"],
    "dim 64": ["model.dim=64"],
    # beyond the five knobs of the question: the learning rate
    "lr 2e-3": ["optim.lr=0.002"],
    "lr 1e-3": ["optim.lr=0.001"],
    # the two settings that helped alone, together
    "dim 16, tau learned in [0.1, 0.5]": ["model.dim=16", "loss.temperature=0.1",
                                          "loss.tau_min=0.1"],
    "dim 8, tau learned in [0.1, 0.5]": ["model.dim=8", "loss.temperature=0.1",
                                         "loss.tau_min=0.1"],
}


def slug(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in ".-" else "_" for c in name.split(" (")[0])
    return keep.strip("_")


def run(data: str, subsample: float, seed: int, name: str, extra: list[str], out: Path
        ) -> list[dict[str, Any]]:
    cfg = load_config(PretrainConfig, STAGE1_CONFIG, [
        f"data.path={data}", f"data.subsample={subsample}", f"seed={seed}", "threads=1",
        "progress=false", "export=false", *VARIANTS[name], *extra])
    rd = out / f"{slug(name)}-s{seed}"
    policy = reuse(rd, to_dict(cfg))
    if policy != "skip":
        t = time.time()
        pretrain(cfg, rd, resume=policy == "resume", hooks=[select_hook(cfg)])
        print(f"  {name} seed {seed}: {time.time() - t:.0f} s", flush=True)
    return [r for r in read_metrics(rd) if abs(r["epoch"] - round(r["epoch"])) < 1e-9]


def summarise(curves: list[list[dict[str, Any]]]) -> dict[str, Any]:
    held = np.array([[r["test_hit@3"] for r in c] for c in curves])
    train = np.array([[r["train_hit@3"] for r in c] for c in curves])
    loss = np.array([[r["test_full_loss"] for r in c] for c in curves])
    tau = np.array([[r["tau"] for r in c] for c in curves])
    hm, tm = held.mean(0), train.mean(0)
    be = int(np.argmax(hm[1:])) + 1
    shape, note = curve_shape(hm, tm)
    per_seed_last_over_best = held[:, -1] / held[:, 1:].max(1)
    return {"seeds": len(curves), "held_mean": hm.tolist(), "train_mean": tm.tolist(),
            "best": float(hm[be]), "best_epoch": be, "last": float(hm[-1]),
            "last_over_best": float(hm[-1] / hm[be]) if hm[be] else float("nan"),
            "last_over_best_per_seed": per_seed_last_over_best.tolist(),
            "best_std": float(held[:, be].std()), "last_std": float(held[:, -1].std()),
            "train_at_best": float(tm[be]), "train_last": float(tm[-1]),
            "full_loss_best_epoch": int(np.argmin(loss.mean(0)[1:])) + 1,
            "tau_last": float(tau.mean(0)[-1]), "shape": shape, "note": note}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="engagement data set (format: engagements)")
    ap.add_argument("--subsample", type=float, default=0.1)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--out", default="runs/stage1_sweep")
    ap.add_argument("--only", nargs="*", help="variant names (default: all)")
    ap.add_argument("overrides", nargs="*", help="settings for every run, e.g. epochs=10")
    a = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(a.out)
    names = [n for n in VARIANTS if not a.only or n in a.only or slug(n) in a.only]
    res = {}
    for seed in range(a.seeds):
        for n in names:
            run(a.data, a.subsample, seed, n, a.overrides, out)
    for n in names:
        res[n] = summarise([run(a.data, a.subsample, s, n, a.overrides, out)
                            for s in range(a.seeds)])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "sweep.json", json.dumps(
        {"data": a.data, "subsample": a.subsample, "seeds": a.seeds,
         "overrides": a.overrides, "variants": res}, indent=1))
    print(f"| setting (log x{a.subsample:g}, {a.seeds} seed(s)) | held-out Hit@3 best (epoch) "
          "| last (epoch 10) | last / best | train Hit@3 at best -> last | full-loss best "
          "epoch | tau last | curve |")
    print("|---|---|---|---|---|---|---|---|")
    for n, r in res.items():
        print(f"| {n} | {r['best']:.4f} +/- {r['best_std']:.4f} ({r['best_epoch']}) | "
              f"{r['last']:.4f} +/- {r['last_std']:.4f} | {r['last_over_best']:.2f} | "
              f"{r['train_at_best']:.3f} -> {r['train_last']:.3f} | "
              f"{r['full_loss_best_epoch']} | {r['tau_last']:.3f} | {r['shape']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
