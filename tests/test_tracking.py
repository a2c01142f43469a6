"""Experiment tracking: metrics streamed per evaluation, the config as hyper-parameters, the
report and curves as artifacts, read back with each tool's own reader."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from oneepoch.cli import main
from oneepoch.config import ConfigError, TrainConfig, load_config
from oneepoch.runfolder import read_metrics
from oneepoch.tracking import TrackingUnavailable, check_backend, open_tracker, tracking_hooks
from oneepoch.training.trainer import train

HAVE_TB = importlib.util.find_spec("tensorboard") is not None
HAVE_MLFLOW = importlib.util.find_spec("mlflow") is not None and \
    importlib.util.find_spec("pandas") is not None


def _cfg(data: Path, out: Path, tracking: str, name: str = "run", uri: str = "") -> TrainConfig:
    return load_config(TrainConfig, None, [
        f"data.path={data}", f"out_dir={out}", f"name={name}", "progress=false", "threads=1",
        "batch_size=512", "eval.per_epoch=2", "epochs=1", "eval.train_rows=1000",
        "model.hidden=[16]", f"tracking={tracking}", f"tracking_uri={uri}"])


def test_config_knows_the_backends() -> None:
    assert load_config(TrainConfig, None, []).tracking == "none"
    with pytest.raises(ConfigError, match="tracking.*allowed: none, tensorboard, mlflow"):
        load_config(TrainConfig, None, ["tracking=wandb"])
    from oneepoch.pretrain import PretrainConfig
    assert load_config(PretrainConfig, None, ["tracking=mlflow"]).tracking == "mlflow"
    assert tracking_hooks(load_config(TrainConfig, None, [])) == []


@pytest.mark.parametrize("kind", ["tensorboard", "mlflow"])
def test_missing_backend_is_one_line_naming_the_extra(kind: str, monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == kind else real(name, *a))
    with pytest.raises(TrackingUnavailable) as e:
        check_backend(kind)
    msg = str(e.value)
    assert "\n" not in msg and f'pip install "oneepoch[{kind}]"' in msg
    cfg = load_config(TrainConfig, None, [f"tracking={kind}"])
    with pytest.raises(TrackingUnavailable, match=kind):
        tracking_hooks(cfg)


def test_missing_backend_via_cli_is_one_line(tiny_synth: Path, tmp_path: Path, monkeypatch,
                                              capsys) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    rc = main(["train", f"data.path={tiny_synth}", f"out_dir={tmp_path}", "tracking=mlflow",
               "epochs=1", "progress=false"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and 'pip install "oneepoch[mlflow]"' in err
    assert not any(tmp_path.iterdir())  # refused before the run folder was made


def test_none_tracker_does_nothing(tmp_path: Path) -> None:
    t = open_tracker("none", tmp_path / "r")
    t.log_params({"a": 1})
    t.log_metrics(0, {"x": 1.0})
    t.close()
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(not HAVE_TB, reason="tensorboard not installed (pip install "
                    "'oneepoch[tensorboard]')")
def test_tensorboard_round_trip(tiny_synth: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tiny_synth, tmp_path, "tensorboard")
    res = train(cfg, hooks=tracking_hooks(cfg))
    logdir = tmp_path / "tensorboard" / "run"  # beside the run folder
    ea = EventAccumulator(str(logdir))
    ea.Reload()
    rows = read_metrics(res.run_dir)
    for key in ("test_auc", "train_auc", "test_logloss"):
        ev = ea.Scalars(key)
        assert [e.step for e in ev] == [r["step"] for r in rows]
        assert [e.value for e in ev] == pytest.approx([r[key] for r in rows], rel=1e-6)
    assert "config" in "".join(ea.Tags()["tensors"])  # the config as text
    for f in ("report.html", "curves.png", "metrics.parquet", "config.yaml"):
        assert (logdir / "artifacts" / f).exists(), f


@pytest.mark.skipif(not HAVE_MLFLOW, reason="mlflow not installed (pip install "
                    "'oneepoch[mlflow]')")
def test_mlflow_round_trip(tiny_synth: Path, tmp_path: Path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    cfg = _cfg(tiny_synth, tmp_path, "mlflow")
    res = train(cfg, hooks=tracking_hooks(cfg))
    uri = (tmp_path / "mlruns").resolve().as_uri()  # the default: mlruns/ beside the runs
    mlflow.set_tracking_uri(uri)
    df = mlflow.search_runs(experiment_names=["oneepoch"])
    assert len(df) == 1
    run = df.iloc[0]
    assert run["tags.mlflow.runName"] == "run" and run["status"] == "FINISHED"
    assert run["params.optim.lr"] == "0.001" and run["params.model.hidden"] == "[16]"
    rows = read_metrics(res.run_dir)
    assert run["metrics.test_auc"] == pytest.approx(rows[-1]["test_auc"])
    client = MlflowClient(uri)
    hist = client.get_metric_history(run["run_id"], "test_auc")
    assert [(m.step, m.value) for m in hist] == [(r["step"], pytest.approx(r["test_auc"]))
                                                 for r in rows]
    names = {a.path for a in client.list_artifacts(run["run_id"])}
    assert {"report.html", "curves.png", "metrics.parquet", "config.yaml"} <= names


@pytest.mark.skipif(not HAVE_MLFLOW, reason="mlflow not installed")
def test_mlflow_tracking_uri_and_monitor(tmp_path: Path) -> None:
    import mlflow

    from oneepoch.monitor import Monitor

    store = tmp_path / "store"
    x = torch.randn(64, 3)
    y = (x[:, 0] > 0).float()
    mon = Monitor(tmp_path / "runs" / "mine", 4, [(x, y)], predict=lambda b: b[:, 0],
                  keep_best="none", epochs=1, per_epoch=2, tracking="mlflow",
                  tracking_uri=str(store), config={"lr": 0.1})
    for _ in range(4):
        mon.step(0.5)
    mon.finish()
    mlflow.set_tracking_uri(store.resolve().as_uri())
    df = mlflow.search_runs(experiment_names=["oneepoch"])
    assert len(df) == 1 and df.iloc[0]["params.lr"] == "0.1"
    assert df.iloc[0]["metrics.test_auc"] == pytest.approx(mon.rows[-1]["test_auc"])


@pytest.mark.skipif(not HAVE_TB, reason="tensorboard not installed")
def test_pretrain_streams_to_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from oneepoch.data.synthetic import SurfacesConfig, SynthConfig, write_multisurface
    from oneepoch.pretrain import PretrainConfig, pretrain

    world = tmp_path / "world"
    write_multisurface(world, SurfacesConfig(world=SynthConfig(n_users=200, n_items=400, seed=1),
                                             n_train=600, n_valid=200, n_test=200,
                                             n_heldout=200))
    cfg = load_config(PretrainConfig, "pretrain", [
        f"data.path={world / 'engagements'}", "epochs=1", "batch_size=128",
        "loss.n_uniform=32", "model.dim=4", "threads=1", "progress=false",
        "eval.max_pairs=100", "eval.train_pairs=100", "eval.per_epoch=2", "export=false",
        "tracking=tensorboard"])
    res = pretrain(cfg, tmp_path / "runs" / "pt", hooks=tracking_hooks(cfg, report=False))
    ea = EventAccumulator(str(tmp_path / "runs" / "tensorboard" / "pt"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("test_hit@3")] == [r["step"] for r in res.metrics]


@pytest.mark.skipif(not HAVE_TB, reason="tensorboard not installed")
def test_sweep_runs_share_one_log_folder(tiny_synth: Path, tmp_path: Path) -> None:
    from oneepoch.recipes.sweep import run_sweep

    run_sweep(None, {"model.type": ["lr"]}, seeds=1, out=tmp_path / "sw", workers=1,
              overrides=[f"data.path={tiny_synth}", "epochs=1", "batch_size=1024",
                         "eval.per_epoch=1", "eval.train_rows=500", "tracking=tensorboard"])
    logs = tmp_path / "sw" / "tensorboard" / "model.type=lr" / "seed-0"
    assert any(p.name.startswith("events.") for p in logs.iterdir())


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MLFLOW, reason="mlflow not installed")
def test_compare_runs_share_one_mlflow_store(tiny_synth: Path, tmp_path: Path,
                                             monkeypatch) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # reading a file store: opt in

    from oneepoch.recipes.compare import run_compare

    out = tmp_path / "cmp"
    run_compare(tiny_synth, ["freeze-emb"], epochs=1, seeds=1, out=out, workers=1,
                overrides=["batch_size=1024", "eval.per_epoch=2", "model.hidden=[16]",
                           "eval.train_rows=500", "tracking=mlflow"])
    mlflow.set_tracking_uri((out / "mlruns").resolve().as_uri())
    df = mlflow.search_runs(experiment_names=["oneepoch"])
    assert sorted(df["tags.mlflow.runName"]) == ["runs/early-stop/seed-0",
                                                 "runs/freeze-emb/seed-0"]
    assert (df["metrics.valid_auc"] > 0).all() and (df["status"] == "FINISHED").all()
