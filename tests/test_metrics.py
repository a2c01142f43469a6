import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from oneepoch.metrics import auc, gauc, logloss


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 5000
    y = rng.integers(0, 2, n)
    s = np.round(rng.random(n) + 0.3 * y, 1)  # coarse scores: many ties
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    s32 = rng.random(n).astype(np.float32)
    assert auc(y, s32) == pytest.approx(roc_auc_score(y, s32), abs=1e-12)


def test_auc_edge_cases():
    assert auc([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.2]) == 1.0
    assert auc([1, 1, 0, 0], [0.1, 0.2, 0.9, 0.8]) == 0.0
    assert auc([1, 0], [0.5, 0.5]) == 0.5
    assert np.isnan(auc([1, 1], [0.1, 0.2]))


def test_gauc_hand_computed():
    # user a: 3 samples, AUC 0.5 (pos 0.4 vs negs 0.2, 0.6); user b: 4 samples, AUC 1.0;
    # user c: all negative -> excluded. GAUC = (3 * 0.5 + 4 * 1.0) / 7
    users = ["a", "a", "a", "b", "b", "b", "b", "c", "c"]
    labels = [1, 0, 0, 1, 1, 0, 0, 0, 0]
    scores = [0.4, 0.2, 0.6, 0.9, 0.8, 0.1, 0.3, 0.5, 0.7]
    assert gauc(labels, scores, users) == pytest.approx((3 * 0.5 + 4 * 1.0) / 7)


def test_gauc_ties_and_random_vs_per_user_sklearn():
    rng = np.random.default_rng(0)
    n = 3000
    g = rng.integers(0, 40, n)
    y = rng.integers(0, 2, n)
    s = np.round(rng.random(n), 1)
    num = den = 0.0
    for u in np.unique(g):
        m = g == u
        if 0 < y[m].sum() < m.sum():
            num += m.sum() * roc_auc_score(y[m], s[m])
            den += m.sum()
    assert gauc(y, s, g) == pytest.approx(num / den, abs=1e-12)


def test_logloss_matches_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 1000)
    p = rng.random(1000)
    assert logloss(y, p) == pytest.approx(log_loss(y, p), rel=1e-9)
