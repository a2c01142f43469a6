"""The shared loop skeleton: hook state across resume, one resume path for train and pretrain,
the run folder's lock and checks before it is touched, divergence, the step path, and the
package boundaries (no import cycle, reading runs without torch)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from oneepoch.config import TrainConfig, load_config
from oneepoch.data.synthetic import SurfacesConfig, SynthConfig, write_multisurface
from oneepoch.pretrain import PretrainConfig, pretrain
from oneepoch.remedies import hooks_from_config
from oneepoch.runfolder import RunFolderBusy, RunLock, read_metrics
from oneepoch.training import loop as loop_mod
from oneepoch.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from oneepoch.training.hooks import Hook, State
from oneepoch.training.loop import ResumeError, TrainingDiverged
from oneepoch.training.trainer import train

SRC = Path(__file__).resolve().parents[1] / "src" / "oneepoch"
TIMELESS = ("elapsed_s", "pairs_per_s")


def timeless(rows):
    return [{k: v for k, v in r.items() if k not in TIMELESS} for r in rows]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("loop") / "world"
    write_multisurface(out, SurfacesConfig(world=SynthConfig(n_users=300, n_items=600, seed=2),
                                           n_train=1_500, n_valid=300, n_test=300,
                                           engagement_ratio=3.0, n_heldout=300))
    return out


def ctr_cfg(world: Path, out: Path, *over: str) -> TrainConfig:
    return load_config(TrainConfig, "ctr", [
        f"data.path={world / 'homefeed'}", "data.test_split=valid", f"out_dir={out}",
        "epochs=2", "eval.per_epoch=3", "threads=1", "progress=false", "batch_size=128",
        "eval.train_rows=300", "model.hidden=16,8", *over])


class Kill(Hook):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def after_step(self, s: State) -> None:
        if s.step == self.at_step:
            raise KeyboardInterrupt


def test_single_stage_killed_after_epoch_1_resumes_bitwise(world: Path, tmp_path: Path):
    over = ("single_stage.weight=0.5", "single_stage.n_uniform=32")
    full_cfg = ctr_cfg(world, tmp_path, "name=full", *over)
    full = train(full_cfg, hooks=hooks_from_config(full_cfg))
    cfg = ctr_cfg(world, tmp_path, "name=killed", *over)
    spe = -(-1500 // 128)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, hooks=[*hooks_from_config(cfg), Kill(spe + 2)])
    ck = load_checkpoint(list_checkpoints(tmp_path / "killed")[-1])
    assert ck["epoch"] == 1 and "0-SingleStageContrastive" in ck["hooks"]
    assert set(ck["hooks"]["0-SingleStageContrastive"]) == {"log_tau", "opt", "gen"}
    resumed = train(cfg, tmp_path / "killed", hooks=hooks_from_config(cfg), resume=True)
    assert timeless(resumed.metrics) == timeless(full.metrics)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "epoch-002")
    b = load_checkpoint(tmp_path / "killed" / "checkpoints" / "epoch-002")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in ("log_tau", "gen"):
        assert torch.equal(a["hooks"]["0-SingleStageContrastive"][k],
                           b["hooks"]["0-SingleStageContrastive"][k])


def test_train_and_pretrain_resume_through_the_same_code(world: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    seen: list[str] = []
    real = loop_mod.Loop.restore

    def spy(self, ck):
        seen.append(type(self.state.cfg).__name__)
        return real(self, ck)

    monkeypatch.setattr(loop_mod.Loop, "restore", spy)
    cfg = ctr_cfg(world, tmp_path, "name=t", "epochs=1")
    train(cfg)
    train(ctr_cfg(world, tmp_path, "name=t", "epochs=2"), tmp_path / "t", resume=True)
    pcfg = load_config(PretrainConfig, "pretrain", [
        f"data.path={world / 'engagements'}", "epochs=1", "batch_size=256", "model.dim=8",
        "loss.n_uniform=32", "threads=1", "progress=false", "eval.max_pairs=100",
        "eval.train_pairs=100", "eval.per_epoch=1", f"out_dir={tmp_path}", "name=p"])
    pretrain(pcfg)
    pcfg.epochs = 2
    res = pretrain(pcfg, tmp_path / "p", resume=True)
    assert seen == ["TrainConfig", "PretrainConfig"]
    assert res.metrics[-1]["epoch"] == 2.0
    assert json.loads((tmp_path / "p" / "summary.json").read_text())["step_path"] == "autograd"


def test_summary_records_the_step_path_and_why(world: Path, tmp_path: Path):
    fused = train(ctr_cfg(world, tmp_path, "name=f", "epochs=1"))
    relu = train(ctr_cfg(world, tmp_path, "name=r", "epochs=1", "model.activation=relu"))
    sf = json.loads((fused.run_dir / "summary.json").read_text())
    sr = json.loads((relu.run_dir / "summary.json").read_text())
    from oneepoch import kernels

    if kernels.available() and kernels.has_blas():
        assert sf["step_path"] == "fused" and sf["step_path_reason"] == ""
    assert sr["step_path"] == "autograd" and "Dice" in sr["step_path_reason"]


def test_a_failed_start_leaves_the_previous_run_alone(world: Path, tmp_path: Path):
    cfg = ctr_cfg(world, tmp_path, "name=x", "epochs=1")
    train(cfg)
    run = tmp_path / "x"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    bad = [ctr_cfg(world, tmp_path, "name=x", "data.path=/nonexistent/data"),
           ctr_cfg(world, tmp_path, "name=x", "data.exclude_fields=nope"),
           ctr_cfg(world, tmp_path, "name=x", "init_from=/nonexistent/ck")]
    for c in bad:
        with pytest.raises((ValueError, FileNotFoundError, OSError)):
            train(c)
    c = ctr_cfg(world, tmp_path, "name=x", f"init.embeddings={tmp_path}/none")
    with pytest.raises(ValueError, match="no hook applies"):
        train(c)  # a remedy setting without its hook is refused, not ignored
    with pytest.raises((ValueError, FileNotFoundError, OSError)):
        train(c, hooks=hooks_from_config(c))  # the init source is checked up front
    c = ctr_cfg(world, tmp_path, "name=x", "single_stage.weight=0.5",
                "single_stage.item_field=his_item_ID")
    with pytest.raises(ValueError, match="sequence"):
        train(c, hooks=hooks_from_config(c))  # hook.check() runs before the folder is taken
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before


def test_resume_with_another_batch_size_is_refused_before_touching(world: Path, tmp_path: Path):
    train(ctr_cfg(world, tmp_path, "name=b", "epochs=1"))
    run = tmp_path / "b"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(ResumeError, match="steps per epoch"):
        train(ctr_cfg(world, tmp_path, "name=b", "epochs=2", "batch_size=100"), run,
              resume=True)
    with pytest.raises(ResumeError, match="do not fit"):
        train(ctr_cfg(world, tmp_path, "name=b", "epochs=2", "model.emb_dim=4"), run,
              resume=True)
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before


def test_second_writer_of_a_run_folder_is_refused_naming_the_pid(world: Path, tmp_path: Path):
    run = tmp_path / "busy"
    code = (f"import time; from oneepoch.runfolder import RunLock; "
            f"l = RunLock({str(run)!r}).acquire(); print('held', flush=True); time.sleep(30)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=f"PID {holder.pid}"):
            train(ctr_cfg(world, tmp_path, "name=busy", "epochs=1"))
        assert not (run / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(run):  # released when its process died
        pass
    train(ctr_cfg(world, tmp_path, "name=busy", "epochs=1"))


def test_nan_in_a_resumed_checkpoint_stops_with_the_step_and_no_verdict(world: Path,
                                                                          tmp_path: Path):
    train(ctr_cfg(world, tmp_path, "name=n", "epochs=1"))
    path = list_checkpoints(tmp_path / "n")[-1]
    ck = load_checkpoint(path)
    ck["model"]["mlp.fcs.0.weight"][:] = float("nan")
    save_checkpoint(path, ck)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step \d+"):
        train(ctr_cfg(world, tmp_path, "name=n", "epochs=2"), tmp_path / "n", resume=True)
    summary = json.loads((tmp_path / "n" / "summary.json").read_text())
    assert summary["finished"] is False and "no verdict" in summary["verdict"]
    assert "step" in summary["error"]


def test_verdict_is_invalid_on_non_finite_auc():
    from oneepoch.analysis import one_epoch_verdict

    v = one_epoch_verdict([0, 1.0, 1.05, 2.0], [0.6, 0.7, float("nan"), 0.6])
    assert not v.valid and "no verdict" in v.line() and "epoch 1.05" in v.line()


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    out = []
    for n in ast.walk(tree):
        if id(n) in skip:
            continue
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("oneepoch"):
            out += [f"{n.module}.{a.name}" for a in n.names] if n.module == "oneepoch" \
                else [n.module]
        elif isinstance(n, ast.Import):
            out += [a.name for a in n.names if a.name.startswith("oneepoch")]
    return out


def test_no_import_cycle_between_packages():
    """Every import, at module level or inside a function, between the top-level units of
    the package (subpackages and modules) forms a graph without cycles."""
    def unit(mod: str) -> str:
        return mod.split(".")[1] if "." in mod else "<root>"

    graph: dict[str, set[str]] = {}
    for f in SRC.rglob("*.py"):
        mod = ".".join(f.relative_to(SRC.parent).with_suffix("").parts)
        for target in _imports(f):
            a, b = unit(mod), unit(target)
            if a != b:
                graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(v: str) -> None:
        state[v] = 1
        path.append(v)
        for w in graph.get(v, ()):
            if state.get(w) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(w):] + [w]))
            if w not in state:
                visit(w)
        path.pop()
        state[v] = 2

    for v in list(graph):
        if v not in state:
            visit(v)
    assert "training" not in graph.get("report", set())
    assert not {"remedies", "probes"} & graph.get("training", set())


def test_reading_runs_and_reports_needs_no_torch(world: Path, tmp_path: Path):
    res = train(ctr_cfg(world, tmp_path, "name=r", "epochs=1"))
    code = ("import sys; import oneepoch.report, oneepoch.report.run_report, oneepoch.analysis; "
            "from oneepoch.runfolder import read_metrics; "
            f"rows = read_metrics({str(res.run_dir)!r}); "
            "from oneepoch.report.run_report import build_report; "
            f"build_report([{str(res.run_dir)!r}]); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(len(rows))")
    env = {**os.environ, "PYTHONPATH": str(SRC.parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == len(read_metrics(res.run_dir))


def test_reuse_counts_settings_a_later_version_added_at_their_default(tmp_path: Path):
    import yaml

    from oneepoch.config import to_dict
    from oneepoch.runfolder import RunConflict, reuse

    cfg = load_config(TrainConfig, "ctr", ["epochs=2"])
    old = to_dict(cfg)
    del old["optim"]["row_decay_alpha"]  # written by a version without the setting
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(old))
    (run / "summary.json").write_text('{"finished": true}')
    defaults = to_dict(TrainConfig())
    assert reuse(run, to_dict(cfg), defaults) == "skip"
    changed = load_config(TrainConfig, "ctr", ["epochs=2", "optim.row_decay_alpha=0.001"])
    with pytest.raises(RunConflict, match="row_decay_alpha"):
        reuse(run, to_dict(changed), defaults)
    with pytest.raises(RunConflict):  # without the defaults a missing key is a difference
        reuse(run, to_dict(cfg))
