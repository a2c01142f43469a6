"""Activations and the MLP tower of the Embedding & MLP model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
