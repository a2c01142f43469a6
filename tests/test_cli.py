import json
import subprocess
import sys

import pytest

from oneepoch.cli import COMMANDS, main
from oneepoch.runfolder import read_metrics


def run(*args):
    return main([str(a) for a in args])


def test_every_command_has_help(capsys):
    for cmd in [*COMMANDS, "data synth", "data stats", "data validate"]:
        with pytest.raises(SystemExit) as e:
            run(*cmd.split(), "--help")
        assert e.value.code == 0
        assert "usage: oneepoch" in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "oneepoch.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "demo" in out and "train" in out


def test_synth_stats_validate_train_report(tmp_path, capsys):
    d = tmp_path / "syn"
    assert run("data", "synth", "--out", d, "--rows", 8000, "--test-rows", 1000, "--set",
               "n_users=1000", "n_items=3000") == 0
    out = capsys.readouterr().out
    assert "ground-truth AUC on test (ceiling): 0." in out
    assert {"schema.yaml", "train.parquet", "test.parquet", "synth.json"} <= {
        p.name for p in d.iterdir()}
    assert run("data", "validate", d) == 0
    assert "train: 8,000 rows" in capsys.readouterr().out
    assert run("data", "stats", d) == 0
    out = capsys.readouterr().out
    assert "| item_ID | id |" in out and "| his_item_ID | sequence |" in out
    assert (d / "stats" / "id_frequency.png").stat().st_size > 1000
    stats = json.loads((d / "stats" / "stats.json").read_text())
    assert {r["field"] for r in stats["fields"]} >= {"user_age", "scene_ID", "his_item_cate"}

    assert run("train", "--config", "ctr", f"data.path={d}", f"out_dir={tmp_path / 'runs'}",
               "name=t", "epochs=2", "batch_size=256", "eval.per_epoch=20", "progress=false",
               "threads=1") == 0
    out = capsys.readouterr().out
    assert "one-epoch phenomenon:" in out
    rd = tmp_path / "runs" / "t"
    # curves + test AUC per ID-frequency bucket, embedded (one file, offline)
    assert (rd / "report.html").read_text().count("data:image/png;base64") == 2
    assert "test_auc_tail" in read_metrics(rd)[-1]
    assert (rd / "curves.png").exists()

    assert run("train", "--resume", rd, "epochs=3") == 0  # extend a finished run
    assert run("report", rd, rd, "--out", tmp_path / "overlay", "--title", "two") == 0
    html = (tmp_path / "overlay" / "report.html").read_text()
    assert "<h1>two</h1>" in html and "Around each epoch boundary" in html


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert run("data", "validate", tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith("oneepoch data: error:") and "missing schema file" in err
    assert run("train", "data.path=x", "model.kind=dnn") == 2
    assert "unknown config key 'model.kind'" in capsys.readouterr().err
    assert run("train", "--config", "nope.yaml") == 2
    assert "config file 'nope.yaml' not found" in capsys.readouterr().err


def test_overrides_may_follow_options(tmp_path, capsys):
    from oneepoch.cli import build_parser

    assert run("train", "model.kind=dnn", "--config", "ctr", "epochs=2") == 2
    assert "unknown config key 'model.kind'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--config", "ctr", "--bogus"])
    assert build_parser() is not None
