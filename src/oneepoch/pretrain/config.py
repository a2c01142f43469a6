"""Settings of stage-1 pre-training (``oneepoch pretrain``), filled like every other config.

    >>> from oneepoch.config import load_config
    >>> cfg = load_config(PretrainConfig, None, ["loss.type=bce", "model.dim=32"])
    >>> cfg.loss.type, cfg.model.dim, cfg.eval.ks
    ('bce', 32, [3, 50])

``configs/pretrain.yaml`` lists every default with a comment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from oneepoch.config import OptimConfig


@dataclass
class PretrainDataConfig:
    path: str = ""  # engagement data set (schema.yaml with format: engagements)
    train_split: str = "train"
    test_split: str = "test"  # held-out engagements; "" = hold out `holdout` of train
    holdout: float = 0.02  # fraction of train held out when test_split is ""
    surfaces: list[str] = field(default_factory=list)  # keep only these surfaces (empty = all)


@dataclass
class PretrainModelConfig:
    dim: int = 64
    init_std: float = 0.1
    normalize: bool = False  # L2-normalise user and item vectors before the dot product


@dataclass
class LossConfig:
    type: str = "contrastive"  # contrastive (paper B Eq. 1) | bce (random negatives)
    in_batch: bool = True  # the batch's other positives are negatives
    n_uniform: int = 4096  # extra negatives drawn uniformly from the catalogue, per batch
    logq: bool = False  # subtract log(expected sampling count) from every logit
    temperature: float = 0.1  # initial tau
    learn_temperature: bool = True
    tau_min: float = 0.01  # tau is exp(log_tau) clamped to [tau_min, tau_max]
    tau_max: float = 1.0
    bce_negatives: int = 4  # bce: uniform negatives per positive
    chunk: int = 128  # rows of the logit matrix computed at once (a block stays in cache)


@dataclass
class PretrainEvalConfig:
    per_epoch: int = 2  # evaluations per epoch (plus one before training)
    ks: list[int] = field(default_factory=lambda: [3, 50])  # Hit / Recall / NDCG at these K
    max_pairs: int = 20_000  # held-out pairs ranked (a fixed random subset when more)
    train_pairs: int = 20_000  # fixed train subset ranked the same way (overfitting check)
    exclude_seen: bool = False  # drop the user's training items from the candidates
    batch_size: int = 1024  # users scored against the full catalogue at once


@dataclass
class PretrainConfig:
    name: str = ""  # run folder name under out_dir (default: derived from the config)
    out_dir: str = "runs"
    epochs: int = 10
    batch_size: int = 4096  # positive pairs per step
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 = all cores
    progress: bool = True
    export: bool = True  # write RUN/embeddings/ at the end
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(  # stage 1 keeps lazy row-wise Adam
        default_factory=lambda: OptimConfig(lr=5e-3, embedding_update="lazy"))
    eval: PretrainEvalConfig = field(default_factory=PretrainEvalConfig)
