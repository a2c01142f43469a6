"""Full-catalogue ranking metrics for held-out engagements, exact and batched.

Every held-out pair (user, item) is ranked against **all** catalogue items (every item row of
the training vocabulary; the out-of-vocabulary row is not a candidate) by the dot product:

* **Ties** are pessimistic: ``rank = #{items j != item : s_j >= s_item}`` (0-based), so a
  constant model gets Hit@K = 0, not 1; in a user's top-K list (Recall, NDCG) held-out items
  come after other items of exactly the same score.
* **Seen items**: by default the user's training items stay candidates (engagement logs repeat,
  and the held-out item itself may occur in training). With ``exclude_seen=True`` the user's
  training items are removed from the candidates, except the held-out items being ranked.

Metrics: ``hit@K`` = share of held-out pairs with rank < K; ``recall@K`` = per user, the share
of the user's held-out items in the user's top K (``hits / |H_u|``), averaged over users;
``ndcg@K`` = per user, DCG of the top K with relevance 1 for held-out items over the ideal DCG
(``min(K, |H_u|)`` hits), averaged over users; ``full_loss`` = mean full-catalogue softmax
cross-entropy ``logsumexp_j(s_j / tau) - s_item / tau``.

    >>> u, v = torch.eye(3), torch.eye(3)
    >>> ranking_metrics(u, v, np.array([0, 1]), np.array([0, 2]), ks=[1])["hit@1"]
    0.5
"""

from __future__ import annotations

import math

import numpy as np
import torch

from oneepoch import kernels

SCORE_BLOCK = 1 << 25  # floats of user x item scores held at once (128 MiB)


def _seen_mask_keys(users: np.ndarray, train_user: np.ndarray, train_item: np.ndarray,
                    n_items: int) -> np.ndarray:
    """Sorted ``user * n_items + item`` keys of the training pairs of ``users``."""
    keys = np.unique(train_user.astype(np.int64) * n_items + train_item)
    sel = np.isin(keys // n_items, users)
    return keys[sel]


@torch.no_grad()
def ranking_metrics(user_table: torch.Tensor, item_table: torch.Tensor, users: np.ndarray,
                    items: np.ndarray, ks: list[int] | tuple[int, ...] = (3,),
                    tau: float = 1.0, batch_size: int = 1024, exclude_seen: bool = False,
                    train_user: np.ndarray | None = None, train_item: np.ndarray | None = None,
                    candidate_start: int = 0) -> dict[str, float]:
    """Hit@K, Recall@K, NDCG@K and full-catalogue loss of ``(users, items)`` pairs.

    Args:
        user_table, item_table: ``[n_users, d]`` and ``[n_items, d]``; ``users`` / ``items``
            index their rows.
        candidate_start: first item row that is a candidate (1 to leave out an OOV row 0).
        exclude_seen: drop each user's ``(train_user, train_item)`` items from its candidates.
        batch_size: users scored at once (fewer when ``batch_size x n_items`` would exceed
            ``SCORE_BLOCK`` floats, so memory stays bounded at 10^6+ items).
    """
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    n_items = item_table.shape[0]
    # a block of scores is batch x n_items floats: keep it near SCORE_BLOCK at large catalogues
    batch_size = max(1, min(batch_size, SCORE_BLOCK // max(n_items, 1)))
    ks = sorted(set(int(k) for k in ks))
    kmax = max(ks)
    if exclude_seen and (train_user is None or train_item is None):
        raise ValueError("ranking_metrics: exclude_seen needs train_user and train_item")
    held_keys = np.unique(users * n_items + items)
    seen_keys = (np.setdiff1d(_seen_mask_keys(np.unique(users), train_user, train_item, n_items),
                              held_keys, assume_unique=True)
                 if exclude_seen else np.zeros(0, dtype=np.int64))

    def user_pairs(keys: np.ndarray, urows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch row, item) of the sorted ``keys`` belonging to ``urows``."""
        lo = np.searchsorted(keys, urows * n_items)
        cnt = np.searchsorted(keys, (urows + 1) * n_items) - lo
        rr = np.repeat(np.arange(len(urows)), cnt)
        start = np.repeat(lo - np.concatenate([[0], np.cumsum(cnt)[:-1]]), cnt)
        idx = keys[start + np.arange(int(cnt.sum()))] % n_items
        return torch.from_numpy(rr), torch.from_numpy(idx)

    buf: list[torch.Tensor] = []  # one score block, reused (no fresh pages per batch)

    def masked_scores(urows: np.ndarray) -> torch.Tensor:
        u = user_table[torch.from_numpy(urows)]
        if not buf:
            buf.append(u.new_empty(batch_size, n_items))
        s = torch.mm(u, item_table.t(), out=buf[0][:len(urows)])
        if candidate_start:
            s[:, :candidate_start] = float("-inf")
        if len(seen_keys):
            s[user_pairs(seen_keys, urows)] = float("-inf")
        return s

    # One scoring pass per block of distinct users serves both levels: the pair level (rank of
    # each held-out item, full-catalogue loss) and the user level (top-K lists).
    uniq, n_held = np.unique(held_keys // n_items, return_counts=True)  # distinct items
    pair_user = np.searchsorted(uniq, users)  # every pair's user is in uniq
    pair_order = np.argsort(pair_user, kind="stable")
    bounds = np.searchsorted(pair_user[pair_order], np.arange(0, len(uniq) + batch_size,
                                                               batch_size))
    hits = {k: 0 for k in ks}
    loss_sum = 0.0
    rec = {k: 0.0 for k in ks}
    ndcg = {k: 0.0 for k in ks}
    disc = 1.0 / np.log2(np.arange(kmax) + 2.0)
    cdisc = np.cumsum(disc)
    for blk, a in enumerate(range(0, len(uniq), batch_size)):
        ub = uniq[a:a + batch_size]
        s = masked_scores(ub)
        # pair level, for the pairs of these users
        pidx = pair_order[bounds[blk]:bounds[blk + 1]]
        prow = torch.from_numpy(pair_user[pidx] - a)
        it = torch.from_numpy(items[pidx])
        s_pos = (user_table[torch.from_numpy(users[pidx])] * item_table[it]).sum(-1)
        if s.dtype == torch.float32 and kernels.usable(s, s_pos, it, prow):  # a pass per pair
            lse, rank = torch.empty(len(pidx)), torch.empty(len(pidx), dtype=torch.int64)
            kernels.rank_rows(s, len(pidx), prow, it, s_pos, 1.0 / tau, lse, rank)
        else:
            sp = s[prow]
            lse = torch.logsumexp(sp / tau, 1)  # the held-out item is always a candidate
            sp[torch.arange(len(pidx)), it] = float("-inf")
            rank = (sp >= s_pos.unsqueeze(1)).sum(1)
        loss_sum += float((lse - s_pos / tau).sum())
        for k in ks:
            hits[k] += int((rank < k).sum())
        # user level: top-K lists against the user's held-out items
        rr, idx = user_pairs(held_keys, ub)  # ties: held-out items after the others
        s[rr, idx] = torch.nextafter(s[rr, idx], torch.tensor(float("-inf"), dtype=s.dtype))
        top = kernels.topk_indices(s, kmax).numpy()
        rel = np.isin(ub[:, None] * n_items + top, held_keys).astype(np.float64)
        nh = n_held[a:a + batch_size]
        for k in ks:
            got = rel[:, :k]
            rec[k] += float((got.sum(1) / nh).sum())
            idcg = cdisc[np.minimum(k, nh) - 1]
            ndcg[k] += float(((got * disc[:k]).sum(1) / idcg).sum())
    out = {f"hit@{k}": hits[k] / max(len(users), 1) for k in ks}
    out["full_loss"] = loss_sum / max(len(users), 1)
    for k in ks:
        out[f"recall@{k}"] = rec[k] / max(len(uniq), 1)
        out[f"ndcg@{k}"] = ndcg[k] / max(len(uniq), 1)
    if not math.isfinite(out["full_loss"]):
        out["full_loss"] = float("nan")
    return out
