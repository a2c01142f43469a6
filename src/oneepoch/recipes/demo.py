"""The demo: built-in synthetic data, the DNN and the LR model, one overlaid report.

    >>> report = run_demo("runs/demo")        # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

from oneepoch.config import TrainConfig, load_config
from oneepoch.data.synthetic import SynthConfig, write_synthetic
from oneepoch.remedies import hooks_from_config
from oneepoch.report.run_report import build_report
from oneepoch.tracking import tracking_hooks
from oneepoch.training.trainer import train


def ensure_synthetic(path: Path, cfg: SynthConfig) -> dict:
    """Generate the synthetic data set at ``path`` unless one with the same settings exists."""
    info_path = path / "synth.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("config") == asdict(cfg):
            return info
    return write_synthetic(path, cfg)


def _train_summary(cfg: TrainConfig, run_dir: Path) -> tuple[str, float]:
    res = train(cfg, run_dir, hooks=[*hooks_from_config(cfg), *tracking_hooks(cfg)])
    return res.verdict.line(), res.seconds


def run_demo(out: str | Path = "runs/demo", overrides: list[str] | tuple = (),
             synth: SynthConfig | None = None, progress: bool = True) -> Path:
    """Train the DNN and LR on the built-in data; return the path of ``report.html``."""
    t0 = time.time()
    out = Path(out)
    info = ensure_synthetic(out / "data", synth or SynthConfig())
    print(f"data: {out / 'data'} ({info['rows']['train']:,} train / {info['rows']['test']:,} test "
          f"rows; ground-truth test AUC {info['ground_truth_auc_test']:.4f}; bottom half of item "
          f"IDs hold {100 * info['item_tail_share']:.1f}% of occurrences)")
    base = [f"data.path={out / 'data'}"]
    dnn_cfg = load_config(TrainConfig, "demo", [*base, f"progress={str(progress).lower()}",
                                                *overrides])
    lr_cfg = load_config(TrainConfig, "demo_lr", [*base, "progress=false", *overrides])
    # one core each: the LR run goes on in a second process while the DNN trains here
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        lr_job = pool.submit(_train_summary, lr_cfg, out / "lr")
        res = train(dnn_cfg, out / "dnn",
                    hooks=[*hooks_from_config(dnn_cfg), *tracking_hooks(dnn_cfg)])
        lr_line, lr_secs = lr_job.result()
    print(f"dnn: {res.verdict.line()}  [{res.seconds:.0f} s]")
    print(f"lr: {lr_line}  [{lr_secs:.0f} s]")
    runs = [out / "dnn", out / "lr"]
    gt = (f"<p>Ground-truth AUC on the test split (the hidden model's own probabilities): "
          f"<b>{info['ground_truth_auc_test']:.4f}</b>, the ceiling for any model. Bottom half "
          f"of item IDs hold {100 * info['item_tail_share']:.1f}% of item occurrences; "
          f"{100 * info['test_items_unseen_in_train']:.1f}% of test impressions show an item "
          f"never seen in training.</p><p>Total wall time: {time.time() - t0:.0f} s.</p>")
    report = build_report(runs, out, "oneepoch demo: DNN vs LR on built-in data",
                          extra_sections=[("Data", gt)])
    return report
