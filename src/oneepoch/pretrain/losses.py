"""Stage-1 losses: paper B's sampled softmax (contrastive) and BCE with random negatives.

Contrastive (paper B, Eq. 1), for each positive pair (u_i, p_i) of a batch::

    L_i = -log( exp(z_ii) / sum_j exp(z_ij) ),   z_ij = u_i . c_j / tau - logQ_j

over candidates c = [the batch's positives p_1..p_B, N uniform negatives]. A candidate whose
item equals p_i (an *accidental hit*: a popular item twice in the batch, or drawn as a uniform
negative) is masked out of row i, except p_i itself at column i. With ``in_batch=False`` all
other positives are masked, leaving the uniform negatives. ``logQ_j`` (optional) is the log of
the expected number of times item j is among the candidates, ``B q_j + N / n_items`` with q_j
its share of training engagements: the sampling-bias correction for popularity-sampled
in-batch negatives.

:func:`contrastive_loss` computes this in row blocks (logits, softmax and both gradient GEMMs
per block, never the full ``B x (B + N)`` matrix at once); the gradients of ``u``, ``c`` and the
temperature are formed during the forward pass (the loss is the end of the graph), so the
backward pass only rescales them. Accidental hits are found by a sorted join, not a dense
comparison.

    >>> u, c = torch.randn(4, 8), torch.randn(6, 8)
    >>> pos, cand = torch.tensor([1, 2, 1, 3]), torch.tensor([1, 2, 1, 3, 5, 2])
    >>> contrastive_loss(u, c, torch.tensor(0.5), pos, cand).shape
    torch.Size([])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from oneepoch import kernels


def accidental_hits(pos_ids: torch.Tensor, cand_ids: torch.Tensor, in_batch: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) pairs to mask: candidates equal to the row's positive, except itself.

    Found by a hash join (native kernels) or a sorted join (O(B + C + hits)), never a dense
    ``B x C`` comparison; rows come out sorted. With ``in_batch=False`` only columns past the B
    positives are listed (the caller masks the other positives as a block).
    """
    n = pos_ids.shape[0]
    pos_ids = pos_ids.contiguous()
    if pos_ids.dtype == cand_ids.dtype == torch.int64 and kernels.usable(pos_ids, cand_ids):
        cap = 2 * n + 64  # room for the usual few hits; called again if there are more
        for _ in range(2):
            hr = torch.empty(cap, dtype=torch.int64)
            hc = torch.empty(cap, dtype=torch.int64)
            k = kernels.accidental_hits(pos_ids, cand_ids, in_batch, hr, hc)
            if 0 <= k <= cap:
                return hr[:k], hc[:k]
            if k < 0:
                break
            cap = k
    sorted_ids, order = torch.sort(cand_ids)
    lo = torch.searchsorted(sorted_ids, pos_ids)
    hi = torch.searchsorted(sorted_ids, pos_ids, right=True)
    cnt = hi - lo
    rows = torch.repeat_interleave(torch.arange(n, device=pos_ids.device), cnt)
    start = torch.repeat_interleave(lo - (torch.cumsum(cnt, 0) - cnt), cnt)
    cols = order[start + torch.arange(rows.shape[0], device=pos_ids.device)]
    keep = cols != rows
    if not in_batch:
        keep &= cols >= n  # the positive block is masked whole by the caller
    return rows[keep], cols[keep]


def _native_blocks(u: torch.Tensor, c: torch.Tensor, inv_tau: float, logq: torch.Tensor | None,
                   hr: torch.Tensor, hc: torch.Tensor, hit_start: torch.Tensor, in_batch: bool,
                   chunk: int, gu: torch.Tensor | None, gc: torch.Tensor | None) -> float:
    """The block loop below in one native call (kernels/native.c contrastive_blocks): blocks
    run in parallel, one per thread, with the softmax, masking and logQ fused in one pass."""
    threads = torch.get_num_threads()
    buf = kernels.scratch(kernels.contrastive_scratch(chunk, c.shape[0], u.shape[1], threads))
    hr, hc = hr.contiguous(), hc.contiguous()
    hit_start = hit_start.to(torch.int64).contiguous()
    return kernels.contrastive_blocks(u, c, inv_tau, logq, hr, hc, hit_start, in_batch, chunk,
                                      gu, gc, buf, threads)


class _SampledSoftmax(torch.autograd.Function):
    """Loss and gradients in one blocked pass: the backward only rescales stored gradients."""

    @staticmethod
    def forward(ctx, u, c, tau, pos_ids, cand_ids, logq, in_batch, chunk, want_grad
                ):  # type: ignore[override]
        n = u.shape[0]
        inv_tau = float(1.0 / tau)
        hr, hc = accidental_hits(pos_ids, cand_ids, in_batch)
        hit_start = torch.searchsorted(hr, torch.arange(0, n + chunk, chunk, device=u.device))
        gu = torch.empty_like(u) if want_grad else None
        gc = torch.zeros_like(c) if want_grad else None
        total = 0.0
        native = u.dtype == torch.float32 and kernels.usable(u, c)
        q_ok = logq is None or (kernels.usable(logq) and logq.dtype == torch.float32)
        if native and q_ok and kernels.has_blas():
            total = _native_blocks(u, c, inv_tau, logq, hr, hc, hit_start, in_batch, chunk,
                                   gu, gc)
            if want_grad:
                ctx.save_for_backward(u, gu, gc, tau)
            return u.new_tensor(total / n)
        for k, a in enumerate(range(0, n, chunk)):
            b = min(a + chunk, n)
            r = torch.arange(b - a, device=u.device)
            z = torch.mm(u[a:b] * inv_tau, c.t())  # [b, C] logits
            if logq is not None:
                z.sub_(logq)
            h0, h1 = int(hit_start[k]), int(hit_start[k + 1])
            if h1 > h0:
                z[hr[h0:h1] - a, hc[h0:h1]] = float("-inf")
            zpos = z[r, r + a].clone()
            if not in_batch:
                z[:, :n] = float("-inf")
                z[r, r + a] = zpos
            if native:  # the same softmax / loss / gradient in one pass per row
                total += kernels.softmax_xent_rows(z, b - a, a, want_grad)
            else:
                m = z.amax(1, keepdim=True)
                z.sub_(m).exp_()
                ssum = z.sum(1, keepdim=True)
                total += float((ssum.log() + m).squeeze(1).sub(zpos).sum())
                if want_grad:
                    z.div_(ssum)  # softmax
                    z[r, r + a] -= 1.0  # dL_i/dz_ij (before the 1/n mean)
            if want_grad:
                torch.mm(z, c, out=gu[a:b])
                gc.addmm_(z.t(), u[a:b])
        if want_grad:
            ctx.save_for_backward(u, gu, gc, tau)
        return u.new_tensor(total / n)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        u, gu, gc, tau = ctx.saved_tensors
        n = u.shape[0]
        inv_tau = 1.0 / tau
        scale = (g / n * inv_tau).to(gu.dtype)  # dz/ds = 1 / tau
        # sum_ij dL/dz_ij * s_ij * -1/tau^2
        dtau = -(g / n) * inv_tau * inv_tau * torch.dot(u.reshape(-1), gu.reshape(-1))
        # gu, gc are this function's own buffers, never seen outside: scale them in place (a
        # second backward through the same loss then fails autograd's saved-version check)
        return gu.mul_(scale), gc.mul_(scale), dtau.reshape(tau.shape), None, None, None, None, \
            None, None


def contrastive_loss(u: torch.Tensor, c: torch.Tensor, tau: torch.Tensor, pos_ids: torch.Tensor,
                     cand_ids: torch.Tensor, logq: torch.Tensor | None = None,
                     in_batch: bool = True, chunk: int = 1024) -> torch.Tensor:
    """Mean sampled-softmax loss of paper B's Eq. (1) (see the module doc).

    Args:
        u: user vectors ``[B, d]``.
        c: candidate item vectors ``[B + N, d]``: row i < B is the positive of user i, the
            remaining N rows are extra (e.g. uniform) negatives.
        tau: temperature, a scalar tensor (may require grad).
        pos_ids: item IDs of the positives ``[B]`` (to find accidental hits).
        cand_ids: item IDs of the candidates ``[B + N]`` (``cand_ids[:B] == pos_ids``).
        logq: optional per-candidate correction ``[B + N]`` subtracted from the logits.
        in_batch: use the other positives of the batch as negatives.
        chunk: rows computed at once.
    """
    if c.shape[0] < u.shape[0] or cand_ids.shape[0] != c.shape[0]:
        raise ValueError("contrastive_loss: c must hold the B positives first, then negatives; "
                         f"got u {tuple(u.shape)}, c {tuple(c.shape)}, "
                         f"cand_ids {tuple(cand_ids.shape)}")
    want = torch.is_grad_enabled() and (u.requires_grad or c.requires_grad or tau.requires_grad)
    return _SampledSoftmax.apply(u, c, tau, pos_ids, cand_ids, logq, in_batch, max(1, chunk),
                                 want)


def bce_loss(u: torch.Tensor, p: torch.Tensor, n: torch.Tensor, pos_ids: torch.Tensor,
             neg_ids: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """BCE with random negatives: ``-log s(u.p) - sum_k log(1 - s(u.n_k))``, mean over pairs.

    Args:
        u, p: user and positive item vectors ``[B, d]``.
        n: negative item vectors ``[B, K, d]``; ``neg_ids [B, K]`` equal to ``pos_ids`` (accidental
            hits) are left out.
        scale: logits are ``scale x u.v`` (1 / tau for normalised vectors).
    """
    pos = (u * p).sum(-1) * scale
    neg = torch.einsum("bd,bkd->bk", u, n) * scale
    keep = (neg_ids != pos_ids.unsqueeze(1)).to(neg.dtype)
    return F.softplus(-pos).mean() + (F.softplus(neg) * keep).sum(1).mean()


def logq_correction(q_cand: torch.Tensor, in_batch: int, n_uniform: int, n_items: int
                    ) -> torch.Tensor:
    """log of each candidate's expected count among a step's negatives: ``in_batch``
    positives drawn by popularity ``q_cand`` plus ``n_uniform`` uniform draws over the
    ``n_items - 1`` real items (row 0 is out of vocabulary). Subtracted from the logits."""
    return torch.log(in_batch * q_cand + n_uniform / (n_items - 1))
