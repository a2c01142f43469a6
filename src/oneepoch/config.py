"""Typed run settings: dataclasses filled from YAML files and ``key=value`` overrides.

    >>> cfg = load_config(TrainConfig, None, ["model.type=lr", "optim.lr=0.01", "epochs=4"])
    >>> cfg.model.type, cfg.optim.lr, cfg.epochs
    ('lr', 0.01, 4)

Unknown keys are errors that name the key and the allowed ones. The YAML files under
``configs/`` are presets: each sets some keys; every other key keeps the default shown here.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A bad setting: the message names the key."""


@dataclass
class DataConfig:
    path: str = ""  # data-set folder (schema.yaml + Parquet)
    train_split: str = "train"
    test_split: str = "test"
    exclude_fields: list[str] = field(default_factory=list)  # drop these features
    sparsity: str = "none"  # none | filter | hash: paper A's feature-sparsity transforms
    sparsity_m: float = 1.0  # keep the top-m fraction of IDs (filter) / m x IDs buckets (hash)
    sparsity_fields: list[str] = field(default_factory=list)  # empty = every field
    label_noise: float = 0.0  # fraction of training labels replaced by coin flips


@dataclass
class ModelConfig:
    type: str = "dnn"  # dnn (Embedding & MLP) | lr
    emb_dim: int = 8
    hidden: list[int] = field(default_factory=lambda: [200, 80])
    width_mult: float = 1.0  # multiplies every hidden width
    activation: str = "dice"  # dice | prelu | relu | sigmoid
    dropout: float = 0.0  # before each FC layer
    emb_init_std: float = 0.01


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | rmsprop | sgd | adagrad
    lr: float = 1e-3
    weight_decay: float = 0.0  # L2, on embedding rows touched by the batch and on the MLP
    momentum: float = 0.0  # sgd, rmsprop
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    emb_lr_scale: float = 1.0  # embedding lr = lr x this


@dataclass
class EvalConfig:
    per_epoch: int = 20  # evaluations per epoch (ignored when every_steps > 0)
    every_steps: int = 0
    at_start: bool = True  # also evaluate before the first step
    train_rows: int = 50_000  # fixed train subsample evaluated beside test
    batch_size: int = 16_384  # rows per forward pass in evaluation
    bucket_field: str = "auto"  # test AUC per train-count bucket of this field ("auto", "" = off)
    bucket_bounds: list[int] = field(default_factory=lambda: [5, 50])  # tail<=5<torso<=50<head


@dataclass
class InitConfig:
    """Stage 2 of paper B: start ID fields from pre-trained embeddings (``oneepoch pretrain``)."""

    embeddings: str = ""  # export folder (RUN/embeddings); "" = off
    mode: str = "finetune"  # frozen | finetune
    lr_scale: float = 0.1  # finetune: lr multiplier of the pre-trained rows (frozen: 0)
    user_fields: list[str] = field(default_factory=lambda: ["user_ID"])  # from the user table
    item_fields: list[str] = field(default_factory=lambda: ["item_ID"])  # + fields sharing vocab
    scale: float = 1.0  # multiply the loaded vectors


@dataclass
class SingleStageConfig:
    """Paper B's "merged" variant: BCE + weight x contrastive loss on the model's ID tables."""

    weight: float = 0.0  # lambda; 0 = off
    user_field: str = "user_ID"
    item_field: str = "item_ID"
    n_uniform: int = 1024  # uniform negatives per batch (besides in-batch ones)
    logq: bool = True
    normalize: bool = True
    temperature: float = 0.1  # initial tau, learned, clamped to [tau_min, tau_max]
    tau_min: float = 0.02
    tau_max: float = 1.0


@dataclass
class TrainConfig:
    name: str = ""  # run folder name under out_dir (default: derived from the config)
    out_dir: str = "runs"
    epochs: int = 3
    batch_size: int = 1024
    shuffle: str = "every"  # none | once | every (epoch)
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | cuda:N
    threads: int = 0  # torch intra-op threads; 0 = all cores
    progress: bool = True
    checkpoint_keep: int = 2  # epoch checkpoints kept (0 = all)
    min_drop: float = 0.005  # verdict: AUC drop after a boundary that counts as the phenomenon
    init_from: str = ""  # checkpoint folder to take the model's starting weights from
    freeze: list[str] = field(default_factory=list)  # parameter groups not trained: embedding, mlp
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    init: InitConfig = field(default_factory=InitConfig)
    single_stage: SingleStageConfig = field(default_factory=SingleStageConfig)


T = TypeVar("T")


def _coerce(value: Any, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        return from_dict(typ, value, key + ".")
    if origin is list:
        (inner,) = typing.get_args(typ)
        if isinstance(value, str):
            value = [v if inner is str else yaml.safe_load(v) for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        return [_coerce(v, inner, key) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r}: expected true/false, got {value!r}")
    if typ in (int, float) and isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if typ is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"config key {key!r}: expected {getattr(typ, '__name__', typ)}, "
                      f"got {value!r}")


def from_dict(cls: type[T], d: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping; unknown keys raise :class:`ConfigError`."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs = {}
    for k, v in d.items():
        if k not in names:
            near = difflib.get_close_matches(k, names, n=1)
            hint = f" (did you mean '{prefix}{near[0]}'?)" if near else ""
            raise ConfigError(f"unknown config key '{prefix}{k}'{hint}; "
                              f"known: {', '.join(prefix + n for n in names)}")
        kwargs[k] = _coerce(v, hints[k], prefix + k)
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def apply_override(d: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a nested mapping."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    parts = key.strip().split(".")
    node = d
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {p!r} is not a section")
    node[parts[-1]] = value


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_config_path(name: str | Path) -> Path:
    """A config file path, or the name of a built-in preset (``ctr``, ``demo``, ...)."""
    p = Path(name)
    if p.exists():
        return p
    builtin = CONFIG_DIR / (p.name if p.suffix else f"{p.name}.yaml")
    if builtin.exists():
        return builtin
    raise ConfigError(f"config file {str(name)!r} not found (built-in presets: "
                      f"{', '.join(sorted(q.stem for q in CONFIG_DIR.glob('*.yaml')))})")


def load_config(cls: type[T], path: str | Path | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Defaults of ``cls``, then the YAML file (if any), then ``key=value`` overrides."""
    d: dict[str, Any] = {}
    if path is not None:
        p = resolve_config_path(path)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of settings")
        d = loaded
    for item in overrides:
        apply_override(d, item)
    try:
        return from_dict(cls, d)
    except ConfigError as e:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(where + str(e)) from None
