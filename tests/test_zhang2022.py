"""``oneepoch reproduce zhang2022``: figure definitions, verdict rules, end to end (quick)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import HAND_SCHEMA, hand_table, write_ctr
from oneepoch.cli import main
from oneepoch.data.dataset import load_ctr
from oneepoch.recipes import ReproduceOptions
from oneepoch.recipes import zhang2022 as z


def test_verdict_rule():
    assert z.verdict_of([True, True, True]) == "reproduced"
    assert z.verdict_of([True, False]) == "mixed"
    assert z.verdict_of([False, False]) == "not reproduced"
    assert z.verdict_of([]) == "not reproduced"


def test_parse_figures():
    assert z.parse_figures("all") == z.ORDER
    assert z.parse_figures("6,14,15,6") == ["6", "14-15"]
    for bad in ("4", None, ""):
        with pytest.raises(ValueError, match="--figure"):
            z.parse_figures(bad)


@pytest.mark.parametrize("preset", [z.DEFAULT, z.QUICK])
def test_every_figure_uses_defined_arms(preset):
    arms = z.build_arms(preset, ["item_ID", "his_item_ID"])
    for fig in z.ORDER:
        keys = z.figure_arms(fig, preset)
        assert all(k in arms for k in keys), fig
        assert keys == [] or keys[0] == "base"
    assert arms["base"].probes and "checkpoint_keep=0" in arms["base"].overrides
    assert arms["only-mlp"].continue_freeze == "embedding"
    assert arms["only-emb"].continue_freeze == "mlp"
    assert "data.exclude_fields=[item_ID,his_item_ID]" in arms["no-fine-ids"].overrides


def test_fine_fields_falls_back_to_largest_vocabulary(tmp_path):
    data = load_ctr(write_ctr(tmp_path / "d", {"train": hand_table(50), "test": hand_table(9)},
                              HAND_SCHEMA))
    assert z.fine_fields(data) == ["item", "hist"]  # the shared item vocabulary is the largest


def _fake_run(d, drop, seed):
    """metrics.parquet of a run whose test AUC climbs to 0.7 then falls by ``drop``."""
    d.mkdir(parents=True)
    ep = np.arange(0, 41) / 20
    auc = 0.6 + 0.1 * np.minimum(ep, 1) + 0.001 * seed
    auc = np.where(ep > 1, auc - drop, auc)
    rows = {"step": np.arange(41), "epoch": ep, "test_auc": auc, "train_auc": auc}
    pq.write_table(pa.table(rows), d / "metrics.parquet")


def test_fig6_verdict_is_computed_from_the_numbers(tmp_path, tiny_synth):
    data = load_ctr(tiny_synth)
    arms = z.build_arms(z.QUICK, z.fine_fields(data))

    def verdict(base_drop, lr_drop):
        out = tmp_path / f"{base_drop}-{lr_drop}"
        runs = {k: [out / "runs" / k / f"seed-{s}" for s in range(2)] for k in arms}
        for s in range(2):
            _fake_run(runs["base"][s], base_drop, s)
            _fake_run(runs["lr"][s], lr_drop, s)
        c = z.Context(z.QUICK, out, data, arms, runs, z.fine_fields(data))
        res = z.fig6(c, ["base", "lr"])
        assert res.images[0].exists() and "| DNN (base) | 2 |" in res.table.markdown()
        return res.verdict, [ch.passed for ch in res.checks]

    assert verdict(0.02, 0.0) == ("reproduced", [True, True])
    assert verdict(0.02, 0.02) == ("mixed", [True, False])
    assert verdict(0.0, 0.02) == ("not reproduced", [False, False])


def test_report_renders_figure_tables_as_html_tables(tmp_path, tiny_synth):
    data = load_ctr(tiny_synth)
    arms = z.build_arms(z.QUICK, z.fine_fields(data))
    runs = {k: [tmp_path / "runs" / k / f"seed-{s}" for s in range(2)] for k in arms}
    for s in range(2):
        _fake_run(runs["base"][s], 0.02, s)
        _fake_run(runs["lr"][s], 0.0, s)
    c = z.Context(z.QUICK, tmp_path, data, arms, runs, z.fine_fields(data))
    res = z.fig6(c, ["base", "lr"])
    z._write_figure(c, "6", res, 1.0)
    odd = z.Table(["field", "IDs"], [["<b>x</b> & y", 3]])  # cell text is escaped
    z._write_figure(c, "10", z.FigureResult("mixed", [], [], odd), 0.0)
    html = z.write_report(tmp_path).read_text()
    head = "".join(f"<th>{h}</th>" for h in z.SUMMARY_HEADER)
    assert f"<table><tr>{head}</tr><tr><td>DNN (base)</td><td>2</td><td>0.7" in html
    assert "<tr><td>LR</td><td>2</td>" in html
    assert "<tr><td>&lt;b&gt;x&lt;/b&gt; &amp; y</td><td>3</td></tr>" in html
    assert "| DNN (base) |" not in html and "|---|" not in html and "<pre>" not in html
    md = (tmp_path / "fig6" / "table.md").read_text()  # Markdown from the same rows
    assert "| DNN (base) | 2 | 0.7" in md


def test_update_ratios_measure_the_jump_at_the_boundary(tmp_path):
    steps = np.arange(1, 201)
    ep = steps / 100
    fc = np.where(ep > 1, 3.0, 1.0)
    pq.write_table(pa.table({"step": steps, "epoch": ep, "embedding": np.ones(200),
                             "fc1": fc}), tmp_path / "updates.parquet")
    r = z.update_ratios(tmp_path)
    assert r == {"embedding": pytest.approx(1.0), "fc1": pytest.approx(3.0)}


@pytest.mark.slow
def test_reproduce_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "rep"
    rc = main(["reproduce", "zhang2022", "--quick", "--figure", "6,17", "--seeds", "1",
               "--workers", "1", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "Fig. 6 (DNN vs LR):" in text and "Fig. 17 (Partial fine-tuning):" in text
    for fig in ("6", "17"):
        res = json.loads((out / f"fig{fig}" / "result.json").read_text())
        assert res["verdict"] == z.verdict_of([c["passed"] for c in res["checks"]])
        assert all((out / f"fig{fig}" / p).exists() for p in ("table.md", f"fig{fig}.png"))
    assert (out / "runs" / "only-mlp" / "seed-0" / "summary.json").exists()
    html = (out / "report.html").read_text()
    assert "Fig. 6: DNN vs LR" in html and "Fig. 17: Partial fine-tuning" in html
    assert "data:image/png;base64" in html
    # a second call reuses the data and every finished run, and adds its figure to the report
    rc = main(["reproduce", "zhang2022", "--quick", "--figure", "10,16", "--seeds", "1",
               "--workers", "1", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "skipping 1 finished run(s)" in text and "/seed-0:" not in text
    html = (out / "report.html").read_text()
    assert "Fig. 10: ID frequency" in html and "Fig. 6: DNN vs LR" in html
    ratios = json.loads((out / "fig16" / "result.json").read_text())["numbers"]["ratios"]
    assert set(ratios) == {"embedding", "fc1", "fc2", "fc3"}
    # analysis only: figure 8's arms were never trained, so its checks see no runs (n=0)
    args = ReproduceOptions(figure="8", seeds=1, quick=True, out=str(out), workers=1)
    assert z.reproduce(args, train=False) == 0
    assert not (out / "runs" / "sgd-0.1").exists()
    res = json.loads((out / "fig8" / "result.json").read_text())
    assert any("(n=0)" in ch["numbers"] for ch in res["checks"])


@pytest.mark.slow
def test_reproduce_quick_adistance_figure(tmp_path):
    out = tmp_path / "rep"
    assert main(["reproduce", "zhang2022", "--quick", "--figure", "14-15", "--seeds", "1",
                 "--workers", "1", "--out", str(out)]) == 0
    res = json.loads((out / "fig14-15" / "result.json").read_text())
    assert len(res["checks"]) == 5 and res["verdict"] in ("reproduced", "mixed",
                                                          "not reproduced")
    jumps = res["numbers"]["jumps"]["train"]
    assert set(jumps) >= {"all fields", "item_ID", "his_item_ID"}
    assert all(np.isfinite(v["jump"]) and np.isfinite(v["trend"]) for v in jumps.values())
    for p in ("fig14.png", "fig15_train.png", "fig15_test.png"):
        assert (out / "fig14-15" / p).exists()
