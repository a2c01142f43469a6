"""The stage-1 model: a user ID table and an item ID table, score = dot product.

    >>> m = TwoTower(n_users=10, n_items=20, dim=8)
    >>> m.score(torch.tensor([1, 2]), torch.tensor([3, 4])).shape
    torch.Size([2])

Tables are looked up with sparse gradients so the row-wise optimizer of
:mod:`oneepoch.training.optim` updates only the batch's unique rows. The temperature is
``exp(log_tau)`` clamped to ``[tau_min, tau_max]`` (no gradient flows while clamped).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class TwoTower(nn.Module):
    """User and item ID embeddings (row 0 of each = out of vocabulary) and a temperature."""

    def __init__(self, n_users: int, n_items: int, dim: int = 64, init_std: float = 0.1,
                 normalize: bool = False, temperature: float = 0.1, learn_temperature: bool = True,
                 tau_min: float = 0.01, tau_max: float = 1.0) -> None:
        super().__init__()
        if not 0 < tau_min <= temperature <= tau_max:
            raise ValueError(f"loss.temperature: need 0 < tau_min ({tau_min}) <= temperature "
                             f"({temperature}) <= tau_max ({tau_max})")
        self.user_weight = nn.Parameter(torch.randn(n_users, dim) * init_std)
        self.item_weight = nn.Parameter(torch.randn(n_items, dim) * init_std)
        self.log_tau = nn.Parameter(torch.tensor(math.log(temperature)),
                                    requires_grad=learn_temperature)
        self.normalize = normalize
        self.log_tau_min, self.log_tau_max = math.log(tau_min), math.log(tau_max)

    @property
    def dim(self) -> int:
        return self.user_weight.shape[1]

    def tau(self) -> torch.Tensor:
        """The temperature (clamped; differentiable inside the bounds)."""
        return self.log_tau.clamp(self.log_tau_min, self.log_tau_max).exp()

    def users(self, rows: torch.Tensor) -> torch.Tensor:
        v = F.embedding(rows, self.user_weight, sparse=True)
        return F.normalize(v, dim=-1) if self.normalize else v

    def items(self, rows: torch.Tensor) -> torch.Tensor:
        v = F.embedding(rows, self.item_weight, sparse=True)
        return F.normalize(v, dim=-1) if self.normalize else v

    def score(self, user_rows: torch.Tensor, item_rows: torch.Tensor) -> torch.Tensor:
        """Dot products ``u . v`` of aligned user and item rows."""
        return (self.users(user_rows) * self.items(item_rows)).sum(-1)

    @torch.no_grad()
    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The user and item tables as used for scoring (normalised when configured)."""
        u, v = self.user_weight.detach(), self.item_weight.detach()
        if self.normalize:
            u, v = F.normalize(u, dim=-1), F.normalize(v, dim=-1)
        return u, v

    @torch.no_grad()
    def clamp_temperature(self) -> None:
        """Keep the parameter itself inside the bounds (so it cannot drift while clamped)."""
        self.log_tau.clamp_(self.log_tau_min, self.log_tau_max)

    def param_groups(self) -> Iterator[tuple[str, list[nn.Parameter]]]:
        """``embedding``: the two tables (row-wise updates); ``mlp``: the temperature."""
        yield "embedding", [self.user_weight, self.item_weight]
        yield "mlp", [self.log_tau] if self.log_tau.requires_grad else []
