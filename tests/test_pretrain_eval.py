"""Full-catalogue Hit@K / Recall@K / NDCG@K against a brute-force computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from oneepoch.pretrain.evaluate import ranking_metrics


def brute_force(U, V, users, items, ks, tau, exclude_seen=False, tu=None, ti=None, start=0):
    """Loops over every pair and user: pessimistic ties, candidates = rows >= start."""
    S = (U @ V.T).numpy().astype(np.float64)
    n_items = V.shape[0]
    held = {}
    for u, i in zip(users, items, strict=True):
        held.setdefault(int(u), set()).add(int(i))
    seen = {}
    if exclude_seen:
        for u, i in zip(tu, ti, strict=True):
            seen.setdefault(int(u), set()).add(int(i))

    def candidates(u):
        return [j for j in range(start, n_items)
                if not (j in seen.get(u, set()) and j not in held[u])]

    out = {}
    for k in ks:
        hits = 0
        for u, i in zip(users, items, strict=True):
            s_pos = float((U[u] * V[i]).sum())
            rank = sum(1 for j in candidates(int(u)) if j != i and S[u, j] >= s_pos)
            hits += rank < k
        out[f"hit@{k}"] = hits / len(users)
    loss = 0.0
    for u, i in zip(users, items, strict=True):
        c = candidates(int(u))
        loss += math.log(sum(math.exp(S[u, j] / tau) for j in c)) - float((U[u] * V[i]).sum()) / tau
    out["full_loss"] = loss / len(users)
    for k in ks:
        rec, nd = [], []
        for u, h in held.items():
            c = candidates(u)
            top = sorted(c, key=lambda j: (-S[u, j], j in h))[:k]  # ties: held-out last
            rel = [1.0 if j in h else 0.0 for j in top]
            rec.append(sum(rel) / len(h))
            dcg = sum(r / math.log2(p + 2) for p, r in enumerate(rel))
            idcg = sum(1 / math.log2(p + 2) for p in range(min(k, len(h))))
            nd.append(dcg / idcg)
        out[f"recall@{k}"] = float(np.mean(rec))
        out[f"ndcg@{k}"] = float(np.mean(nd))
    return out


@pytest.mark.parametrize("exclude_seen", [False, True])
@pytest.mark.parametrize("start", [0, 1])
def test_ranking_metrics_match_brute_force(exclude_seen, start):
    g = torch.Generator().manual_seed(0)
    U = torch.randn(12, 4, generator=g, dtype=torch.float64)
    V = torch.randn(30, 4, generator=g, dtype=torch.float64)
    V[7] = V[3]  # an exact tie
    rng = np.random.default_rng(0)
    users = rng.integers(0, 12, 40)
    items = rng.integers(1, 30, 40)
    tu, ti = rng.integers(0, 12, 100), rng.integers(1, 30, 100)
    got = ranking_metrics(U, V, users, items, ks=[1, 3, 10], tau=0.5, batch_size=7,
                          exclude_seen=exclude_seen, train_user=tu, train_item=ti,
                          candidate_start=start)
    ref = brute_force(U, V, users, items, [1, 3, 10], 0.5, exclude_seen, tu, ti, start)
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k


def test_ties_count_against_the_positive():
    U = torch.ones(2, 2)
    V = torch.ones(5, 2)  # every item scores the same
    got = ranking_metrics(U, V, np.array([0, 1]), np.array([2, 4]), ks=[1, 4, 5])
    assert got["hit@1"] == 0.0 and got["hit@4"] == 0.0  # 4 other items tie -> rank 4
    assert got["hit@5"] == 1.0


def test_perfect_scores_give_full_hits():
    U, V = torch.eye(6), torch.eye(6)
    got = ranking_metrics(U, V, np.arange(6), np.arange(6), ks=[1])
    assert got["hit@1"] == 1.0 and got["recall@1"] == 1.0 and got["ndcg@1"] == 1.0
