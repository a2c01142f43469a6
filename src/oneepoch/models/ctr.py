"""The two CTR models of paper A: Embedding & MLP (``dnn``) and logistic regression (``lr``).

    >>> from oneepoch.config import ModelConfig
    >>> m = build_model(ModelConfig(), {"item": 100}, ["item"], n_single=1)
    >>> [name for name, _ in m.param_groups()]
    ['embedding', 'mlp']
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from oneepoch.config import ModelConfig
from oneepoch.data.batcher import Batch
from oneepoch.models.embedding import FieldEmbedding
from oneepoch.models.layers import MLP


class EmbeddingMLP(nn.Module):
    """Per-field embeddings (mean-pooled sequences) -> concat -> MLP -> logit."""

    def __init__(self, embedding: FieldEmbedding, hidden: list[int], act: str = "dice",
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.embedding = embedding
        self.mlp = MLP(embedding.n_fields * embedding.dim, hidden, act, dropout)

    def embed(self, batch: Batch) -> torch.Tensor:
        """EMB(x): pooled embeddings ``[B, F, dim]``."""
        return self.embedding(batch)

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits ``[B]`` of the pooled field vectors ``[B, F, dim]`` (the part after the
        embedding; sharded tables look the vectors up elsewhere and call this)."""
        return self.mlp(pooled.reshape(pooled.shape[0], -1))

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.head(self.embedding(batch))

    def param_groups(self) -> Iterator[tuple[str, list[nn.Parameter]]]:
        yield "embedding", [self.embedding.weight]
        yield "mlp", list(self.mlp.parameters())


class LogisticRegression(nn.Module):
    """One weight per ID (mean over a sequence's IDs) summed over fields, plus a bias."""

    def __init__(self, embedding: FieldEmbedding) -> None:
        super().__init__()
        if embedding.dim != 1:
            raise ValueError("LogisticRegression needs a FieldEmbedding of dim 1")
        self.embedding = embedding
        self.bias = nn.Parameter(torch.zeros(1))

    def embed(self, batch: Batch) -> torch.Tensor:
        return self.embedding(batch)

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits ``[B]`` of the pooled field weights ``[B, F, 1]``."""
        return pooled.sum(dim=(1, 2)) + self.bias

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.head(self.embedding(batch))

    def param_groups(self) -> Iterator[tuple[str, list[nn.Parameter]]]:
        yield "embedding", [self.embedding.weight]
        yield "mlp", [self.bias]


def build_model(cfg: ModelConfig, vocab_sizes: dict[str, int], field_vocabs: list[str],
                n_single: int) -> EmbeddingMLP | LogisticRegression:
    """Build the model named by ``cfg.type`` for fields with the given vocabularies."""
    if cfg.type == "dnn":
        hidden = [max(1, round(h * cfg.width_mult)) for h in cfg.hidden]
        emb = FieldEmbedding(vocab_sizes, field_vocabs, n_single, cfg.emb_dim, cfg.emb_init_std)
        return EmbeddingMLP(emb, hidden, cfg.activation, cfg.dropout)
    if cfg.type == "lr":
        return LogisticRegression(FieldEmbedding(vocab_sizes, field_vocabs, n_single, 1, 0.0))
    raise ValueError(f"model.type: unknown model {cfg.type!r} (choose dnn or lr)")
