"""Stage 1 of paper B ("Tame"): contrastive pre-training of user and item ID embeddings on
engagement logs, with full-catalogue evaluation and an export that downstream models load.

    >>> from oneepoch.config import load_config
    >>> from oneepoch.pretrain import PretrainConfig, pretrain
    >>> res = pretrain(load_config(PretrainConfig, "pretrain", ["data.path=DIR"]))  # doctest: +SKIP

Modules: :mod:`~oneepoch.pretrain.config` (settings), :mod:`~oneepoch.pretrain.data`
(engagement loader), :mod:`~oneepoch.pretrain.model` (the two tables),
:mod:`~oneepoch.pretrain.losses` (contrastive and BCE), :mod:`~oneepoch.pretrain.evaluate`
(full-catalogue Hit/Recall/NDCG), :mod:`~oneepoch.pretrain.train` (the loop and export).
"""

from oneepoch.pretrain.config import PretrainConfig
from oneepoch.pretrain.train import PretrainResult, pretrain

__all__ = ["PretrainConfig", "PretrainResult", "pretrain"]
