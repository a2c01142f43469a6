"""Paper B's reproduction: per-request Hit@K, the verdict rules, and --quick end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from oneepoch.cli import main
from oneepoch.recipes.hsu2024 import (
    best_and_last,
    curve_shape,
    figure2_verdict,
    hit_at_k_grouped,
    table1_verdicts,
)


def brute_hit(labels, scores, groups, k):
    vals = []
    for g in np.unique(groups):
        m = groups == g
        y, s = labels[m], scores[m]
        if y.min() == y.max():
            continue
        # pessimistic ties: positives after negatives of the same score
        order = sorted(range(len(y)), key=lambda i: (-s[i], y[i]))
        vals.append(float(y[order[:k]].max() > 0))
    return float(np.mean(vals))


@pytest.mark.parametrize("k", [1, 3])
def test_hit_at_k_grouped_matches_brute_force(k):
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(60), 7)
    rng.shuffle(groups)
    labels = (rng.random(len(groups)) < 0.25).astype(int)
    scores = np.round(rng.random(len(groups)), 1)  # many ties
    assert hit_at_k_grouped(labels, scores, groups, k) == pytest.approx(
        brute_hit(labels, scores, groups, k))


def test_hit_at_k_constant_scores_count_against():
    assert hit_at_k_grouped(np.array([1, 0, 0, 0]), np.zeros(4), np.zeros(4), k=3) == 0.0


def test_figure2_verdict_rule():
    rising = np.array([0.0, 0.10, 0.14, 0.16, 0.17, 0.172])
    overfit = np.array([0.0, 0.20, 0.18, 0.15, 0.12, 0.10])
    assert figure2_verdict(rising, overfit)[0] == "yes"
    assert figure2_verdict(overfit, overfit)[0] == "partly"
    assert figure2_verdict(overfit, rising)[0] == "no"


def test_curve_shapes_and_the_verdict_use_the_train_curve():
    held = np.array([0.0, 0.030, 0.045, 0.040, 0.030, 0.021])  # peak at 2, 47% of it at the end
    rising_train = np.array([0.0, 0.10, 0.15, 0.18, 0.20, 0.22])
    falling_train = np.array([0.0, 0.10, 0.15, 0.10, 0.06, 0.03])
    assert curve_shape(held, rising_train)[0] == "overfits"
    assert curve_shape(held, falling_train)[0] == "declines"  # not memorisation
    flat_train = np.array([0.0, 0.10, 0.15, 0.15, 0.155, 0.156])  # +4%: noise, not a rise
    assert curve_shape(held, flat_train)[0] == "declines"
    assert curve_shape(held)[0] == "overfits"  # no train curve: the drop alone
    plateau = np.array([0.0, 0.086, 0.087, 0.086, 0.0856])
    assert curve_shape(plateau)[0] == "holds"  # within 10% of best, not above epoch 1
    assert curve_shape(np.array([0.0, 0.05, 0.07, 0.08]))[0] == "keeps improving"
    # just inside / outside the 10% margin
    assert curve_shape(np.array([0.0, 0.1, 0.091]))[0] == "holds"
    assert curve_shape(np.array([0.0, 0.1, 0.089]))[0] == "overfits"
    # the claim: contrastive keeps generalising and BCE overfits (train rising)
    word, notes = figure2_verdict(plateau, held[:5], plateau, rising_train[:5])
    assert word == "yes" and "overfits: yes" in notes[1]
    assert figure2_verdict(held, held, rising_train, falling_train)[0] == "no"
    assert figure2_verdict(plateau, held, None, falling_train)[0] == "partly"


def test_table1_verdict_rule():
    good = {"frozen": np.array([1.0, 1.2, 1.1]), "finetune": np.array([1.3, 1.5, 1.4]),
            "single_stage": np.array([-3.0, -3.2, -3.1])}
    assert all(v[2] == "yes" for v in table1_verdicts({"s vs b": good}))
    noisy = {"frozen": np.array([2.0, -1.5, 0.1]), "finetune": np.array([1.3, 1.5, 1.4]),
             "single_stage": np.array([0.5, 0.4, 0.6])}
    got = {v[1]: v[2] for v in table1_verdicts({"s vs b": noisy})}
    assert got["two-stage frozen beats the baseline"] == "no"  # mean < std
    assert got["single stage is worse than the baseline"] == "no"


def test_best_is_chosen_on_validation_not_test():
    rows = [{"step": 0, "epoch": 0.0, "test_auc": 0.5, "heldout_auc": 0.5, "heldout_hit@3": 0.1},
            {"step": 1, "epoch": 0.5, "test_auc": 0.7, "heldout_auc": 0.6, "heldout_hit@3": 0.3},
            {"step": 2, "epoch": 1.0, "test_auc": 0.6, "heldout_auc": 0.9, "heldout_hit@3": 0.5}]
    r = best_and_last(rows)
    assert r["best"]["auc"] == 0.6 and r["best"]["epoch"] == 0.5  # the validation peak
    assert r["last"]["auc"] == 0.9


@pytest.mark.slow
def test_reproduce_hsu2024_quick_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture):
    rc = main(["reproduce", "hsu2024", "--figure", "2", "--table", "1", "--quick",
               "--seeds", "1", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Figure 2 reproduces:" in out and "Table 1 reproduces:" in out
    root = tmp_path / "hsu2024" / "quick"
    fig = json.loads((root / "figure2.json").read_text())
    assert len(fig["hit3_mean"]["contrastive"]) == 4  # before training + 3 epochs
    assert fig["verdict"] in ("yes", "partly", "no")
    # one panel / verdict per density of the quick preset; the sparser log has fewer pairs
    # and the same held-out pairs
    assert set(fig["by_density"]) == {"1", "0.3"}
    full, sparse = fig["by_density"]["1"], fig["by_density"]["0.3"]
    assert sparse["log"]["train_pairs"] == round(0.3 * full["log"]["train_pairs"])
    assert sparse["log"]["heldout_pairs"] == full["log"]["heldout_pairs"]
    assert sparse["verdict"] in ("yes", "partly", "no") and "at log densities" in fig["where"]
    assert (root / "pretrain" / "d0.3" / "bce-s0" / "summary.json").exists()
    assert "Log x0.3" in (root / "figure2.html").read_text()
    # Table 1 uses stage 1's export and records which point it holds (the last one here)
    meta = json.loads((root / "pretrain" / "contrastive-s0" / "embeddings" / "meta.json")
                      .read_text())
    assert meta["selected"]["metric"] == "last" and meta["selected"]["epoch"] == 3
    tab = json.loads((root / "table1.json").read_text())
    assert tab["stage1_selected"] == [meta["selected"]]
    tab = json.loads((root / "table1.json").read_text())
    assert set(tab["surfaces"]) == {"homefeed", "related"}
    for per in tab["surfaces"].values():
        assert set(per) == {"no_id", "random_id", "single_stage", "frozen", "finetune"}
        assert 0.0 <= per["frozen"][0]["best"]["hit3"] <= 1.0
    html = (root / "table1.html").read_text()
    assert "paper: Hit@3 lift vs baseline" in html and "Rule:" in html
    assert (root / "figure2.png").exists()
    # a second call reuses every cached run
    assert main(["reproduce", "hsu2024", "--table", "1", "--quick", "--seeds", "1",
                 "--out", str(tmp_path)]) == 0
    assert "seed 0:" not in capsys.readouterr().out
    assert main(["reproduce", "hsu2024", "--figure", "3", "--quick", "--out",
                 str(tmp_path)]) == 2
