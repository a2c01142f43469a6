import numpy as np

from oneepoch.analysis import one_epoch_verdict


def curve(drop_at_2: float, n: int = 20, epochs: int = 3):
    ep = np.arange(0, epochs * n + 1) / n
    a = 0.6 + 0.1 * np.minimum(ep, 1.0)  # climbs through epoch 1
    a = np.where(ep > 1, a - drop_at_2 * np.minimum((ep - 1) * n, 1), a)
    return ep, a


def test_verdict_detects_drop():
    ep, a = curve(0.02)
    v = one_epoch_verdict(ep, a)
    assert v.phenomenon and v.at_epoch == 2
    assert abs(v.drop - 0.02) < 1e-9
    assert v.best_epoch == 1.0 and abs(v.best_auc - 0.7) < 1e-12
    assert "yes (drop 0.020 at epoch 2" in v.line()


def test_verdict_no_drop_on_rising_or_flat_curve():
    ep, a = curve(0.0)
    v = one_epoch_verdict(ep, a)
    assert not v.phenomenon and v.line().startswith("one-epoch phenomenon: no")
    ep = np.arange(0, 61) / 20
    v = one_epoch_verdict(ep, 0.6 + 0.01 * ep)
    assert not v.phenomenon and v.drop < 0


def test_verdict_small_drop_below_threshold_and_custom_threshold():
    ep, a = curve(0.003)
    assert not one_epoch_verdict(ep, a).phenomenon
    assert one_epoch_verdict(ep, a, min_drop=0.002).phenomenon


def test_verdict_drop_outside_window_is_not_counted():
    ep = np.arange(0, 61) / 20
    a = np.where(ep < 1.5, 0.7, 0.6)  # falls only at 1.5, long after the boundary
    assert not one_epoch_verdict(ep, a).phenomenon


def test_verdict_single_epoch_is_unknown():
    v = one_epoch_verdict([0.5, 1.0], [0.6, 0.7])
    assert not v.boundaries and "unknown" in v.line()


def test_verdict_says_when_evaluation_is_too_sparse():
    v = one_epoch_verdict([0, 0.5, 1.0, 1.5, 2.0], [0.5, 0.6, 0.7, 0.6, 0.6])
    assert "evaluate more often" in v.line()


def test_verdict_window_allows_step_rounding():
    # 629 steps per epoch, 10 evaluations: the first point of epoch 2 is at 1 + 63/629 = 1.1002
    ep = [0.5, 1.0, 1 + 63 / 629, 1.2, 2.0]
    v = one_epoch_verdict(ep, [0.6, 0.7, 0.69, 0.69, 0.69])
    assert v.boundaries and abs(v.drop - 0.01) < 1e-12
