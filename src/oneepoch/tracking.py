"""Experiment tracking: each evaluation's metrics streamed to TensorBoard or MLflow as they
come, the run's settings as hyper-parameters, the report and curves as artifacts.

    >>> t = open_tracker("none", "runs/x")
    >>> t.log_metrics(0, {"test_auc": 0.5}); t.close()

Chosen by the settings ``tracking=tensorboard|mlflow|none`` and ``tracking_uri`` of ``train``,
``pretrain`` and ``sweep`` (and :class:`oneepoch.monitor.Monitor`); :func:`tracking_hooks`
builds the :class:`TrackingHook` a config asks for. Where the logs go when ``tracking_uri`` is
empty: TensorBoard event files in ``tensorboard/RUN_NAME/`` beside the run folder (``tensorboard
--logdir runs/tensorboard``), MLflow a local file store ``mlruns/`` beside the run folder
(``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri runs/mlruns``).
``tracking_uri`` sets the TensorBoard log folder, or the MLflow tracking URI (a folder,
``file:``, ``sqlite:`` or ``http(s):``).

Both backends are optional extras: ``pip install "oneepoch[tensorboard]"`` or
``"oneepoch[mlflow]"``; a missing one is a :class:`TrackingUnavailable` naming the extra.
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from pathlib import Path
from typing import Any, Protocol

from oneepoch.training.hooks import Hook, State

BACKENDS = ("none", "tensorboard", "mlflow")
_MODULE = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
ARTIFACTS = ("report.html", "curves.png", "metrics.parquet", "config.yaml", "summary.json")


class TrackingUnavailable(ValueError):
    """The tracking backend asked for is not installed."""


class Tracker(Protocol):
    """Where a run's hyper-parameters, metrics and files go."""

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...
    def log_artifact(self, path: str | Path) -> None: ...
    def close(self) -> None: ...


def check_backend(kind: str) -> None:
    """Refuse an unknown backend, or one whose package is not installed (one line naming the
    extra to install)."""
    if kind not in BACKENDS:
        raise TrackingUnavailable(f"tracking={kind}: unknown backend; choose "
                                  f"{', '.join(BACKENDS)}")
    if kind != "none" and importlib.util.find_spec(_MODULE[kind]) is None:
        raise TrackingUnavailable(f"tracking={kind}: the {kind} package is not installed; "
                                  f'pip install "oneepoch[{kind}]"')


def flat_params(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"optim.lr": 0.001, ...}`` (lists as text)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def numeric(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of an evaluation row, but ``step``."""
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


class NoTracker:
    """``tracking=none``: nothing is logged."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_artifact(self, path: str | Path) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """Scalars per evaluation step, the config as a text summary (``config``), files copied
    into the run's log folder's ``artifacts/`` (TensorBoard has no artifact store)."""

    def __init__(self, logdir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = Path(logdir)
        self.writer = SummaryWriter(str(self.logdir))
        self.params: dict[str, Any] = {}

    def log_params(self, params: dict[str, Any]) -> None:
        self.params = dict(params)
        text = "\n".join(f"    {k}: {v}" for k, v in sorted(params.items()))
        self.writer.add_text("config", text)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def log_artifact(self, path: str | Path) -> None:
        import shutil

        p = Path(path)
        dst = self.logdir / "artifacts"
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dst / p.name)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class MlflowTracker:
    """One MLflow run (experiment ``experiment``), params, metrics per step, artifacts."""

    def __init__(self, uri: str, experiment: str, run_name: str) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        if "://" not in uri and not uri.startswith(("file:", "sqlite:")):
            uri = Path(uri).resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow >= 3.x asks file stores to opt in; a local mlruns/ is what we promise
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(
            experiment)
        self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        self._mlflow = mlflow

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for a in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[a:a + 100])

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k.replace("@", "_at_"), v, ts, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def default_uri(kind: str, run_dir: Path) -> str:
    """Where logs go when ``tracking_uri`` is empty: beside the run folder."""
    return str(run_dir.resolve().parent / ("mlruns" if kind == "mlflow" else "tensorboard"))


def open_tracker(kind: str, run_dir: str | Path, uri: str = "", experiment: str = "oneepoch"
                 ) -> Tracker:
    """A tracker of backend ``kind`` for the run in ``run_dir`` (see the module doc)."""
    check_backend(kind)
    run_dir = Path(run_dir)
    if kind == "none":
        return NoTracker()
    uri = uri or default_uri(kind, run_dir)
    name = run_label(run_dir, uri)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the backends' deprecation chatter
        if kind == "tensorboard":
            return TensorBoardTracker(Path(uri) / name)
        return MlflowTracker(uri, experiment, name)


def run_label(run_dir: Path, uri: str) -> str:
    """The run's name in the tracker: its path from the folder holding a local store
    (``point/seed-0`` in a sweep's ``OUT/mlruns``), else the folder's name."""
    if "://" in uri or uri.startswith(("sqlite:", "file:")):
        return run_dir.name
    try:
        return run_dir.resolve().relative_to(Path(uri).resolve().parent).as_posix()
    except ValueError:
        return run_dir.name


class TrackingHook(Hook):
    """Streams a run to a tracker: the config as hyper-parameters at the start, each
    evaluation's numbers as it comes, the run's files as artifacts at the end.

    Args:
        kind, uri: the backend and where it writes (see the module doc).
        report: build ``curves.png`` and ``report.html`` at the end (the CTR loops: train,
            sweep) before logging them; the monitor builds its own.
    """

    applies = "tracking"

    def __init__(self, kind: str, uri: str = "", report: bool = False) -> None:
        check_backend(kind)
        self.kind, self.uri, self.report = kind, uri, report
        self.tracker: Tracker | None = None

    def check(self, s: State) -> None:
        check_backend(self.kind)

    def on_train_start(self, s: State) -> None:
        from oneepoch.config import to_dict

        if self.tracker is not None:
            return
        self.tracker = open_tracker(self.kind, s.run_dir, self.uri)
        cfg = s.cfg if isinstance(s.cfg, dict) else to_dict(s.cfg)
        self.tracker.log_params(flat_params(cfg))
        for row in s.rows:  # a resumed run: the rows so far
            self.tracker.log_metrics(int(row["step"]), numeric(row))

    def on_eval(self, s: State, row: dict[str, Any]) -> None:
        if self.tracker is not None:
            self.tracker.log_metrics(int(row["step"]), numeric(row))

    def on_train_end(self, s: State) -> None:
        if self.tracker is None:
            return
        if self.report and s.rows and "test_auc" in s.rows[0]:
            from oneepoch.report.run_report import build_report

            build_report([s.run_dir])
        for name in ARTIFACTS:
            if (s.run_dir / name).exists():
                self.tracker.log_artifact(s.run_dir / name)
        self.tracker.close()
        self.tracker = None


def shared_store(cfg: Any, out: str | Path) -> list[str]:
    """For a recipe that trains many runs under ``out`` (sweep, compare): check the backend
    and, unless ``tracking_uri`` is set, the override that puts every run in one store
    (``OUT/mlruns`` or ``OUT/tensorboard``); ``[]`` when tracking is off."""
    kind = getattr(cfg, "tracking", "none") or "none"
    if kind == "none":
        return []
    check_backend(kind)
    if getattr(cfg, "tracking_uri", ""):
        return []
    return [f"tracking_uri={default_uri(kind, Path(out) / 'x')}"]


def tracking_hooks(cfg: Any, report: bool = True) -> list[Hook]:
    """The tracking hook ``cfg.tracking`` asks for (``[]`` for ``none``)."""
    kind = getattr(cfg, "tracking", "none") or "none"
    if kind == "none":
        return []
    return [TrackingHook(kind, getattr(cfg, "tracking_uri", ""), report=report)]
