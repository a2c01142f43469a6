"""``oneepoch sweep``: grids, per-run folders, resume, summaries."""

import json
import math
import os

import numpy as np
import pytest

from oneepoch.analysis import boundary_drop
from oneepoch.cli import main
from oneepoch.recipes.sweep import (
    RunSpec,
    grid_points,
    make_probe,
    parse_grid,
    point_name,
    run_specs,
    run_stats,
    run_sweep,
)
from oneepoch.runfolder import is_finished, read_metrics

TINY = ["epochs=2", "batch_size=500", "eval.per_epoch=10", "eval.train_rows=500",
        "model.hidden=[8]", "model.emb_dim=4"]


def test_parse_grid_and_points():
    g = parse_grid(["optim.lr=1e-3, 1e-2", "model.hidden=[200,80],[400,160]"])
    assert g == {"optim.lr": ["1e-3", "1e-2"], "model.hidden": ["[200,80]", "[400,160]"]}
    pts = grid_points(g)
    assert len(pts) == 4 and pts[1] == {"optim.lr": "1e-3", "model.hidden": "[400,160]"}
    assert point_name(pts[1]) == "optim.lr=1e-3,model.hidden=400,160"
    assert point_name({}) == "base"
    for bad in ("optim.lr", "=1,2", "optim.lr="):
        with pytest.raises(ValueError, match="--grid"):
            parse_grid([bad])
    with pytest.raises(ValueError, match="given twice"):
        parse_grid(["a=1", "a=2"])


def test_make_probe_errors():
    with pytest.raises(ValueError, match="unknown"):
        make_probe("gradnorm")
    with pytest.raises(ValueError, match="key=value"):
        make_probe("adistance:rows")
    with pytest.raises(ValueError, match="unknown config key 'rows'"):
        make_probe("updates:rows=3")
    with pytest.raises(ValueError, match=r"unknown config key 'row' \(did you mean 'rows'"):
        make_probe("adistance:row=3")
    with pytest.raises(ValueError, match=r"config key 'rows': got 4; must be >= 8"):
        make_probe("adistance:rows=4")
    assert make_probe("adistance:rows=1e3").rows == 1000
    p = make_probe("adistance:rows=500,per_field=false,every=3")
    assert (p.rows, p.per_field, p.every) == (500, False, 3)


def test_boundary_drop_and_run_stats():
    ep = np.array([0, 0.5, 1.0, 1.05, 1.1, 1.5, 2.0])
    auc = np.array([0.5, 0.65, 0.70, 0.68, 0.69, 0.66, 0.64])
    assert boundary_drop(ep, auc).drop == pytest.approx(0.02)
    # evaluations sparser than the window: the first one after the boundary counts
    b = boundary_drop(np.array([0.5, 1.0, 1.5]), np.array([0.6, 0.7, 0.65]))
    assert b.drop == pytest.approx(0.05) and b.widened
    assert math.isnan(boundary_drop(np.array([0.5, 1.0]), np.array([0.6, 0.7])).drop)
    rows = [{"epoch": e, "test_auc": a, "step": i}
            for i, (e, a) in enumerate(zip(ep, auc, strict=True))]
    s = run_stats(rows)
    assert s["best_auc"] == 0.70 and s["best_epoch"] == 1.0 and s["auc_epoch1"] == 0.70
    assert s["drop_epoch2"] == pytest.approx(0.02) and s["final_auc"] == 0.64
    assert s["auc_epoch2"] == 0.64


def test_sweep_runs_grid_skips_finished_and_summarises(tiny_synth, tmp_path):
    out = tmp_path / "sw"
    base = [f"data.path={tiny_synth}", *TINY]
    res = run_sweep(None, {"model.type": ["dnn", "lr"]}, seeds=2, out=out, workers=1,
                    overrides=base)
    dirs = [out / p / f"seed-{s}" for p in ("model.type=dnn", "model.type=lr") for s in (0, 1)]
    assert all(is_finished(d) for d in dirs)
    for name in ("sweep.png", "summary.md", "summary.json", "summary.html"):
        assert (out / name).stat().st_size > 0
    md = (out / "summary.md").read_text()
    assert "| model.type=dnn | 2 |" in md and "| model.type=lr | 2 |" in md
    js = json.loads((out / "summary.json").read_text())
    assert [p["name"] for p in js] == ["model.type=dnn", "model.type=lr"]
    dnn = res.points[0]
    aucs = [json.loads((d / "summary.json").read_text())["verdict_detail"]["best_auc"]
            for d in dirs[:2]]
    assert dnn.stats["best_auc"][0] == pytest.approx(np.mean(aucs))
    assert dnn.stats["best_auc"][1] == pytest.approx(np.std(aucs, ddof=1))
    # the two seeds differ, the summary of each point is over its own seeds
    assert aucs[0] != aucs[1]

    # resume: nothing is re-trained; a run whose summary is gone (killed) is trained again
    mtimes = {d: os.path.getmtime(d / "metrics.parquet") for d in dirs}
    points = [(p, s) for p in ("dnn", "lr") for s in (0, 1)]
    specs = [RunSpec(str(d), [*base, f"model.type={p}", f"seed={s}"])
             for d, (p, s) in zip(dirs, points, strict=True)]
    assert run_specs(specs, workers=1, log=False) == []
    (dirs[3] / "summary.json").unlink()
    again = run_specs(specs, workers=1, log=False)
    assert [r["run_dir"] for r in again] == [str(dirs[3])]
    assert all(os.path.getmtime(d / "metrics.parquet") == mtimes[d] for d in dirs[:3])
    # a finished run with other settings is not silently reused
    with pytest.raises(ValueError, match="other settings.*optim"):
        run_specs([RunSpec(str(dirs[0]), [*base, "seed=0", "optim.lr=0.5"])], 1, log=False)


@pytest.mark.slow
def test_sweep_cli_parallel_workers_with_probe(tiny_synth, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["sweep", "--grid", "optim.name=adam,sgd", "--seeds", "1", "--workers", "2",
               "--out", str(out), "--probe", "updates", f"data.path={tiny_synth}", *TINY])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| optim.name=adam | 1 |" in text and "summary.html" in text
    for p in ("optim.name=adam", "optim.name=sgd"):
        assert (out / p / "seed-0" / "updates.parquet").exists()
        assert is_finished(out / p / "seed-0")


def test_sweep_bad_setting_fails_before_training(tiny_synth, tmp_path, capsys):
    rc = main(["sweep", "--grid", "optim.nme=adam", "--out", str(tmp_path / "x"),
               f"data.path={tiny_synth}"])
    assert rc == 2 and "optim.nme" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


FACTORS = ["model.type=lr", "model.emb_dim=2", "model.width_mult=2", "model.hidden=[8,4]",
           "model.activation=relu", "model.activation=sigmoid", "model.activation=prelu",
           "batch_size=250", "optim.name=rmsprop", "optim.name=sgd", "optim.name=adagrad",
           "optim.lr=0.01", "optim.weight_decay=0.01", "model.dropout=0.3",
           "data.sparsity=filter", "data.sparsity=hash", "data.exclude_fields=[item_ID]",
           "data.label_noise=0.5", "shuffle=none", "shuffle=once"]


def test_every_factor_of_paper_a_trains_and_changes_the_result(tiny_synth, tmp_path):
    base = [f"data.path={tiny_synth}", "epochs=1", "batch_size=500", "eval.per_epoch=1",
            "eval.train_rows=500", "model.hidden=[8]", "model.emb_dim=4",
            "data.sparsity_m=0.01"]
    specs = [RunSpec(str(tmp_path / "base"), base)]
    specs += [RunSpec(str(tmp_path / point_name({"f": f})), [*base, f]) for f in FACTORS]
    run_specs(specs, workers=1, log=False)
    final = {s.run_dir: read_metrics(s.run_dir)[-1]["test_auc"] for s in specs}
    ref = final[specs[0].run_dir]
    for s in specs[1:]:
        assert is_finished(s.run_dir)
        assert final[s.run_dir] != ref, s.overrides[-1]  # the setting had an effect
