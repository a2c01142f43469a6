"""Stage-1 losses against direct hand computations on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from oneepoch.pretrain.losses import accidental_hits, bce_loss, contrastive_loss
from oneepoch.pretrain.model import TwoTower


def naive_contrastive(u, c, tau, pos_ids, cand_ids, logq=None, in_batch=True):
    """Paper B's Eq. (1) written out pair by pair with Python loops (the reference)."""
    n = u.shape[0]
    losses = []
    for i in range(n):
        terms = []
        pos_logit = None
        for j in range(c.shape[0]):
            z = (u[i] * c[j]).sum() / tau - (logq[j] if logq is not None else 0.0)
            if j == i:
                pos_logit = z
                terms.append(z)
            elif j < n and not in_batch:
                continue
            elif int(cand_ids[j]) == int(pos_ids[i]):
                continue  # accidental hit: masked
            else:
                terms.append(z)
        losses.append(torch.logsumexp(torch.stack(terms), 0) - pos_logit)
    return torch.stack(losses).mean()


def _case(seed=0, n=5, m=4, d=3):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, d, generator=g, dtype=torch.float64)
    c = torch.randn(n + m, d, generator=g, dtype=torch.float64)
    pos = torch.tensor([7, 3, 7, 1, 9])[:n]
    cand = torch.cat([pos, torch.tensor([3, 2, 7, 5])[:m]])  # 3 and 7 collide with positives
    return u, c, pos, cand


@pytest.mark.parametrize("in_batch", [True, False])
@pytest.mark.parametrize("use_logq", [False, True])
@pytest.mark.parametrize("chunk", [1, 2, 1024])
def test_contrastive_matches_naive_value_and_gradients(in_batch, use_logq, chunk):
    u, c, pos, cand = _case()
    logq = torch.log(torch.linspace(0.1, 2.0, c.shape[0], dtype=torch.float64)) if use_logq \
        else None
    log_tau = torch.tensor(math.log(0.7), dtype=torch.float64, requires_grad=True)
    u1, c1 = u.clone().requires_grad_(), c.clone().requires_grad_()
    fast = contrastive_loss(u1, c1, log_tau.exp(), pos, cand, logq, in_batch, chunk)
    fast.backward()
    g_fast = (u1.grad.clone(), c1.grad.clone(), log_tau.grad.clone())
    log_tau.grad = None
    u2, c2 = u.clone().requires_grad_(), c.clone().requires_grad_()
    ref = naive_contrastive(u2, c2, log_tau.exp(), pos, cand, logq, in_batch)
    ref.backward()
    assert float(fast.detach()) == pytest.approx(float(ref.detach()), rel=1e-10)
    torch.testing.assert_close(g_fast[0], u2.grad)
    torch.testing.assert_close(g_fast[1], c2.grad)
    torch.testing.assert_close(g_fast[2], log_tau.grad)  # the temperature's gradient


def test_accidental_hits_are_masked_by_hand():
    # row 0 (item 7): column 2 (in-batch 7) and column 7 (uniform 7) are accidental hits
    rows, cols = accidental_hits(torch.tensor([7, 3, 7, 1, 9]),
                                 torch.tensor([7, 3, 7, 1, 9, 3, 2, 7, 5]))
    got = sorted(zip(rows.tolist(), cols.tolist(), strict=True))
    assert got == [(0, 2), (0, 7), (1, 5), (2, 0), (2, 7)]


def test_tiny_case_by_hand():
    # one user, positive p, one in-batch duplicate (masked) and one uniform negative
    u = torch.tensor([[1.0, 0.0]])
    c = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    tau = torch.tensor(0.5)
    loss = contrastive_loss(u, c, tau, torch.tensor([4]), torch.tensor([4, 8]))
    expect = -math.log(math.exp(2 / 0.5) / (math.exp(2 / 0.5) + math.exp(0.0)))
    assert float(loss) == pytest.approx(expect, rel=1e-5)
    # the same item drawn as the uniform negative is an accidental hit: only the positive left
    loss_hit = contrastive_loss(u, c, tau, torch.tensor([4]), torch.tensor([4, 4]))
    assert float(loss_hit) == pytest.approx(0.0, abs=1e-7)


def test_no_grad_path_gives_same_value():
    u, c, pos, cand = _case(1)
    tau = torch.tensor(0.3, dtype=torch.float64)
    with torch.no_grad():
        a = contrastive_loss(u, c, tau, pos, cand)
    assert float(a) == pytest.approx(float(naive_contrastive(u, c, tau, pos, cand)), rel=1e-10)


def test_temperature_is_clamped_and_gets_no_gradient_outside_bounds():
    m = TwoTower(3, 4, dim=2, temperature=0.1, tau_min=0.05, tau_max=0.2)
    with torch.no_grad():
        m.log_tau.fill_(math.log(5.0))
    assert float(m.tau().detach()) == pytest.approx(0.2)
    m.tau().backward()
    assert float(m.log_tau.grad) == 0.0  # clamped: no gradient pushes it further out
    m.clamp_temperature()
    assert float(m.log_tau.detach()) == pytest.approx(math.log(0.2))
    with torch.no_grad():
        m.log_tau.fill_(math.log(0.1))
    m.log_tau.grad = None
    m.tau().backward()
    assert float(m.log_tau.grad) == pytest.approx(0.1)  # d exp(x)/dx inside the bounds
    with pytest.raises(ValueError, match="tau_min"):
        TwoTower(3, 4, dim=2, temperature=2.0, tau_min=0.01, tau_max=1.0)


def test_bce_loss_by_hand_with_accidental_hit():
    u = torch.tensor([[1.0, 1.0]])
    p = torch.tensor([[1.0, 0.0]])
    n = torch.tensor([[[0.0, 1.0], [2.0, 0.0]]])
    loss = bce_loss(u, p, n, torch.tensor([3]), torch.tensor([[5, 3]]))  # second = the positive
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    assert float(loss) == pytest.approx(sp(-1.0) + sp(1.0), rel=1e-6)


def test_second_backward_through_one_loss_is_refused_not_silently_wrong():
    u, c, pos, cand = _case(1)
    u.requires_grad_()
    loss = contrastive_loss(u, c, torch.tensor(0.3, dtype=torch.float64), pos, cand)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
