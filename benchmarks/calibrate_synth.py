"""Calibration check of the built-in synthetic data: the demo's DNN and LR over several seeds.

For each seed s, the world and the sample are drawn with seed s and both models train with
seed s (the demo's presets). Prints, per model, the test AUC at the end of epoch 1, at 10%
into epoch 2, the drop between them and the verdict's drop, then mean +/- std.

    python benchmarks/calibrate_synth.py --seeds 0 1 2 --out runs/calibration [key=value ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from oneepoch.config import TrainConfig, load_config
from oneepoch.data.synthetic import SynthConfig
from oneepoch.recipes.demo import ensure_synthetic
from oneepoch.training.trainer import train


def at(rows: list[dict], epoch: float) -> float:
    return min(rows, key=lambda r: abs(r["epoch"] - epoch))["test_auc"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/calibration")
    ap.add_argument("--synth", action="append", default=[], metavar="key=value",
                    help="a generator setting (SynthConfig field); repeat for several")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    a = ap.parse_args()
    import yaml

    skw = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in a.synth)}
    out = Path(a.out)
    table: dict[str, list[tuple[float, float, float, float]]] = {"dnn": [], "lr": []}
    for seed in a.seeds:
        info = ensure_synthetic(out / f"data-{seed}", SynthConfig(**{**skw, "seed": seed}))
        for model, preset in (("dnn", "demo"), ("lr", "demo_lr")):
            cfg = load_config(TrainConfig, preset, [
                f"data.path={out / f'data-{seed}'}", f"seed={seed}", "progress=false",
                *a.overrides])
            res = train(cfg, out / f"{model}-{seed}")
            e1, e11 = at(res.metrics, 1.0), at(res.metrics, 1.1)
            table[model].append((e1, e11, e1 - e11, res.verdict.drop))
            print(f"seed {seed} {model}: AUC end of epoch 1 {e1:.4f}, at 1.1 {e11:.4f}, "
                  f"drop {e1 - e11:+.4f}; {res.verdict.line()} [{res.seconds:.0f} s; "
                  f"ground truth {info['ground_truth_auc_test']:.4f}]", flush=True)
    summary = {}
    for model, rows in table.items():
        arr = np.array(rows)
        summary[model] = {"auc_end_epoch1": [arr[:, 0].mean(), arr[:, 0].std()],
                          "drop_at_1.1": [arr[:, 2].mean(), arr[:, 2].std()],
                          "verdict_drop": [arr[:, 3].mean(), arr[:, 3].std()],
                          "per_seed_drop_at_1.1": arr[:, 2].tolist()}
        print(f"{model}: end of epoch 1 {arr[:, 0].mean():.4f} +/- {arr[:, 0].std():.4f}; "
              f"drop at 10% into epoch 2 {arr[:, 2].mean():.4f} +/- {arr[:, 2].std():.4f} "
              f"(per seed {', '.join(f'{d:+.4f}' for d in arr[:, 2])})")
    (out / "calibration.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
