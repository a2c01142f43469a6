"""oneepoch.monitor: a user's own loop gets the numbers, best point, stop signal and run
folder of ``oneepoch train``."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from oneepoch.config import TrainConfig, load_config, to_dict
from oneepoch.data.batcher import Batcher
from oneepoch.models.ctr import build_model
from oneepoch.monitor import Monitor, MonitorError, folder_eval_sets
from oneepoch.runfolder import read_metrics, read_summary
from oneepoch.training.optim import build_optimizer
from oneepoch.training.trainer import epoch_order, prepare_data, train

TIMING = {"elapsed_s"}


def _cfg(data: Path, out: Path, **extra: str) -> TrainConfig:
    over = [f"data.path={data}", f"out_dir={out}", "name=ref", "progress=false", "threads=1",
            "batch_size=256", "eval.per_epoch=4", "epochs=2", "eval.train_rows=1500",
            "model.hidden=[32,16]", *(f"{k}={v}" for k, v in extra.items())]
    return load_config(TrainConfig, None, over)


def _plain_loop(cfg: TrainConfig, run_dir: Path, **monitor_kw):
    """Paper A's model in a plain PyTorch loop, with the monitor; returns (monitor, model,
    the model's weights at each evaluation step)."""
    data = prepare_data(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.vocab_sizes, [data.field_vocab(f) for f in data.fields],
                        len(data.single_fields))
    opt = build_optimizer(model, cfg.optim)
    split = data.splits[cfg.data.train_split]
    batcher = Batcher(split, cfg.batch_size)
    sets = folder_eval_sets(cfg.data.path, cfg.eval.batch_size, cfg.eval.train_rows, cfg.seed,
                            bucket_field=cfg.eval.bucket_field,
                            bucket_bounds=cfg.eval.bucket_bounds)
    mon = Monitor(run_dir, batcher.steps(), sets, model=model, epochs=cfg.epochs,
                  sync=opt.sync, per_epoch=cfg.eval.per_epoch, min_drop=cfg.min_drop,
                  config=to_dict(cfg), batch_size=cfg.batch_size, **monitor_kw)
    snaps = {0: {k: t.clone() for k, t in model.state_dict().items()}}
    model.train()
    for epoch in range(cfg.epochs):
        for rows in batcher.epoch_rows(epoch_order(len(split), epoch, cfg.shuffle, cfg.seed)):
            batch = batcher.get(rows)
            loss = F.binary_cross_entropy_with_logits(model(batch), batch.label)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(float(loss.detach()))
            if mon.rows[-1]["step"] == mon.steps:
                snaps[mon.steps] = {k: t.clone() for k, t in model.state_dict().items()}
    return mon, model, snaps


@pytest.fixture(scope="module")
def pair(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory):
    """``oneepoch train`` and the monitored plain loop on the same model, data and seed (the
    autograd path on both sides: ONEEPOCH_FUSED=0)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ONEEPOCH_FUSED", "0")
    try:
        out = tmp_path_factory.mktemp("monitor")
        cfg = _cfg(tiny_synth, out)
        ref = train(cfg)
        mon, model, snaps = _plain_loop(cfg, out / "mon")
        v = mon.finish()
    finally:
        mp.undo()
    return cfg, ref, mon, model, snaps, v


def test_same_metrics_and_verdict_as_train(pair) -> None:
    cfg, ref, mon, _, _, v = pair
    got = read_metrics(mon.run_dir)
    assert len(got) == len(ref.metrics) == 9  # step 0 + 4 per epoch x 2
    assert "test_auc_head" in got[-1]  # per-bucket AUC, as train() (eval.bucket_field=auto)
    for a, b in zip(got, ref.metrics, strict=True):
        assert {k: a[k] for k in a if k not in TIMING} == \
            {k: b[k] for k in b if k not in TIMING}
    assert v.line() == ref.verdict.line()
    assert read_summary(mon.run_dir)["verdict"] == read_summary(ref.run_dir)["verdict"]
    for f in ("metrics.parquet", "summary.json", "config.yaml", "curves.png", "report.html"):
        assert (mon.run_dir / f).exists(), f


def test_best_point_restore_is_bit_identical(pair) -> None:
    cfg, _, mon, model, snaps, _ = pair
    best = mon.best
    assert best is not None and best["test_auc"] == max(r["test_auc"] for r in mon.rows)
    want = snaps[best["step"]]
    got = mon.best_state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    if best["step"] != mon.steps:  # the model moved on: restoring puts the best back
        assert not all(torch.equal(model.state_dict()[k], want[k]) for k in want)
    mon.restore_best()
    assert all(torch.equal(model.state_dict()[k], want[k]) for k in want)
    summ = read_summary(mon.run_dir)
    assert summ["selected"]["step"] == best["step"] and summ["selected"]["on"] == "test_auc"


def test_report_overlays_monitored_and_trained_runs(pair, tmp_path: Path) -> None:
    from oneepoch.report.run_report import build_report

    _, ref, mon, _, _, _ = pair
    page = build_report([ref.run_dir, mon.run_dir], tmp_path).read_text()
    assert page.count("one-epoch phenomenon:") >= 2 and mon.run_dir.name in page


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)[:, 0]


def _toy(n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] + 0.5 * torch.randn(n, generator=g) > 0).float()
    return x, y


def test_disk_best_point_and_open_ended_schedule(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x, y = _toy()
    test = [(x[a:a + 100], y[a:a + 100]) for a in range(0, 400, 100)]
    m = Tiny()
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    mon = Monitor(tmp_path / "run", 4, {"test": test}, model=m, per_epoch=2, keep_best="disk")
    snaps = {}
    for _ in range(3 * 4):  # 3 epochs; epochs=None: the schedule grows as needed
        i = torch.randint(0, 400, (32,))
        loss = F.binary_cross_entropy_with_logits(m(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(loss)
        snaps[mon.steps] = {k: t.clone() for k, t in m.state_dict().items()}
    mon.finish()
    assert [r["step"] for r in mon.rows] == [0, 2, 4, 6, 8, 10, 12]
    assert (tmp_path / "run" / "checkpoints" / "best" / "tensors.safetensors").exists()
    b = mon.best["step"]
    if b:
        got = mon.best_state_dict()
        assert all(torch.equal(got[k], snaps[b][k]) for k in got)


def _scripted(aucs: list[float]):
    """A predict whose test AUC at the k-th evaluation is about ``aucs[k]`` (labels: 500
    negatives then 500 positives; score = uniform noise + s x label, whose AUC is
    1 - (1 - s)^2 / 2)."""
    y = np.r_[np.zeros(500), np.ones(500)].astype(np.float32)
    rng = np.random.default_rng(0)
    base = rng.random(1000)
    calls = {"n": 0}

    def predict(xs: np.ndarray) -> np.ndarray:
        a = aucs[min(calls["n"], len(aucs) - 1)]
        calls["n"] += 1
        s = 1 - math.sqrt(2 * (1 - a))
        return base + s * y

    return predict, [(np.arange(1000), y)]


def test_should_stop_fires_at_the_stated_evaluation(tmp_path: Path) -> None:
    aucs = [0.60, 0.70, 0.75, 0.74, 0.73, 0.72, 0.71]
    predict, test = _scripted(aucs)
    mon = Monitor(tmp_path / "run", 10, test, predict=predict, keep_best="none", epochs=2,
                  per_epoch=3, patience=2, at_start=True)
    fired = None
    for _ in range(20):
        if mon.step(0.5):
            fired = mon.steps
            break
    # evaluations at 0, 3, 7, 10, 13, 17: best at step 7 (3rd); 2 worse ones -> stop at 13
    assert [r["step"] for r in mon.rows] == [0, 3, 7, 10, 13]
    assert fired == 13 and mon.should_stop and mon.best["step"] == 7
    mon.finish()
    summ = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summ["stopped_early"] is True and summ["selected"]["step"] == 7


def test_patience_zero_never_stops_and_logloss_is_minimised(tmp_path: Path) -> None:
    predict, test = _scripted([0.6, 0.7, 0.65, 0.64, 0.63, 0.62])
    mon = Monitor(tmp_path / "run", 4, test, predict=predict, keep_best="none", epochs=1,
                  per_epoch=4, select_on="test_logloss")
    assert not any(mon.step() for _ in range(4))
    assert mon.selector.sign == -1
    assert mon.best["test_logloss"] == min(r["test_logloss"] for r in mon.rows)
    mon.finish(report=False)


def test_live_verdict_and_extra_metrics(tmp_path: Path) -> None:
    # an evaluation every step (10 per epoch): rising to 0.75 at the boundary, then 0.70
    predict, test = _scripted([0.6 + 0.015 * k for k in range(11)] + [0.70])
    from oneepoch.monitor import EvalSet

    def extra(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
        return {"bucket0_auc": 0.5, "n": float(len(labels))}

    mon = Monitor(tmp_path / "run", 10, {"test": EvalSet(test, extra)}, predict=predict,
                  keep_best="none", epochs=2, per_epoch=10, every_steps=0)
    for _ in range(11):
        mon.step()
    assert mon.rows[-1]["test_bucket0_auc"] == 0.5 and mon.rows[-1]["test_n"] == 1000
    v = mon.verdict()  # after the boundary: the drop 0.75 -> 0.70 is seen live
    assert v.phenomenon and v.at_epoch == 2 and math.isclose(v.drop, 0.05, abs_tol=0.02)
    mon.close()


def test_wrong_shape_names_the_evaluation_step(tmp_path: Path) -> None:
    with pytest.raises(MonitorError, match=r"step 0 .*shape \(10, 2\).*expected \(10,\)"):
        Monitor(tmp_path / "a", 5, [(torch.zeros(10, 4), torch.zeros(10))],
                predict=lambda x: torch.zeros(10, 2), keep_best="none")
    calls = {"n": 0}

    def late(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return torch.zeros(3) if calls["n"] > 1 else torch.rand(10)

    mon = Monitor(tmp_path / "b", 5, [(torch.zeros(10, 4), torch.arange(10) % 2)],
                  predict=late, keep_best="none", per_epoch=1)
    for _ in range(4):
        mon.step()
    with pytest.raises(MonitorError, match=r"evaluation at step 5 \(set 'test', batch 0\)"):
        mon.step()
    mon.close()
    # the lock was released: the folder can be taken again
    Monitor(tmp_path / "b", 5, [(torch.zeros(10, 4), torch.arange(10) % 2)],
            predict=lambda x: torch.rand(10), keep_best="none").close()


def test_nan_scores_name_the_evaluation_step(tmp_path: Path) -> None:
    def nan_pred(x: torch.Tensor) -> torch.Tensor:
        s = torch.rand(10)
        s[3] = float("nan")
        return s

    with pytest.raises(MonitorError, match=r"step 0 \(set 'test'\).*1 of 10 scores are NaN"):
        Monitor(tmp_path / "a", 5, [(torch.zeros(10, 4), torch.arange(10) % 2)],
                predict=nan_pred, keep_best="none")


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    sets = [(torch.zeros(4, 4), torch.arange(4) % 2)]
    with pytest.raises(MonitorError, match="need a set named 'test'"):
        Monitor(tmp_path / "a", 5, {"valid": sets}, predict=lambda x: torch.rand(4),
                keep_best="none")
    with pytest.raises(MonitorError, match="needs model="):
        Monitor(tmp_path / "a", 5, sets, predict=lambda x: torch.rand(4))
    with pytest.raises(MonitorError, match="output"):
        Monitor(tmp_path / "a", 5, sets, model=Tiny(), output="scores")
    with pytest.raises(MonitorError, match="select_on: 'valid_auc'"):
        Monitor(tmp_path / "a", 5, sets, model=Tiny(), select_on="valid_auc")
    with pytest.raises(MonitorError, match="output='probs'"):
        Monitor(tmp_path / "a", 5, sets, predict=lambda x: torch.randn(4) * 5, output="probs",
                keep_best="none")


def test_diverged_loss_is_refused(tmp_path: Path) -> None:
    from oneepoch.training.loop import TrainingDiverged

    mon = Monitor(tmp_path / "a", 5, [(torch.zeros(4, 4), torch.arange(4) % 2)],
                  predict=lambda x: torch.rand(4), keep_best="none")
    mon.step(0.3)
    with pytest.raises(TrainingDiverged, match="step 2"):
        mon.step(float("nan"))
    mon.close()


HAVE_LIGHTNING = any(importlib.util.find_spec(m) is not None
                     for m in ("lightning", "pytorch_lightning"))


@pytest.mark.skipif(not HAVE_LIGHTNING, reason="lightning not installed (pip install "
                    "'oneepoch[lightning]')")
def test_lightning_callback_matches_a_plain_loop(tmp_path: Path) -> None:
    try:
        import lightning.pytorch as pl
    except ImportError:
        import pytorch_lightning as pl
    from oneepoch.integrations.lightning import OneEpochCallback

    x, y = _toy(416, seed=1)
    xt, yt = _toy(200, seed=2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Tiny()

        def forward(self, b: torch.Tensor) -> torch.Tensor:
            return self.net(b)

        def training_step(self, batch, i):
            return F.binary_cross_entropy_with_logits(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.3)

    torch.manual_seed(0)
    lit = Lit()
    init = {k: t.clone() for k, t in lit.state_dict().items()}
    cb = OneEpochCallback(tmp_path / "lit", [(xt, yt)], per_epoch=4, restore_best=True)
    trainer = pl.Trainer(max_epochs=2, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", devices=1)
    trainer.fit(lit, loader)
    from oneepoch.training.loop import eval_points

    got = read_metrics(tmp_path / "lit")
    assert [r["step"] for r in got] == sorted(eval_points(13, 2, 4))
    assert (tmp_path / "lit" / "report.html").exists()
    # the same model, data and optimizer in a plain loop give the same rows
    m = Tiny()
    m.load_state_dict({k[len("net."):]: v for k, v in init.items()})
    opt = torch.optim.SGD(m.parameters(), lr=0.3)
    mon = Monitor(tmp_path / "plain", 13, [(xt, yt)], model=m, epochs=2, per_epoch=4)
    for _ in range(2):
        for xb, yb in loader:
            loss = F.binary_cross_entropy_with_logits(m(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss)
    mon.finish()
    want = read_metrics(tmp_path / "plain")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(got) == strip(want)
    # restore_best put the best point's weights back into the module
    best = mon.best_state_dict()
    assert all(torch.equal(lit.net.state_dict()[k], best[k]) for k in best)


@pytest.mark.skipif(not HAVE_LIGHTNING, reason="lightning not installed")
def test_lightning_callback_stops_the_trainer(tmp_path: Path) -> None:
    try:
        import lightning.pytorch as pl
    except ImportError:
        import pytorch_lightning as pl
    from oneepoch.integrations.lightning import OneEpochCallback

    x, y = _toy(320)
    predict, test = _scripted([0.6, 0.7, 0.65, 0.64, 0.63, 0.62, 0.61])

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Tiny()

        def training_step(self, batch, i):
            return F.binary_cross_entropy_with_logits(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cb = OneEpochCallback(tmp_path / "lit", test, predict=predict, per_epoch=5, patience=2)
    trainer = pl.Trainer(max_epochs=3, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", devices=1)
    trainer.fit(Lit(), torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=32))
    # 10 steps an epoch, evaluations at 0, 2, 4, 6, 8: best at 2, stop after 6 (2 worse)
    assert cb.monitor.should_stop and trainer.global_step == 6
    assert read_summary(tmp_path / "lit")["stopped_early"] is True


@pytest.mark.slow
def test_plain_pytorch_example_runs_as_is(tmp_path: Path) -> None:
    import runpy

    ex = Path(__file__).resolve().parents[1] / "examples" / "plain_pytorch_loop.py"
    main = runpy.run_path(str(ex))["main"]
    run = main(["--out", str(tmp_path), "--epochs", "1"])
    assert read_summary(run)["verdict"].startswith("one-epoch phenomenon:")
    assert len(read_metrics(run)) == 21 and (run / "report.html").exists()


def _torchrec_missing() -> str:
    try:
        import fbgemm_gpu  # noqa: F401
        from torchrec.distributed.model_parallel import DistributedModelParallel  # noqa: F401
    except Exception as e:  # not installed, or its kernels do not load against this torch
        return f"TorchRec not usable here ({type(e).__name__}: {str(e)[:120]})"
    return ""


@pytest.mark.slow
def test_torchrec_example_in_docs(tmp_path: Path, monkeypatch) -> None:
    why = _torchrec_missing()
    if why:
        pytest.skip(why + "; install torchrec and fbgemm-gpu-cpu built for this torch")
    import re
    import runpy

    doc = (Path(__file__).resolve().parents[1] / "docs" / "monitor.md").read_text()
    code = re.search(r"<!-- torchrec-example -->\n```python\n(.*?)```", doc, re.S).group(1)
    script = tmp_path / "torchrec_example.py"
    script.write_text(code)
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(script), run_name="__main__")


def test_config_must_be_plain(tmp_path: Path) -> None:
    with pytest.raises(MonitorError, match="config: must hold plain values"):
        Monitor(tmp_path / "a", 5, [(torch.zeros(4, 4), torch.arange(4) % 2)],
                predict=lambda x: torch.rand(4), keep_best="none", config={"opt": object()})
    assert not (tmp_path / "a" / "config.yaml").exists()
