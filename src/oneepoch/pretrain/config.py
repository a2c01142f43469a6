"""Settings of stage-1 pre-training (``oneepoch pretrain``), filled like every other config.

    >>> from oneepoch.config import load_config
    >>> cfg = load_config(PretrainConfig, None, ["loss.type=bce", "model.dim=32"])
    >>> cfg.loss.type, cfg.model.dim, cfg.eval.ks
    ('bce', 32, [3, 50])

``configs/pretrain.yaml`` lists every default with a comment. Choices and ranges are declared
on the fields and checked when the settings are loaded (see :mod:`oneepoch.config`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from oneepoch.config import ConfigError, OptimConfig, check_temperature, choice, num, setting

SELECT_METRIC = re.compile(r"test_(hit|recall|ndcg)@(\d+)|test_(full|sampled)_loss")


def _select_metric(v: object) -> str | None:
    if v == "" or SELECT_METRIC.fullmatch(str(v)):
        return None
    return ("must be '' (off), test_hit@K, test_recall@K, test_ndcg@K (K in eval.ks), "
            "test_full_loss or test_sampled_loss (a held-out metric)")


@dataclass
class PretrainDataConfig:
    path: str = ""  # engagement data set (schema.yaml with format: engagements)
    train_split: str = "train"
    test_split: str = "test"  # held-out engagements; "" = hold out `holdout` of train
    holdout: float = num(0.02, gt=0, lt=1)  # fraction of train held out when test_split is ""
    surfaces: list[str] = field(default_factory=list)  # keep only these surfaces (empty = all)
    # train on this share of the train engagements (a fixed draw, the same for every seed and
    # nested across shares); vocabularies and the held-out pairs stay those of the full log
    subsample: float = num(1.0, gt=0, le=1)


@dataclass
class PretrainModelConfig:
    dim: int = num(64, ge=1)
    init_std: float = num(0.1, ge=0)
    normalize: bool = False  # L2-normalise user and item vectors before the dot product


@dataclass
class LossConfig:
    type: str = choice("contrastive", "bce")  # contrastive (paper B Eq. 1) | bce (random negs)
    in_batch: bool = True  # the batch's other positives are negatives
    n_uniform: int = num(4096, ge=0)  # extra negatives drawn uniformly from the catalogue
    logq: bool = False  # subtract log(expected sampling count) from every logit
    temperature: float = num(0.1, gt=0)  # initial tau
    learn_temperature: bool = True
    tau_min: float = num(0.01, gt=0)  # tau is exp(log_tau) clamped to [tau_min, tau_max]
    tau_max: float = num(1.0, gt=0)
    bce_negatives: int = num(4, ge=1)  # bce: uniform negatives per positive
    chunk: int = num(128, ge=1)  # rows of the logit matrix computed at once (stays in cache)

    def validate(self, prefix: str) -> None:
        check_temperature(self.temperature, self.tau_min, self.tau_max, prefix)
        if self.type == "contrastive" and not self.in_batch and self.n_uniform <= 0:
            raise ConfigError(f"config key '{prefix}n_uniform': {prefix}in_batch=false needs "
                              f"{prefix}n_uniform > 0 (no negatives otherwise)")


@dataclass
class PretrainEvalConfig:
    per_epoch: int = num(2, ge=1)  # evaluations per epoch (plus one before training)
    ks: list[int] = num([3, 50], ge=1)  # Hit / Recall / NDCG at these K
    max_pairs: int = num(20_000, ge=1)  # held-out pairs ranked (a fixed random subset if more)
    train_pairs: int = num(20_000, ge=1)  # fixed train subset ranked the same way (overfitting)
    exclude_seen: bool = False  # drop the user's training items from the candidates
    batch_size: int = num(1024, ge=1)  # users scored against the full catalogue at once


@dataclass
class PretrainSelectConfig:
    """Keep the best evaluation point instead of the last one (early stopping for stage 1)."""

    metric: str = setting("", check=_select_metric)  # "" = off (export the last point)
    patience: int = num(0, ge=0)  # evaluations without improvement before stopping; 0 = never
    min_delta: float = num(0.0, ge=0)  # improvement that counts


@dataclass
class PretrainConfig:
    name: str = ""  # run folder name under out_dir (default: derived from the config)
    out_dir: str = "runs"
    epochs: int = num(10, ge=1)
    batch_size: int = num(4096, ge=1)  # positive pairs per step
    seed: int = num(0, ge=0)
    threads: int = num(0, ge=0)  # torch intra-op threads; 0 = all cores
    progress: bool = True
    export: bool = True  # write RUN/embeddings/ at the end
    checkpoint_keep: int = num(1, ge=0)  # epoch checkpoints kept (0 = all)
    tracking: str = choice("none", "tensorboard", "mlflow")  # stream metrics (oneepoch.tracking)
    tracking_uri: str = ""  # TensorBoard log folder / MLflow URI ("" = beside the run folder)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(  # stage 1 keeps lazy row-wise Adam
        default_factory=lambda: OptimConfig(lr=5e-3, embedding_update="lazy"))
    eval: PretrainEvalConfig = field(default_factory=PretrainEvalConfig)
    select: PretrainSelectConfig = field(default_factory=PretrainSelectConfig)

    def validate(self, prefix: str) -> None:
        m = SELECT_METRIC.fullmatch(self.select.metric)
        if m and m.group(2) and int(m.group(2)) not in self.eval.ks:
            raise ConfigError(f"config key '{prefix}select.metric': {self.select.metric} needs "
                              f"K={m.group(2)} in {prefix}eval.ks (now {self.eval.ks})")
