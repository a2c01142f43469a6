"""Remedies as settings: early stopping on validation, MEDA, frequency-adaptive lr, freezing
after an epoch, the catalog, and ``oneepoch compare`` (refusals, resume, the honest line)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from oneepoch.cli import main
from oneepoch.config import TrainConfig, load_config
from oneepoch.data.dataset import load_ctr
from oneepoch.data.transforms import CARVED, carve_validation
from oneepoch.recipes.compare import ArmResult, honest_line, run_compare
from oneepoch.remedies import hooks_from_config
from oneepoch.remedies.catalog import REMEDIES, RemedyError, remedy_overrides
from oneepoch.remedies.embedding_rules import Meda, freq_scale
from oneepoch.training.checkpoint import load_checkpoint
from oneepoch.training.hooks import Hook, State
from oneepoch.training.trainer import build, prepare_data, train


def cfg_for(data: Path, out: Path, *over: str) -> TrainConfig:
    return load_config(TrainConfig, "ctr", [
        f"data.path={data}", f"out_dir={out}", "progress=false", "threads=1", "batch_size=256",
        "eval.per_epoch=4", "epochs=2", "model.hidden=32,16", "eval.train_rows=500", *over])


def run(data: Path, out: Path, *over: str):
    cfg = cfg_for(data, out, *over)
    return train(cfg, hooks=hooks_from_config(cfg))


def test_carved_validation_is_fixed_and_disjoint(tiny_synth: Path):
    data = load_ctr(tiny_synth)
    a = carve_validation(data, "train", 0.1, "random")
    b = carve_validation(data, "train", 0.1, "random")
    assert len(a.splits[CARVED]) == 600 and len(a.splits["train"]) == 5400
    assert np.array_equal(a.splits[CARVED].label, b.splits[CARVED].label)
    o = carve_validation(data, "train", 0.1, "order")  # the last rows, in file order
    assert np.array_equal(o.splits[CARVED].ids, data.splits["train"].ids[-600:])


class Snapshot(Hook):
    """Keeps the weights at every evaluation (to check the restore against)."""

    def __init__(self) -> None:
        self.at: dict[int, dict[str, torch.Tensor]] = {}

    def on_eval(self, s: State, row) -> None:
        self.at[s.step] = {k: v.detach().clone() for k, v in s.model.state_dict().items()}


def test_early_stopping_restores_the_best_weights_bit_identically(tiny_synth: Path,
                                                                  tmp_path: Path):
    cfg = cfg_for(tiny_synth, tmp_path, "name=es", "epochs=3", "data.valid_share=0.2",
                  "early_stop.metric=auc", "early_stop.patience=3", "optim.lr=0.01")
    snap = Snapshot()
    res = train(cfg, hooks=[snap, *hooks_from_config(cfg)])
    rows = res.metrics
    best = max(rows, key=lambda r: r["valid_auc"])
    summary = json.loads((res.run_dir / "summary.json").read_text())
    assert summary["selected"]["step"] == best["step"]
    assert summary["selected"]["test_auc"] == best["test_auc"]  # reported, never selected on
    final = load_checkpoint(res.run_dir / "checkpoints" / "final")["model"]
    for k, v in snap.at[best["step"]].items():
        assert torch.equal(final[k], v), k
    bad = sum(r["step"] > best["step"] for r in rows)
    if summary["stopped_early"]:
        assert bad == 3 and summary["finished"]  # stopped at the stated evaluation
    else:
        assert bad < 3


def test_early_stopping_without_validation_is_refused(tiny_synth: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="needs a validation split"):
        run(tiny_synth, tmp_path, "early_stop.metric=auc")
    assert not (tmp_path / "tiny-dnn-adam0.001-s0").exists()


def test_meda_resets_exactly_the_named_tables_and_their_state(tiny_synth: Path):
    cfg = cfg_for(tiny_synth, Path("/tmp"), "meda.enabled=true", "meda.fields=[item_ID]")
    data = prepare_data(cfg)
    model, opt = build(cfg, data)
    emb = model.embedding
    ro = opt.sparse["embedding.weight"]
    with torch.no_grad():  # every row and moment non-zero, as after some training
        emb.weight.fill_(0.5)
        for t in ro.state.values():
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.is_floating_point():
                t.fill_(0.25)
    mlp_before = {k: v.clone() for k, v in model.mlp.state_dict().items()}
    hook = Meda(cfg)
    s = State(cfg, data, model, opt, Path("/tmp"), 10)
    hook.check(s)
    s.epoch = 0
    hook.on_epoch_start(s)
    assert torch.all(emb.weight == 0.5)  # not at the first epoch
    s.epoch = 1
    hook.on_epoch_start(s)
    reset = emb.rows(data.field_vocab("item_ID"))  # item_ID's vocabulary (his_item_ID shares)
    touched = torch.zeros(emb.table_rows, dtype=torch.bool)
    touched[reset] = True
    assert torch.all(emb.weight[~touched] == 0.5)
    assert not torch.any(emb.weight[touched] == 0.5)
    assert abs(float(emb.weight.detach()[touched].std()) - emb.init_std) < 0.2 * emb.init_std
    for t in ro.state.values():
        if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.is_floating_point():
            assert torch.all(t[touched] == 0) and torch.all(t[~touched] == 0.25)
    for k, v in model.mlp.state_dict().items():
        assert torch.equal(v, mlp_before[k]), k


def test_freq_scale_and_freq_lr_run_on_the_fused_path(tiny_synth: Path, tmp_path: Path):
    assert freq_scale(np.array([1, 10, 40]), 10, 1.0).tolist() == [0.1, 1.0, 1.0]
    res = run(tiny_synth, tmp_path, "name=f", "freq_lr.threshold=5", "epochs=1")
    summary = json.loads((res.run_dir / "summary.json").read_text())
    assert 0 < summary["freq_lr_share_of_ids_slowed"] < 1


def test_freeze_after_epoch_1_keeps_the_group_fixed(tiny_synth: Path, tmp_path: Path):
    res = run(tiny_synth, tmp_path, "name=fz", "freeze_after.epoch=1",
              "freeze_after.groups=[embedding]", "checkpoint_keep=0")
    e1 = load_checkpoint(res.run_dir / "checkpoints" / "epoch-001")["model"]
    e2 = load_checkpoint(res.run_dir / "checkpoints" / "epoch-002")["model"]
    assert torch.equal(e1["embedding.weight"], e2["embedding.weight"])
    assert not torch.equal(e1["mlp.fcs.0.weight"], e2["mlp.fcs.0.weight"])


def test_catalog_refuses_what_the_data_lacks(tiny_synth: Path):
    data = load_ctr(tiny_synth)
    with pytest.raises(RemedyError, match="unknown"):
        remedy_overrides("magic", data)
    with pytest.raises(RemedyError, match="two-stage-frozen: needs pre-trained embeddings"):
        remedy_overrides("two-stage-frozen", data)
    assert remedy_overrides("meda", data) == ["meda.enabled=true"]
    assert "data.sparsity_fields=[item_ID,his_item_ID]" in remedy_overrides("hash", data)
    for name in REMEDIES:  # every remedy either gives settings or says what it lacks
        try:
            remedy_overrides(name, data, export="some/export")
        except RemedyError as e:
            assert name in str(e)


def test_compare_refuses_before_any_training(tiny_synth: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture):
    out = tmp_path / "c"
    for remedies, msg in ((["magic"], "unknown"), (["two-stage-finetune"], "--export"),
                          (["single-stage"], "user_ID")):
        rc = main(["compare", str(tiny_synth), "--remedies", ",".join(remedies), "--out",
                   str(out), "--seeds", "1", "--epochs", "1"])
        assert rc == 2 and msg in capsys.readouterr().err
        assert not (out / "runs").exists()
    rc = main(["compare", str(tiny_synth), "--remedies", "meda", "--valid", "none",
               "--out", str(out)])
    assert rc == 2 and "validation" in capsys.readouterr().err


def test_compare_runs_resumes_and_states_one_line(tiny_synth: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture):
    out = tmp_path / "cmp"
    kw = dict(epochs=2, seeds=2, out=out, workers=2,
              overrides=["batch_size=512", "eval.per_epoch=4", "model.hidden=[16]",
                         "eval.train_rows=500"])
    res = run_compare(tiny_synth, ["freeze-emb"], **kw)
    assert [a.name for a in res.arms] == ["early-stop", "freeze-emb"]
    assert all(a.seeds == 2 for a in res.arms)
    assert res.line.startswith(("none does here", "beats early stopping"))
    for a in res.arms:
        assert 1 in a.epoch_end_auc and 1 in a.boundary_drop
    text = (out / "compare.md").read_text()
    assert "selected test AUC" in text and res.line in text
    assert (out / "report.html").exists() and (out / "compare.png").exists()
    mtimes = {p: p.stat().st_mtime for p in out.glob("runs/*/seed-*/summary.json")}
    capsys.readouterr()
    again = run_compare(tiny_synth, ["freeze-emb"], **kw)  # every run is finished: skipped
    assert "skipping 4 finished run(s)" in capsys.readouterr().out
    assert {p: p.stat().st_mtime for p in mtimes} == mtimes
    assert again.line == res.line


def test_honest_line_needs_a_gain_beyond_seed_noise():
    def arm(name: str, sel: list[float]) -> ArmResult:
        return ArmResult(name, "", len(sel), sel, [1.0] * len(sel), {}, {}, [], [])

    base = arm("early-stop", [0.700, 0.702, 0.698])
    noisy = arm("meda", [0.703, 0.699, 0.700])  # +0.07 pt on average, but 1/3 seeds lose
    clear = arm("freq-lr", [0.710, 0.712, 0.709])  # +1 pt on every seed
    line = honest_line([base, noisy, clear])
    assert "freq-lr" in line and "meda" not in line and "3/3 seeds" in line
    assert honest_line([base, noisy]).startswith("none does here")
    assert not honest_line([base, arm("lazy", [0.8])]).startswith("beats")  # one seed: never
    steady = arm("adamar", [0.7001, 0.7021, 0.6981])  # +0.01 pt on every seed: too small
    assert honest_line([base, steady]).startswith("none does here")
