"""Optimizers: row-wise updates for embedding tables, torch.optim for the MLP.

An embedding table's gradient is sparse (the batch's rows only). :class:`RowWiseOptimizer`
sums duplicate rows and applies Adam / RMSprop / SGD (momentum) / Adagrad to those rows only,
so a step's cost does not grow with the table. Weight decay is applied to the rows the batch
touches. ``RowWiseOptimizer.row_lr`` (a vector over the table's rows) multiplies the learning
rate per row: remedies set it (pre-trained rows fine-tuned slowly, or frozen at 0).

Adam has two semantics (``optim.embedding_update``):

* ``dense`` (default): what TF1's ``AdamOptimizer`` and ``torch.optim.Adam`` on a dense
  ``nn.Embedding`` do: every row's moments decay at every step and every row moves by
  ``lr m / (sqrt(v) + eps)``, in the batch or not. At row-wise cost: a row keeps the step it was
  last brought up to date, and the zero-gradient steps it missed are applied in closed form when
  it is next touched (:class:`DenseAdamCatchUp`); :meth:`Optimizer.sync` brings every row up to
  date (before evaluation, checkpoints and exports).
* ``lazy``: like ``torch.optim.SparseAdam`` (and TF's LazyAdam), rows absent from a batch are
  neither decayed nor moved.

RMSprop, Adagrad and SGD with momentum are always lazy (as TF1's sparse updates are).

``optim.row_decay_alpha > 0`` (Adam only) adds AdamAR's per-row decoupled decay (Li & Lyu 2025):
a row that misses a step ``j`` steps after its last update is multiplied by
``1 - lr min(1, alpha j)``; a gap's decay is applied at once when the row is next touched or at
:meth:`Optimizer.sync` (:func:`row_decay`; rule and exactness in docs/training.md).

    >>> from oneepoch.config import OptimConfig
    >>> opt = build_optimizer(model, OptimConfig(name="adam", lr=1e-3))   # doctest: +SKIP
    >>> loss.backward(); opt.step(); opt.zero_grad()                       # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from oneepoch import kernels
from oneepoch.config import OptimConfig
from oneepoch.models.embedding import set_before_lookup

OPTIMIZERS = ("adam", "rmsprop", "sgd", "adagrad")
EMBEDDING_UPDATES = ("dense", "lazy")


def _log_ramp(c: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``sum_{j=1..M} log(1 - c j)`` elementwise (float64, ``c M < 1``): native.c's
    ``ar_log_ramp`` (a power series when ``c M <= 1e-3``, the sum itself for ``M <= 16``, else
    Stirling's series of ``lgamma(1/c) - lgamma(1/c - M)``, the last 8 factors directly when
    ``1/c - M < 8``)."""
    cm = c * M
    S1 = M * (M + 1) / 2
    S2 = S1 * (2 * M + 1) / 3
    S3, S4 = S1 * S1, S2 * (3 * M * M + 3 * M - 1) / 5
    series = -c * (S1 + c * (S2 / 2 + c * (S3 / 3 + c * S4 / 4)))
    direct = torch.zeros_like(c)
    for j in range(1, 17):
        direct += torch.where(M >= j, torch.log1p(-(c * j).clamp(max=1 - 1e-16)), 0.0)
    x = 1.0 / c.clamp(min=1e-300)
    near = x - M < 8
    head = torch.zeros_like(c)
    for i in range(8):
        head += torch.where(near, torch.log1p(-(c * (M - i)).clamp(min=0.0, max=1 - 1e-16)), 0.0)
    M2 = torch.where(near, M - 8, M)
    z = (x - M2).clamp(min=1.0)

    def g(y: torch.Tensor) -> torch.Tensor:
        i = 1.0 / y
        i2 = i * i
        return i * (1.0 / 12 - i2 * (1.0 / 360 - i2 * (1.0 / 1260 - i2 / 1680)))

    stirling = head - (z - 0.5) * torch.log1p(-M2 / x) - M2 + g(x) - g(z)
    out = torch.where(M <= 16, direct, stirling)
    out = torch.where(cm <= 1e-3, series, out)
    return torch.where(M > 0, out, torch.zeros_like(out))


def _log_decay(alpha: float, lr: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``log prod_{j=1..k} (1 - lr min(1, alpha j))`` (float64; ``0 < lr < 1``)."""
    kd = k.to(torch.float64)
    M = kd.clamp(max=float(math.floor(1.0 / alpha)))
    return _log_ramp(lr * alpha, M) + (kd - M) * torch.log1p(-lr)


def row_decay(alpha: float, lr: torch.Tensor, k: torch.Tensor,
              g0: torch.Tensor | None = None) -> torch.Tensor:
    """AdamAR's decay of steps ``j = g0 + 1 .. g0 + k`` of a row's gap (``g0``: the steps of
    the gap already applied, default 0), per row (float64 [n], ``lr`` [n] the row's learning
    rate): ``prod_j (1 - lr min(1, alpha j))``, in closed form (native.c ``ar_decay``); 1 where
    ``alpha``, ``lr`` or ``k`` is 0, 0 where ``lr >= 1``."""
    lr = lr.to(torch.float64)
    kd = k.to(torch.float64)
    if alpha <= 0:
        return torch.ones_like(kd)
    g = torch.zeros_like(k) if g0 is None else g0.to(k.dtype)
    live = (kd > 0) & (lr > 0) & (lr < 1)
    lr_s = torch.where(live, lr, torch.full_like(lr, 0.5))  # (the others: set below)
    P = torch.exp(_log_decay(alpha, lr_s, g + k) - _log_decay(alpha, lr_s, g))
    P = torch.where(live, P, torch.ones_like(P))
    return torch.where((lr >= 1) & (kd > 0), torch.zeros_like(P), P)


def _suffix_sums(a: np.ndarray, q: float, tail: float, block: int = 256) -> np.ndarray:
    """``H[i] = sum_{i' >= i} a[i'] q^(i' - i)`` for i < len(a), and ``H[len(a)] = tail`` (the
    sum of the continuation), by blocks (a reversed cumulative sum in each)."""
    n = len(a)
    H = np.empty(n + 1)
    H[n] = tail
    pw = q ** np.arange(block + 1, dtype=np.float64)
    for e in range(n, 0, -block):
        b = max(0, e - block)
        L = e - b
        cs = np.cumsum((a[b:e] * pw[:L])[::-1])[::-1]  # sum_{i' >= i} a[i'] q^(i' - b)
        H[b:e] = cs / pw[:L] + pw[L - np.arange(L)] * H[e]
    return H


class DenseAdamCatchUp:
    """Dense Adam's catch-up for rows a batch leaves out (the math is in native.c, above
    ``catch_up_row``; :meth:`apply` is its PyTorch twin).

    A row last brought up to date at step ``t0`` misses the zero-gradient steps
    ``i = t0 + 1 .. t0 + k``; torch.optim.Adam would decay its moments by ``beta1^k`` and
    ``beta2^k`` and move it by ``m0 F(sqrt(v0))``, ``F(x) = sum_j w_j / (x + e_j)`` with
    ``w_j = lr s_i / bc1_i r^j``, ``e_j = eps s_i beta2^(-j/2)``, ``s_i = sqrt(1 - beta2^i)``,
    ``r = beta1 / sqrt(beta2)``. The closed form ``W / (x + e~)`` (``W = sum w_j``, ``e~`` the
    w-weighted mean of ``e_j``) reads the window sums from suffix tables; its relative error is at
    most ``var / ((x + e_1)(x + e~))`` (var: the weighted variance of ``e_j``); elements where
    that exceeds :attr:`TOL` are summed step by step instead (until the remaining weight is
    below 1e-12 of W). Needs ``beta1 < beta2^1.5`` (every ratio below 1).

    With ``alpha > 0`` (AdamAR), the row is then multiplied by :func:`row_decay` of these
    steps of its gap; ``moves=False`` (lazy Adam with AdamAR) applies that decay only.
    """

    TOL = 1e-6  # relative error allowed to the closed form (else the exact sum)
    P = 4096  # exponents tabulated per ratio (exp() beyond)
    MAX_T = 1 << 20  # steps with tabulated bias corrections, at most

    def __init__(self, beta1: float, beta2: float, eps: float, alpha: float = 0.0,
                 moves: bool = True) -> None:
        self.alpha, self.moves = float(alpha), bool(moves)
        if not moves:  # the decay only: the Adam tables are unused (any valid betas)
            beta1, beta2 = 0.9, 0.999
        if not (0.0 <= beta1 < 1.0 and 0.0 < beta2 < 1.0 and beta1 < beta2 ** 1.5):
            raise ValueError(f"optim.embedding_update=dense needs 0 <= beta1 < beta2^1.5 < 1 "
                             f"(beta1={beta1}, beta2={beta2}); use embedding_update=lazy")
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        lo = math.log(1e-17)  # beyond T, 1 - beta^i is 1 in float64
        T = int(max(lo / math.log(beta2), lo / math.log(beta1) if beta1 > 0 else 1.0)) + 1
        T = min(T, self.MAX_T)
        i = np.arange(T + 1, dtype=np.float64)
        s = np.sqrt(1.0 - beta2 ** i)
        bc1 = 1.0 - beta1 ** i
        bc1[0] = 1.0  # (step 0 never starts a window)
        self.r, self.rho, self.rho2 = beta1 / beta2 ** 0.5, beta1 / beta2, beta1 / beta2 ** 1.5
        ratios = (beta1, beta2, self.r, self.rho, self.rho2)
        self.H = [_suffix_sums(s ** (p + 1) / bc1, q, 1.0 / (1.0 - q))
                  for p, q in enumerate(ratios[2:])]
        self.s = np.append(s, 1.0)
        self.T = T
        self.log_q = [math.log(q) if q > 0 else -math.inf for q in ratios]
        self.pw = np.stack([q ** np.arange(self.P, dtype=np.float64) for q in ratios])
        self.struct = kernels.catch_up_struct(beta1, beta2, eps, self.TOL, *self.H, self.s,
                                              self.pw, self.log_q, self.alpha, self.moves)
        self._t = [torch.from_numpy(a) for a in (*self.H, self.s)]

    def _pow(self, q: int, k: torch.Tensor) -> torch.Tensor:
        return torch.exp(k.to(torch.float64) * self.log_q[q])

    def _window(self, h: int, q: int, t0: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        H, T1 = self._t[h], self.T + 1
        qq = (self.r, self.rho, self.rho2)[h]
        return qq * (H[(t0 + 1).clamp(max=T1)] - self._pow(q, k) * H[(t0 + k + 1).clamp(max=T1)])

    @torch.no_grad()
    def apply(self, w: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t0: torch.Tensor,
              k: torch.Tensor, lr: torch.Tensor, g0: torch.Tensor | None = None) -> None:
        """Bring rows (w, m, v [n, D], in place) from steps ``t0`` [n] through ``k`` [n] >= 1
        zero-gradient steps each; lr [n]: each row's learning rate (float64); g0 [n]: AdamAR,
        the steps of each row's gap before ``t0`` (``t0`` - the step it was last in a batch)."""
        t0, k = t0.cpu(), k.cpu()
        P = None
        if self.alpha > 0:  # AdamAR: these steps' decay, after the moves
            P = row_decay(self.alpha, lr.cpu(), k, None if g0 is None else g0.cpu())
            P = P.to(torch.float32).to(w.device)[:, None]
        if not self.moves:
            if P is not None:
                w.mul_(P)
            return
        S0 = self._window(0, 2, t0, k)
        S1, S2 = self._window(1, 3, t0, k), self._window(2, 4, t0, k)
        lr = lr.cpu().to(torch.float64)
        live = (S0 > 0) & (lr != 0)
        S0s = torch.where(live, S0, torch.ones_like(S0))
        eb = self.eps * S1 / S0s
        var = (self.eps ** 2 * (S2 / S0s) - eb * eb).clamp(min=0)
        e1 = self.eps * self.s[np.minimum(t0.numpy() + 1, self.T + 1)] / math.sqrt(self.beta2)
        dev = w.device
        Wf = torch.where(live, lr * S0, torch.zeros_like(S0)).to(torch.float32).to(dev)
        ebf, e1f = eb.to(torch.float32).to(dev), torch.from_numpy(e1).to(torch.float32).to(dev)
        lim = (var / self.TOL).to(torch.float32).to(dev)
        x = v.sqrt()
        mv = m * Wf[:, None] / (x + ebf[:, None])
        exact = ((x + e1f[:, None]) * (x + ebf[:, None]) < lim[:, None]) & (m != 0) \
            & live.to(dev)[:, None]
        if bool(exact.any()):
            ri, di = exact.nonzero(as_tuple=True)
            f = self._exact(x[ri, di].double().cpu(), t0[ri.cpu()], k[ri.cpu()], S0[ri.cpu()])
            mv[ri, di] = (m[ri, di].double().cpu() * lr[ri.cpu()] * f).to(mv.dtype).to(dev)
        w.sub_(mv)
        if P is not None:
            w.mul_(P)
        m.mul_(self._pow(0, k).to(torch.float32).to(dev)[:, None])
        v.mul_(self._pow(1, k).to(torch.float32).to(dev)[:, None])

    def _exact(self, x: torch.Tensor, t0: torch.Tensor, k: torch.Tensor,
               S0: torch.Tensor, block: int = 128) -> torch.Tensor:
        """F(x) / lr summed step by step (native.c exact_catch_up), vectorised over elements
        and, by blocks of ``block`` steps, over steps; stops once the remaining weight is below
        1e-12 of S0 and adds it at the last e_j."""
        b1, b2 = self.beta1, self.beta2
        acc, wp = torch.zeros_like(x), torch.zeros_like(x)
        e = torch.full_like(x, self.eps)
        t0d = t0.to(torch.float64)[:, None]
        for j0 in range(1, int(k.max()) + 1, block):
            j = torch.arange(j0, min(j0 + block, int(k.max()) + 1), dtype=torch.float64)
            i = t0d + j  # [n, J] absolute steps
            si = (1.0 - b2 ** i).sqrt()
            wj = si / (1.0 - b1 ** i) * self.r ** j
            ej = self.eps * si * b2 ** (-j / 2)
            live = j[None, :] <= k.to(torch.float64)[:, None]
            acc += torch.where(live, wj / (x[:, None] + ej), 0.0).sum(1)
            wp += torch.where(live, wj, 0.0).sum(1)
            last = (k - j0).clamp(max=len(j) - 1, min=0)
            e = ej.gather(1, last[:, None]).squeeze(1)
            if bool(((S0 - wp <= 1e-12 * S0) | (k < j0 + block)).all()):
                break
        return acc + ((S0 - wp).clamp(min=0) / (x + e))


def coalesce_rows(idx: torch.Tensor, vals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique rows of (row, gradient) pairs and their summed gradients (native: a hash join,
    rows in order of first appearance; else sorted)."""
    if (idx.dtype == torch.int64 and vals.dtype == torch.float32 and vals.dim() == 2
            and kernels.usable(idx, vals)):
        rows = torch.empty_like(idx)
        summed = torch.empty_like(vals)
        u = kernels.coalesce_rows(idx, vals, rows, summed)
        if u >= 0:
            return rows[:u], summed[:u]
    rows, inv = torch.unique(idx, return_inverse=True)
    summed = torch.zeros(rows.shape[0], vals.shape[1], dtype=vals.dtype, device=vals.device)
    summed.index_add_(0, inv, vals)
    return rows, summed


def _row_grads(param: nn.Parameter, module: nn.Module | None
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """This step's (unique rows, summed gradient) of a table, from the fused leaves of
    ``module`` (see FieldEmbedding) and/or the parameter's own (sparse or dense) gradient."""
    parts = []
    if module is not None and getattr(module, "pending", None):
        parts = [(r, leaf.grad) for r, leaf in module.pending if leaf.grad is not None]
        module.pending = []
    g = param.grad
    if g is not None:
        if not g.is_sparse:
            g = g.to_sparse()
        if g.is_coalesced():
            parts.append((g._indices()[0], g._values()))
        else:
            parts.append((g._indices()[0].contiguous(), g._values().contiguous()))
            if len(parts) == 1:
                return coalesce_rows(*parts[0])
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return coalesce_rows(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))


_CATCH_UPS: dict[tuple[float, float, float, float, bool], DenseAdamCatchUp] = {}


def _catch_up_tables(beta1: float, beta2: float, eps: float, alpha: float = 0.0,
                     moves: bool = True) -> DenseAdamCatchUp:
    """The catch-up tables of these settings (built once per process)."""
    key = (beta1, beta2, eps, alpha, moves)
    if key not in _CATCH_UPS:
        _CATCH_UPS[key] = DenseAdamCatchUp(beta1, beta2, eps, alpha, moves)
    return _CATCH_UPS[key]


class RowWiseOptimizer:
    """Row-wise optimizer for one embedding table with sparse gradients.

    With Adam and ``cfg.embedding_update == "dense"``, or ``cfg.row_decay_alpha > 0``
    (AdamAR), ``state["last_step"]`` (int64 per row) holds the step each row was last brought
    up to date; :meth:`sync` brings them all to ``step_count``.
    """

    def __init__(self, param: nn.Parameter, cfg: OptimConfig, lr: float,
                 module: nn.Module | None = None) -> None:
        if cfg.name not in OPTIMIZERS:
            raise ValueError(f"optim.name: unknown optimizer {cfg.name!r} (choose {OPTIMIZERS})")
        mode = getattr(cfg, "embedding_update", "lazy")
        if mode not in EMBEDDING_UPDATES:
            raise ValueError(f"optim.embedding_update: unknown value {mode!r} "
                             f"(choose {EMBEDDING_UPDATES})")
        self.param, self.cfg, self.lr = param, cfg, lr
        self.dense_adam = cfg.name == "adam" and mode == "dense"
        self.row_decay_alpha = alpha = float(getattr(cfg, "row_decay_alpha", 0.0))
        if alpha < 0:
            raise ValueError(f"optim.row_decay_alpha: {alpha} (needs >= 0)")
        if alpha > 0 and cfg.name != "adam":
            raise ValueError(f"optim.row_decay_alpha (AdamAR) needs optim.name=adam, not "
                             f"{cfg.name!r}")
        if alpha > 0 and not lr < 1:
            raise ValueError(f"optim.row_decay_alpha (AdamAR) needs an embedding learning rate "
                             f"below 1 (optim.lr x optim.emb_lr_scale = {lr})")
        # rows keep the step they were last brought up to date (dense Adam, AdamAR)
        self.tracked = self.dense_adam or alpha > 0
        self.catch_up = _catch_up_tables(cfg.beta1, cfg.beta2, cfg.eps, alpha,
                                         self.dense_adam) if self.tracked else None
        self.cu_struct: kernels.AdamCatchUp | None = None  # the native twin (set below)
        self.module = module
        if module is not None and hasattr(module, "fused"):
            module.fused = True
        if self.tracked and module is not None and hasattr(module, "bag_inputs"):
            # the batch's rows are brought up to date before the forward reads them
            set_before_lookup(module, self.catch_up_batch)
        self.step_count = 0
        self.state: dict[str, torch.Tensor] = {}
        z = lambda: torch.zeros_like(param, memory_format=torch.contiguous_format)  # noqa: E731
        if cfg.name == "adam":
            self.state = {"exp_avg": z(), "exp_avg_sq": z()}
            if self.tracked:
                self.state["last_step"] = torch.zeros(param.shape[0], dtype=torch.int64,
                                                      device=param.device)
            if alpha > 0:  # AdamAR: the step each row was last in a batch (0: never), kept
                # up to date by sync() for the rows not updated since (last_step <= last_sync;
                # the others were last in a batch at last_step)
                self.state["last_touch"] = torch.zeros(param.shape[0], dtype=torch.int64,
                                                       device=param.device)
                self.state["last_sync"] = torch.zeros((), dtype=torch.int64)
        if self.catch_up is not None:
            touch = self.state.get("last_touch")
            self.cu_struct = self.catch_up.struct if touch is None else \
                kernels.catch_up_with_touch(self.catch_up.struct, touch,
                                            self.state["last_sync"])
        elif cfg.name in ("rmsprop", "adagrad"):
            self.state = {"square_avg": z()}
            if cfg.name == "rmsprop" and cfg.momentum > 0:
                self.state["momentum_buffer"] = z()
        elif cfg.name == "sgd" and cfg.momentum > 0:
            self.state = {"momentum_buffer": z()}
        # per-row learning-rate multipliers [R] (remedies set it: pre-trained rows fine-tuned
        # slowly or frozen at 0); None = 1 everywhere
        self.row_lr: torch.Tensor | None = None
        self.last_update_linf = 0.0
        self.track_updates = False

    @torch.no_grad()
    def step(self) -> None:
        got = _row_grads(self.param, self.module)
        if got is None:
            return
        self.step_count += 1
        rows, grad = got
        if rows.numel() == 0:
            return
        c, w = self.cfg, self.param
        if c.name == "adam" and self._native_adam(rows, grad):
            return
        if self.tracked:  # the steps these rows missed, then this one
            last = self.state["last_step"]
            self._catch_up(rows, last.index_select(0, rows), self.step_count - 1)
            last.index_fill_(0, rows, self.step_count)
        w_r = w.index_select(0, rows)
        if c.weight_decay:
            grad = grad + c.weight_decay * w_r
        lr: float | torch.Tensor = self.lr
        if self.row_lr is not None:
            lr = self.lr * self.row_lr.index_select(0, rows).unsqueeze(1)
        if c.name == "adam":
            m, v = self.state["exp_avg"], self.state["exp_avg_sq"]
            m_r = m.index_select(0, rows).mul_(c.beta1).add_(grad, alpha=1 - c.beta1)
            v_r = v.index_select(0, rows).mul_(c.beta2).addcmul_(grad, grad, value=1 - c.beta2)
            m.index_copy_(0, rows, m_r)
            v.index_copy_(0, rows, v_r)
            bc1 = 1 - c.beta1 ** self.step_count
            bc2 = 1 - c.beta2 ** self.step_count
            delta = (m_r / bc1).div_((v_r / bc2).sqrt_().add_(c.eps)).mul_(lr)
        elif c.name == "rmsprop":
            sq = self.state["square_avg"]
            s_r = sq.index_select(0, rows).mul_(0.99).addcmul_(grad, grad, value=0.01)
            sq.index_copy_(0, rows, s_r)
            delta = grad / s_r.sqrt().add_(c.eps)
            if c.momentum > 0:
                buf = self.state["momentum_buffer"]
                b_r = buf.index_select(0, rows).mul_(c.momentum).add_(delta)
                buf.index_copy_(0, rows, b_r)
                delta = b_r
            delta = delta * lr
        elif c.name == "adagrad":
            sq = self.state["square_avg"]
            s_r = sq.index_select(0, rows).addcmul_(grad, grad)
            sq.index_copy_(0, rows, s_r)
            delta = grad / s_r.sqrt().add_(1e-10) * lr
        else:  # sgd
            delta = grad
            if c.momentum > 0:
                buf = self.state["momentum_buffer"]
                b_r = buf.index_select(0, rows).mul_(c.momentum).add_(grad)
                buf.index_copy_(0, rows, b_r)
                delta = b_r
            delta = delta * lr
        w.index_copy_(0, rows, w_r.sub_(delta))
        if self.track_updates:
            self.last_update_linf = float(delta.abs().max())

    def _catch_up(self, rows: torch.Tensor, t0: torch.Tensor, t: int) -> None:
        """Dense Adam: bring these distinct rows (last brought up to date at steps ``t0``) to
        step ``t`` (the PyTorch twin of the native catch-up)."""
        behind = t0 < t
        if not bool(behind.any()):
            return
        rows, t0 = rows[behind], t0[behind]
        w, m, v = self.param, self.state["exp_avg"], self.state["exp_avg_sq"]
        w_r, m_r, v_r = (x.detach().index_select(0, rows) for x in (w, m, v))
        lr = torch.full((rows.shape[0],), float(self.lr), dtype=torch.float64)
        if self.row_lr is not None:
            lr = lr * self.row_lr.index_select(0, rows).double().cpu()
        g0 = None
        if "last_touch" in self.state:  # the gap began at t0 unless a sync set t0
            g0 = torch.where(t0 > self.state["last_sync"], torch.zeros_like(t0),
                             t0 - self.state["last_touch"].index_select(0, rows))
        self.catch_up.apply(w_r, m_r, v_r, t0, t - t0, lr, g0)  # type: ignore[union-attr]
        for x, x_r in ((w, w_r), (m, m_r), (v, v_r)):
            x.detach().index_copy_(0, rows, x_r)

    @torch.no_grad()
    def catch_up_batch(self, batch: Any) -> None:
        """Dense Adam / AdamAR: bring the rows this batch looks up to the previous step, before the
        forward reads them (so the gradient is taken where torch.optim.Adam's table is)."""
        w, m, v = self.param, self.state["exp_avg"], self.state["exp_avg_sq"]
        last, t, mod = self.state["last_step"], self.step_count, self.module
        scale = None if self.row_lr is None else self.row_lr.to(torch.float32).contiguous()
        if w.dtype == torch.float32 and kernels.usable(w, m, v, last, batch.ids) and (
                scale is None or kernels.usable(scale)):
            kernels.adam_catch_up_batch(
                kernels.ids32(batch.ids), mod.field_offsets, mod.field_rows,  # type: ignore
                [kernels.ids32(q) for q in batch.seqs], [kernels.ids32(n) for n in batch.lens],
                w, m, v, last, t, self.lr, scale, self.cu_struct)
            return
        flat, _ = mod.bag_inputs(batch)  # type: ignore[union-attr]
        rows = torch.unique(flat)
        t0 = last.index_select(0, rows)
        self._catch_up(rows, t0, t)
        last.index_fill_(0, rows[t0 < t], t)

    @torch.no_grad()
    def sync(self) -> int:
        """Dense Adam: bring every row to ``step_count`` (the moment decay and movement of
        the steps each missed), so the table is what torch.optim.Adam would hold; AdamAR: the
        decay of the steps each row missed. Returns the rows moved (0 for lazy updates without
        AdamAR and other optimizers)."""
        if not self.tracked:
            return 0
        w, m, v = self.param, self.state["exp_avg"], self.state["exp_avg_sq"]
        last, t = self.state["last_step"], self.step_count
        synced = self.state.get("last_sync")
        scale = None if self.row_lr is None else self.row_lr.to(torch.float32).contiguous()
        if w.dtype == torch.float32 and kernels.usable(w, m, v, last) and (
                scale is None or kernels.usable(scale)):
            n = kernels.adam_catch_up_all(w, m, v, last, t, self.lr, scale,
                                          self.cu_struct)  # type: ignore[arg-type]
            if synced is not None:
                synced.fill_(t)
            return n
        if synced is not None:  # AdamAR: rows updated since the last sync were in a batch then
            touch = self.state["last_touch"]
            fresh = last > synced
            touch[fresh] = last[fresh]
        rows = (last < t).nonzero().squeeze(1)
        for a in range(0, rows.shape[0], 1 << 16):  # bounded memory
            r = rows[a:a + (1 << 16)]
            self._catch_up(r, last.index_select(0, r), t)
        last.fill_(t)
        if synced is not None:
            synced.fill_(t)
        return int(rows.shape[0])

    def _native_adam(self, rows: torch.Tensor, grad: torch.Tensor) -> bool:
        """The Adam update above in one native pass over the rows; False if not applicable."""
        w, m, v = self.param, self.state["exp_avg"], self.state["exp_avg_sq"]
        last = self.state.get("last_step")
        if not (w.dtype == grad.dtype == torch.float32 and rows.dtype == torch.int64
                and kernels.usable(w, m, v, rows, grad)
                and (last is None or kernels.usable(last))):
            return False
        c = self.cfg
        scale = None
        if self.row_lr is not None:
            scale = self.row_lr.index_select(0, rows).to(torch.float32).contiguous()
        linf = kernels.rowwise_adam(w, m, v, rows, grad, self.lr, scale, c.beta1, c.beta2,
                                    c.eps, 1 - c.beta1 ** self.step_count,
                                    1 - c.beta2 ** self.step_count, c.weight_decay,
                                    last, self.step_count, self.cu_struct)
        self.last_update_linf = float(linf)
        return True

    def state_dict(self) -> dict[str, Any]:
        """The step count and every state tensor (with dense Adam, each row's last step too,
        so a resumed run continues bitwise as the uninterrupted one; no sync is implied)."""
        return {"step_count": self.step_count, **self.state}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step_count = int(sd["step_count"])
        for k in self.state:
            if k == "last_step" and k not in sd:  # saved without: every row current
                self.state[k].fill_(self.step_count)
            elif k in ("last_touch", "last_sync") and k not in sd:  # saved without AdamAR:
                continue  # each row's gap starts where it was last brought up to date (below)
            else:
                self.state[k].copy_(sd[k])
        if "last_touch" in self.state and "last_touch" not in sd:
            self.state["last_touch"].copy_(self.state["last_step"])
            self.state["last_sync"].fill_(self.step_count)


class Optimizer:
    """Row-wise updates for embedding tables + a torch optimizer for the dense parameters.

    Parameters with ``requires_grad=False`` (frozen) are skipped. With ``track_updates``, each
    step records the l-inf norm of the update actually applied to every parameter
    (``last_update_linf``), the quantity of paper A's Fig. 16.
    """

    def __init__(self, model: nn.Module, cfg: OptimConfig) -> None:
        self.cfg = cfg
        self.model = model
        self.sparse: dict[str, RowWiseOptimizer] = {}
        dense: list[nn.Parameter] = []
        self.names = {p: n for n, p in model.named_parameters()}
        owners = {id(m.weight): m for m in model.modules() if hasattr(m, "fused")}
        for group, params in model.param_groups():  # type: ignore[operator]
            for p in params:
                if group == "embedding":
                    self.sparse[self.names[p]] = RowWiseOptimizer(
                        p, cfg, cfg.lr * cfg.emb_lr_scale, owners.get(id(p)))
                else:
                    dense.append(p)
        self.dense_params = dense
        self.dense = _torch_optimizer(dense, cfg) if dense else None
        self.track_updates = False
        self.last_update_linf: dict[str, float] = {}

    def zero_grad(self) -> None:
        for p in self.model.parameters():
            p.grad = None

    def sync(self) -> None:
        """Bring every embedding row up to the current step (dense Adam applies the steps a
        row missed when it is next touched). Call before evaluation, checkpoints and exports;
        a no-op for lazy updates."""
        for opt in self.sparse.values():
            opt.sync()

    def step(self) -> None:
        before = None
        if self.track_updates and self.dense is not None:
            before = [p.detach().clone() for p in self.dense_params]
        # dense Adam while tracking: every row is brought up to date after each step, so the
        # norm is of the whole table's change in this step (what TF1 / torch.optim.Adam move;
        # O(table) per step, for probe runs only)
        tables = {n: o.param.detach().clone() for n, o in self.sparse.items()
                  if self.track_updates and o.tracked}
        for opt in self.sparse.values():
            opt.track_updates = self.track_updates
            opt.step()
        if self.dense is not None:
            self.dense.step()
        if self.track_updates:
            out = {n: o.last_update_linf for n, o in self.sparse.items()}
            for n, b in tables.items():
                self.sparse[n].sync()
                out[n] = float((self.sparse[n].param.detach() - b).abs().max())
            if before is not None:
                for p, b in zip(self.dense_params, before, strict=True):
                    out[self.names[p]] = float((p.detach() - b).abs().max())
            self.last_update_linf = out

    def state_dict(self) -> dict[str, Any]:
        return {"sparse": {n: o.state_dict() for n, o in self.sparse.items()},
                "dense": self.dense.state_dict() if self.dense is not None else {}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for n, o in self.sparse.items():
            o.load_state_dict(sd["sparse"][n])
        if self.dense is not None and sd.get("dense"):
            self.dense.load_state_dict(sd["dense"])


def _torch_optimizer(params: list[nn.Parameter], c: OptimConfig) -> torch.optim.Optimizer:
    if c.name == "adam":  # the fused kernel: same update, one pass over all parameters
        return torch.optim.Adam(params, lr=c.lr, betas=(c.beta1, c.beta2), eps=c.eps,
                                weight_decay=c.weight_decay, fused=True)
    if c.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=c.lr, alpha=0.99, eps=c.eps,
                                   weight_decay=c.weight_decay, momentum=c.momentum)
    if c.name == "sgd":
        return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
    if c.name == "adagrad":
        return torch.optim.Adagrad(params, lr=c.lr, weight_decay=c.weight_decay)
    raise ValueError(f"optim.name: unknown optimizer {c.name!r} (choose {OPTIMIZERS})")


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> Optimizer:
    """The optimizer for a model exposing ``param_groups()`` (see :mod:`oneepoch.models`)."""
    return Optimizer(model, cfg)
