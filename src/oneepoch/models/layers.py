"""Activations and the MLP tower of the Embedding & MLP model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from oneepoch import kernels


class _NativeDice(torch.autograd.Function):
    """Dice's forward and backward in one native pass each (see kernels/native.c)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: torch.Tensor, mean: torch.Tensor,
                var: torch.Tensor, stats: bool, eps: float):
        lib, (b, h) = kernels.lib(), x.shape
        if stats:
            mean, var = x.new_empty(h), x.new_empty(h)
        rstd, p, y = x.new_empty(h), torch.empty_like(x), torch.empty_like(x)
        lib.dice_forward(x.data_ptr(), alpha.data_ptr(), b, h, int(stats), eps, mean.data_ptr(),
                         var.data_ptr(), rstd.data_ptr(), p.data_ptr(), y.data_ptr())
        ctx.save_for_backward(x, p, alpha, mean, rstd)
        ctx.stats = stats
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy: torch.Tensor, *_):  # type: ignore[override]
        x, p, alpha, mean, rstd = ctx.saved_tensors
        b, h = x.shape
        dy = dy.contiguous()
        dx, dalpha, acc = torch.empty_like(x), alpha.new_empty(h), x.new_empty(2 * h)
        kernels.lib().dice_backward(x.data_ptr(), p.data_ptr(), dy.data_ptr(), alpha.data_ptr(),
                                    mean.data_ptr(), rstd.data_ptr(), b, h, int(ctx.stats),
                                    dx.data_ptr(), dalpha.data_ptr(), acc.data_ptr())
        return dx, dalpha, None, None, None, None


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
            if stats:  # as F.batch_norm: running variance is the unbiased one
                n = x.shape[0]
                with torch.no_grad():
                    self.running_mean.lerp_(mean, self.momentum)
                    self.running_var.lerp_(var * (n / (n - 1)), self.momentum)
            return y
        return self.reference(x)

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, fc in enumerate(self.fcs):
            if self.dropout > 0:
                x = F.dropout(x, self.dropout, self.training)
            x = fc(x)
            if i < len(self.acts):
                x = self.acts[i](x)
        return x.squeeze(-1)
