"""Activations and the MLP tower of the Embedding & MLP model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from oneepoch import kernels


def _dice_fwd(x: torch.Tensor, alpha: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
              stats: bool, eps: float) -> tuple[torch.Tensor, ...]:
    """Native Dice forward: ``y, p, mean, var, rstd`` (batch statistics when ``stats``)."""
    b, h = x.shape
    if stats:
        mean, var = x.new_empty(h), x.new_empty(h)
    rstd, p, y = x.new_empty(h), torch.empty_like(x), torch.empty_like(x)
    kernels.dice_forward(x, alpha, stats, eps, mean, var, rstd, p, y)
    return y, p, mean, var, rstd


def _dice_bwd(x: torch.Tensor, p: torch.Tensor, dy: torch.Tensor, alpha: torch.Tensor,
              mean: torch.Tensor, rstd: torch.Tensor, stats: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Native Dice backward: ``dx, dalpha``."""
    b, h = x.shape
    dy = dy.contiguous()
    dx, dalpha, acc = torch.empty_like(x), alpha.new_empty(h), x.new_empty(2 * h)
    kernels.dice_backward(x, p, dy, alpha, mean, rstd, stats, dx, dalpha, acc)
    return dx, dalpha


class _NativeDice(torch.autograd.Function):
    """Dice's forward and backward in one native pass each (see kernels/native.c)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: torch.Tensor, mean: torch.Tensor,
                var: torch.Tensor, stats: bool, eps: float):
        y, p, mean, var, rstd = _dice_fwd(x, alpha, mean, var, stats, eps)
        ctx.save_for_backward(x, p, alpha, mean, rstd)
        ctx.stats = stats
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy: torch.Tensor, *_):  # type: ignore[override]
        x, p, alpha, mean, rstd = ctx.saved_tensors
        dx, dalpha = _dice_bwd(x, p, dy, alpha, mean, rstd, ctx.stats)
        return dx, dalpha, None, None, None, None


class _FusedDiceMLP(torch.autograd.Function):
    """``Linear -> Dice -> ... -> Linear`` as one autograd node: GEMMs plus native Dice passes
    forward, the same by hand backward (no per-layer graph nodes or gradient accumulators)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mlp: MLP, stats: bool, *params: torch.Tensor):
        h, saved = x, []
        for i, fc in enumerate(mlp.fcs):
            z = torch.addmm(fc.bias, h, fc.weight.t())
            if i < len(mlp.acts):
                d: Dice = mlp.acts[i]  # type: ignore[assignment]
                y, p, mean, var, rstd = _dice_fwd(z, d.alpha, d.running_mean, d.running_var,
                                                  stats, d.eps)
                if stats:
                    d.update_running(mean, var, z.shape[0])
                saved += [h, z, p, mean, rstd]
                h = y
            else:
                saved.append(h)
        ctx.save_for_backward(*saved)
        ctx.mlp, ctx.stats = mlp, stats
        return z.squeeze(-1)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        mlp, saved = ctx.mlp, ctx.saved_tensors
        n = len(mlp.acts)
        grads: list[torch.Tensor | None] = []
        gz = g.unsqueeze(-1)
        fc = mlp.fcs[n]
        h = saved[-1]
        grads = [gz.t().mm(h), gz.sum(0)]  # last layer: weight, bias
        gh = gz.mm(fc.weight)
        for i in range(n - 1, -1, -1):
            h, z, p, mean, rstd = saved[5 * i:5 * i + 5]
            d, fc = mlp.acts[i], mlp.fcs[i]
            gz, galpha = _dice_bwd(z, p, gh, d.alpha, mean, rstd, ctx.stats)
            grads = [gz.t().mm(h), gz.sum(0), galpha] + grads
            gh = gz.mm(fc.weight) if i > 0 or ctx.needs_input_grad[0] else None
        return (gh, None, None, *grads)


class Dice(nn.Module):
    """DIN's Dice: ``p * x + (1 - p) * alpha * x`` with ``p = sigmoid(BN(x))``.

    BN has no affine of its own and a tiny eps; ``alpha`` is learned per unit.

        >>> Dice(4)(torch.randn(8, 4)).shape
        torch.Size([8, 4])
    """

    def __init__(self, n: int, eps: float = 1e-8, momentum: float = 0.1) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))
        self.eps, self.momentum = eps, momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and kernels.usable(x, self.alpha) and x.dtype == torch.float32:
            stats = self.training and x.shape[0] > 1
            y, mean, var = _NativeDice.apply(x.contiguous(), self.alpha, self.running_mean,
                                             self.running_var, stats, self.eps)
            if stats:
                self.update_running(mean, var, x.shape[0])
            return y
        return self.reference(x)

    @torch.no_grad()
    def update_running(self, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        """Fold a batch's statistics into the running ones (as F.batch_norm: the running
        variance is the unbiased one)."""
        self.running_mean.lerp_(mean, self.momentum)
        self.running_var.lerp_(var * (n / (n - 1)), self.momentum)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The plain PyTorch path (any device and dtype); the native kernel's twin."""
        xn = F.batch_norm(x, self.running_mean, self.running_var, None, None,
                          self.training and x.shape[0] > 1, self.momentum, self.eps)
        p = torch.sigmoid(xn)
        return x * (p + (1 - p) * self.alpha)


def activation(name: str, n: int) -> nn.Module:
    """``dice`` | ``prelu`` | ``relu`` | ``sigmoid``, for a layer of ``n`` units."""
    if name == "dice":
        return Dice(n)
    if name == "prelu":
        return nn.PReLU(n, init=0.25)
    if name == "relu":
        return nn.ReLU()
    if name == "sigmoid":
        return nn.Sigmoid()
    raise ValueError(f"model.activation: unknown activation {name!r} "
                     "(choose dice, prelu, relu, sigmoid)")


class MLP(nn.Module):
    """FC layers ``in -> hidden... -> 1`` with an activation after each hidden layer and
    optional dropout before each FC layer. Returns logits ``[B]``."""

    def __init__(self, d_in: int, hidden: list[int], act: str = "dice", dropout: float = 0.0
                 ) -> None:
        super().__init__()
        self.fcs = nn.ModuleList()
        self.acts = nn.ModuleList()
        d = d_in
        for h in hidden:
            self.fcs.append(nn.Linear(d, h))
            self.acts.append(activation(act, h))
            d = h
        self.fcs.append(nn.Linear(d, 1))
        self.dropout = dropout
        self.fuse = True  # use _FusedDiceMLP where it applies

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fusable(x):  # same numbers, one graph node (see _FusedDiceMLP)
            stats = self.training and x.shape[0] > 1
            return _FusedDiceMLP.apply(x.contiguous(), self, stats, *self._ordered_params())
        return self.reference(x)

    def _fusable(self, x: torch.Tensor) -> bool:
        return (self.fuse and self.dropout == 0 and x.dim() == 2 and x.dtype == torch.float32
                and all(isinstance(a, Dice) for a in self.acts)
                and kernels.usable(x, *self.parameters()))

    def _ordered_params(self) -> list[nn.Parameter]:
        """Weights, biases and Dice alphas in the order _FusedDiceMLP returns their grads."""
        out: list[nn.Parameter] = []
        for i, fc in enumerate(self.fcs):
            out += [fc.weight, fc.bias]
            if i < len(self.acts):
                out.append(self.acts[i].alpha)  # type: ignore[arg-type]
        return out

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Layer by layer through autograd (any activation, dropout, device)."""
        for i, fc in enumerate(self.fcs):
            if self.dropout > 0:
                x = F.dropout(x, self.dropout, self.training)
            x = fc(x)
            if i < len(self.acts):
                x = self.acts[i](x)
        return x.squeeze(-1)
