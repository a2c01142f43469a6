"""Optimizers: row-wise (lazy) updates for embedding tables, torch.optim for the MLP.

An embedding table's gradient is sparse (the batch's rows only). :class:`RowWiseOptimizer`
sums duplicate rows and applies Adam / RMSprop / SGD (momentum) / Adagrad to those rows only,
so a step's cost does not grow with the table. Like ``torch.optim.SparseAdam`` (and TF's
LazyAdam), the moment estimates of rows absent from a batch are not decayed; weight decay is
applied to the rows the batch touches. ``RowWiseOptimizer.row_lr`` (a vector over the table's
rows) multiplies the learning rate per row: remedies set it (pre-trained rows fine-tuned slowly,
or frozen at 0).

    >>> from oneepoch.config import OptimConfig
    >>> opt = build_optimizer(model, OptimConfig(name="adam", lr=1e-3))   # doctest: +SKIP
    >>> loss.backward(); opt.step(); opt.zero_grad()                       # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from oneepoch import kernels
from oneepoch.config import OptimConfig

OPTIMIZERS = ("adam", "rmsprop", "sgd", "adagrad")


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


class RowWiseOptimizer:
    """Row-wise optimizer for one embedding table with sparse gradients."""

    def __init__(self, param: nn.Parameter, cfg: OptimConfig, lr: float,
                 module: nn.Module | None = None) -> None:
        if cfg.name not in OPTIMIZERS:
            raise ValueError(f"optim.name: unknown optimizer {cfg.name!r} (choose {OPTIMIZERS})")
        self.param, self.cfg, self.lr = param, cfg, lr
        self.module = module
        if module is not None and hasattr(module, "fused"):
            module.fused = True
        self.step_count = 0
        self.state: dict[str, torch.Tensor] = {}
        z = lambda: torch.zeros_like(param, memory_format=torch.contiguous_format)  # noqa: E731
        if cfg.name == "adam":
            self.state = {"exp_avg": z(), "exp_avg_sq": z()}
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

    def _native_adam(self, rows: torch.Tensor, grad: torch.Tensor) -> bool:
        """The Adam update above in one native pass over the rows; False if not applicable."""
        w, m, v = self.param, self.state["exp_avg"], self.state["exp_avg_sq"]
        if not (w.dtype == grad.dtype == torch.float32 and rows.dtype == torch.int64
                and kernels.usable(w, m, v, rows, grad)):
            return False
        c = self.cfg
        scale = None
        if self.row_lr is not None:
            scale = self.row_lr.index_select(0, rows).to(torch.float32).contiguous()
        linf = kernels.rowwise_adam(w, m, v, rows, grad, self.lr, scale, c.beta1, c.beta2,
                                    c.eps, 1 - c.beta1 ** self.step_count,
                                    1 - c.beta2 ** self.step_count, c.weight_decay)
        self.last_update_linf = float(linf)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, **self.state}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step_count = int(sd["step_count"])
        for k in self.state:
            self.state[k].copy_(sd[k])


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

    def step(self) -> None:
        before = None
        if self.track_updates and self.dense is not None:
            before = [p.detach().clone() for p in self.dense_params]
        for opt in self.sparse.values():
            opt.track_updates = self.track_updates
            opt.step()
        if self.dense is not None:
            self.dense.step()
        if self.track_updates:
            out = {n: o.last_update_linf for n, o in self.sparse.items()}
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
