"""Typed run settings: dataclasses filled from YAML files and ``key=value`` overrides.

    >>> cfg = load_config(TrainConfig, None, ["model.type=lr", "optim.lr=0.01", "epochs=4"])
    >>> cfg.model.type, cfg.optim.lr, cfg.epochs
    ('lr', 0.01, 4)

Every settings object of the project (training, pre-training, the synthetic generator, the
preparers' options, probe specs) is a dataclass read by :func:`from_dict`, which

- refuses unknown keys, naming the nearest known one (``did you mean ...``);
- converts each value to the field's type (``1e5`` -> ``100000`` for an ``int``) or refuses it;
- checks the allowed values that fields declare with :func:`choice` (one of some names),
  :func:`num` (a numeric range) or :func:`setting` (any check), plus an optional
  ``validate(self, prefix)`` method for rules across fields;

so a bad setting is a :class:`ConfigError` naming the full key, the value and what is allowed,
raised before anything is read or written. Declaring a checked field is one line::

    shuffle: str = choice("none", "once", "every", default="every")
    batch_size: int = num(1024, ge=1)

The YAML files under ``configs/`` are presets: each sets some keys; every other key keeps the
default shown here.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A bad setting: the message names the key."""


# ----------------------------------------------------------------------------- field checks


def _field(default: Any, meta: dict[str, Any]) -> Any:
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def choice(*allowed: str, default: str | list[str] | None = None) -> Any:
    """A field whose value is one of ``allowed`` (for a list field: each element is).

    ``default`` is the first of ``allowed`` unless given (a list for a list field).

        >>> @dataclass
        ... class C:
        ...     shuffle: str = choice("none", "once", "every", default="every")
        >>> try:
        ...     from_dict(C, {"shuffle": "evry"})
        ... except ConfigError as e:
        ...     print(e)
        config key 'shuffle': got 'evry'; allowed: none, once, every (did you mean 'every'?)
    """
    if not allowed:
        raise TypeError("choice: name at least one allowed value")
    return _field(allowed[0] if default is None else default, {"choices": tuple(allowed)})


def num(default: Any, *, ge: float | None = None, gt: float | None = None,
        le: float | None = None, lt: float | None = None) -> Any:
    """A numeric field (or list of numbers) within the given bounds (NaN and inf refused).

    ``ge``/``gt``: lower bound (inclusive/exclusive); ``le``/``lt``: upper bound.
    """
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return _field(default, {"range": bounds})


def setting(default: Any, *, check: Callable[[Any], str | None]) -> Any:
    """A field checked by ``check(value)``, which returns ``None`` when the value is fine or a
    short text saying what is allowed."""
    return _field(default, {"check": check})


def _range_text(b: Mapping[str, float]) -> str:
    lo = f"[{b['ge']:g}" if "ge" in b else f"({b['gt']:g}" if "gt" in b else None
    hi = f"{b['le']:g}]" if "le" in b else f"{b['lt']:g})" if "lt" in b else None
    if lo and hi:
        return f"in {lo}, {hi}"
    if lo:
        return (">= " if lo[0] == "[" else "> ") + lo[1:]
    if hi:
        return ("<= " if hi[-1] == "]" else "< ") + hi[:-1]
    return "a number"


def _in_range(v: float, b: Mapping[str, float]) -> bool:
    return (("ge" not in b or v >= b["ge"]) and ("gt" not in b or v > b["gt"])
            and ("le" not in b or v <= b["le"]) and ("lt" not in b or v < b["lt"]))


def _check_value(meta: Mapping[str, Any], value: Any, key: str) -> None:
    """Check one field's value against its declared choices / range / check."""
    if not meta:
        return
    items = value if isinstance(value, (list, tuple)) else [value]
    for v in items:
        if "choices" in meta and v not in meta["choices"]:
            allowed = [str(c) for c in meta["choices"]]
            near = difflib.get_close_matches(str(v), allowed, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"config key {key!r}: got {v!r}; allowed: {', '.join(allowed)}"
                              + hint)
        if "range" in meta and isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"config key {key!r}: got {v!r}; must be a finite number "
                              f"{_range_text(meta['range'])}")
        if "range" in meta and not _in_range(v, meta["range"]):
            raise ConfigError(f"config key {key!r}: got {v!r}; must be "
                              f"{_range_text(meta['range'])}")
        if "check" in meta:
            why = meta["check"](v)
            if why:
                raise ConfigError(f"config key {key!r}: got {v!r}; {why}")


def check_settings(obj: Any, prefix: str = "") -> None:
    """Check every field of the settings dataclass ``obj`` (and of its sections) against its
    declared choices and ranges, then call ``obj.validate(prefix)`` if defined (rules across
    fields, raising :class:`ConfigError` with keys prefixed by ``prefix``)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_settings(value, f"{prefix}{f.name}.")
        else:
            _check_value(f.metadata, value, prefix + f.name)
    hook = getattr(obj, "validate", None)
    if callable(hook):
        hook(prefix)


_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def _device_format(v: Any) -> str | None:
    return None if _DEVICE.fullmatch(str(v)) else "must be cpu, cuda or cuda:N"


def check_device(device: str) -> None:
    """Refuse a device this machine does not have (``cuda`` without CUDA, ``cuda:N`` past the
    last GPU) with a :class:`ConfigError` saying what to use instead. :func:`load_config` only
    checks the format, so configs stay readable on any machine; call this before a run."""
    why = _device_format(device)
    if why:
        raise ConfigError(f"device={device}: {why}")
    if device == "cpu":
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"device={device}: CUDA is not available on this machine "
                          "(torch.cuda.is_available() is False); use device=cpu")
    n = torch.cuda.device_count()
    index = int(device.partition(":")[2] or 0)
    if index >= n:
        raise ConfigError(f"device={device}: this machine has {n} CUDA device(s) "
                          f"(cuda:0..cuda:{n - 1}); use one of them or device=cpu")


# ----------------------------------------------------------------------------- settings


@dataclass
class DataConfig:
    path: str = ""  # data-set folder (schema.yaml + Parquet)
    train_split: str = "train"
    test_split: str = "test"
    exclude_fields: list[str] = field(default_factory=list)  # drop these features
    # paper A's feature-sparsity transforms
    sparsity: str = choice("none", "filter", "hash")
    sparsity_m: float = num(1.0, gt=0, le=1)  # keep the top-m fraction of IDs / m x IDs buckets
    sparsity_fields: list[str] = field(default_factory=list)  # empty = every field
    label_noise: float = num(0.0, ge=0, le=1)  # fraction of training labels -> coin flips
    valid_split: str = ""  # a split of the data set evaluated as validation ("" = none)
    valid_share: float = num(0.0, ge=0, lt=1)  # else carve this share of train out (0 = none)
    valid_by: str = choice("random", "order")  # order: the last rows of train (by time)

    def validate(self, prefix: str) -> None:
        if self.valid_split and self.valid_share > 0:
            raise ConfigError(f"config keys '{prefix}valid_split' and '{prefix}valid_share': "
                              "set one of them (a validation split, or a share of train)")


@dataclass
class ModelConfig:
    type: str = choice("dnn", "lr")  # dnn (Embedding & MLP) | lr
    emb_dim: int = num(8, ge=1)
    hidden: list[int] = num([200, 80], ge=1)
    width_mult: float = num(1.0, gt=0)  # multiplies every hidden width
    activation: str = choice("dice", "prelu", "relu", "sigmoid")
    dropout: float = num(0.0, ge=0, lt=1)  # before each FC layer
    emb_init_std: float = num(0.01, ge=0)


@dataclass
class OptimConfig:
    name: str = choice("adam", "rmsprop", "sgd", "adagrad")
    lr: float = num(1e-3, gt=0)
    weight_decay: float = num(0.0, ge=0)  # L2, on embedding rows touched by the batch + MLP
    momentum: float = num(0.0, ge=0, lt=1)  # sgd, rmsprop
    beta1: float = num(0.9, ge=0, lt=1)
    beta2: float = num(0.999, ge=0, lt=1)
    eps: float = num(1e-8, gt=0)
    emb_lr_scale: float = num(1.0, ge=0)  # embedding lr = lr x this
    # Adam on ID tables: dense = TF1 / torch.optim.Adam (every row moves every step, applied
    # lazily at row-wise cost); lazy = only the batch's rows (SparseAdam / LazyAdam)
    embedding_update: str = choice("dense", "lazy")
    # AdamAR (Li & Lyu 2025): per-row decoupled decay of ID rows, lr x min(1, alpha x gap) per
    # step a row misses, applied when it is next touched (docs/training.md); 0 = off
    row_decay_alpha: float = num(0.0, ge=0)


@dataclass
class EvalConfig:
    per_epoch: int = num(20, ge=1)  # evaluations per epoch (ignored when every_steps > 0)
    every_steps: int = num(0, ge=0)
    at_start: bool = True  # also evaluate before the first step
    train_rows: int = num(50_000, ge=1)  # fixed train subsample evaluated beside test
    batch_size: int = num(16_384, ge=1)  # rows per forward pass in evaluation
    bucket_field: str = "auto"  # test AUC per train-count bucket of this field ("auto", "" = off)
    bucket_bounds: list[int] = num([5, 50], ge=0)  # tail <= 5 < torso <= 50 < head


@dataclass
class InitConfig:
    """Stage 2 of paper B: start ID fields from pre-trained embeddings (``oneepoch pretrain``)."""

    embeddings: str = ""  # export folder (RUN/embeddings); "" = off
    mode: str = choice("frozen", "finetune", default="finetune")
    lr_scale: float = num(0.1, ge=0)  # finetune: lr multiplier of the pre-trained rows (frozen: 0)
    user_fields: list[str] = field(default_factory=lambda: ["user_ID"])  # from the user table
    item_fields: list[str] = field(default_factory=lambda: ["item_ID"])  # + fields sharing vocab
    scale: float = num(1.0)  # multiply the loaded vectors (any finite number)


def check_temperature(temperature: float, tau_min: float, tau_max: float, prefix: str) -> None:
    """``0 < tau_min <= temperature <= tau_max`` or a :class:`ConfigError` naming the keys."""
    if not 0 < tau_min <= temperature <= tau_max:
        raise ConfigError(f"config key '{prefix}temperature': need 0 < {prefix}tau_min "
                          f"({tau_min:g}) <= temperature ({temperature:g}) <= {prefix}tau_max "
                          f"({tau_max:g})")


@dataclass
class SingleStageConfig:
    """Paper B's "merged" variant: BCE + weight x contrastive loss on the model's ID tables."""

    weight: float = num(0.0, ge=0)  # lambda; 0 = off
    user_field: str = "user_ID"
    item_field: str = "item_ID"
    n_uniform: int = num(1024, ge=0)  # uniform negatives per batch (besides in-batch ones)
    logq: bool = True
    normalize: bool = True
    temperature: float = num(0.1, gt=0)  # initial tau, learned, clamped to [tau_min, tau_max]
    tau_min: float = num(0.02, gt=0)
    tau_max: float = num(1.0, gt=0)

    def validate(self, prefix: str) -> None:
        check_temperature(self.temperature, self.tau_min, self.tau_max, prefix)


@dataclass
class EarlyStopConfig:
    """Early stopping inside an epoch, selected on the validation split (never on test)."""

    metric: str = choice("", "auc", "logloss")  # "" = off; of the validation split
    patience: int = num(0, ge=0)  # evaluations without improvement before stopping; 0 = never
    min_delta: float = num(0.0, ge=0)  # improvement that counts


@dataclass
class MedaConfig:
    """MEDA (Fan et al. 2024): re-initialise ID tables and their optimizer state at every
    epoch start after the first; the MLP is kept."""

    enabled: bool = False
    fields: list[str] = field(default_factory=list)  # fields whose vocabularies reset; [] = all


@dataclass
class FreqLrConfig:
    """Frequency-adaptive embedding learning rate (after Qiu et al. 2025): an ID seen c times
    in train trains at lr x min(1, (c / threshold) ** power)."""

    threshold: float = num(0.0, ge=0)  # 0 = off
    power: float = num(0.5, ge=0)


@dataclass
class FreezeAfterConfig:
    """Paper A's lever as a remedy: stop training parameter groups from an epoch on (their
    learning rate becomes 0, so the fused step keeps running)."""

    epoch: int = num(0, ge=0)  # from the start of this 0-based epoch (1 = after epoch 1); 0 = off
    groups: list[str] = choice("embedding", "mlp", default=["embedding"])


@dataclass
class TrainConfig:
    name: str = ""  # run folder name under out_dir (default: derived from the config)
    out_dir: str = "runs"
    epochs: int = num(3, ge=1)
    batch_size: int = num(1024, ge=1)
    shuffle: str = choice("none", "once", "every", default="every")  # data order per epoch
    seed: int = num(0, ge=0)
    device: str = setting("cpu", check=_device_format)  # cpu | cuda | cuda:N (see check_device)
    threads: int = num(0, ge=0)  # torch intra-op threads; 0 = all cores
    progress: bool = True
    checkpoint_keep: int = num(2, ge=0)  # epoch checkpoints kept (0 = all)
    min_drop: float = num(0.005, ge=0, lt=1)  # verdict: AUC drop after a boundary that counts
    init_from: str = ""  # checkpoint folder to take the model's starting weights from
    freeze: list[str] = choice("embedding", "mlp", default=[])  # parameter groups not trained
    tracking: str = choice("none", "tensorboard", "mlflow")  # stream metrics (oneepoch.tracking)
    tracking_uri: str = ""  # TensorBoard log folder / MLflow URI ("" = beside the run folder)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    init: InitConfig = field(default_factory=InitConfig)
    single_stage: SingleStageConfig = field(default_factory=SingleStageConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    meda: MedaConfig = field(default_factory=MedaConfig)
    freq_lr: FreqLrConfig = field(default_factory=FreqLrConfig)
    freeze_after: FreezeAfterConfig = field(default_factory=FreezeAfterConfig)


T = TypeVar("T")


def _coerce(value: Any, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        return _build(typ, value, key + ".")
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


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _build(cls: type[T], d: Mapping[str, Any], prefix: str, base: T | None = None) -> T:
    """``cls`` from ``d`` (types converted, nothing range-checked yet); keys not in ``d`` keep
    their values in ``base`` (default: the field defaults, a section's own default included)."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"settings{' ' + prefix[:-1] if prefix else ''}: expected a mapping "
                          f"of key: value, got {d!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {}
    for k, v in d.items():
        if k not in fields or not fields[k].init:
            names = [n for n, f in fields.items() if f.init]
            near = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean '{prefix}{near[0]}'?)" if near else ""
            raise ConfigError(f"unknown config key '{prefix}{k}'{hint}; "
                              f"known: {', '.join(prefix + n for n in names)}")
        typ = hints[k]
        if dataclasses.is_dataclass(typ) and isinstance(v, Mapping):
            sub = getattr(base, k) if base is not None else _default(fields[k])
            kwargs[k] = _build(typ, v, f"{prefix}{k}.", sub)
        else:
            kwargs[k] = _coerce(v, typ, prefix + k)
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def from_dict(cls: type[T], d: Mapping[str, Any], prefix: str = "", base: T | None = None) -> T:
    """Build settings dataclass ``cls`` from a (nested) mapping and check it.

    Unknown keys, values of the wrong type and values outside a field's declared choices or
    range raise :class:`ConfigError` naming the key (``prefix`` + name). Keys not given keep
    the values of ``base`` (default: ``cls``'s defaults; a section keeps its own default, e.g.
    a field ``optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-3))`` keeps
    lr=5e-3 when only ``optim.name`` is given).
    """
    obj = _build(cls, d, prefix, None if base is None else copy.deepcopy(base))
    check_settings(obj, prefix)
    return obj


def parse_overrides(items: list[str] | tuple[str, ...], d: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML), applied
    over ``d`` if given."""
    d = {} if d is None else d
    for item in items:
        apply_override(d, item)
    return d


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def apply_override(d: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a nested mapping."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML "
                          f"({str(e).splitlines()[0]})") from None
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
    from_file = copy.deepcopy(d)
    parse_overrides(overrides, d)
    try:
        return from_dict(cls, d)
    except ConfigError as e:
        # name the file only when the error is in it (not when an override caused it)
        in_file = path is not None and (not overrides or not _loads(cls, from_file))
        raise ConfigError((f"{path}: " if in_file else "") + str(e)) from None


def _loads(cls: type, d: dict[str, Any]) -> bool:
    try:
        from_dict(cls, d)
    except ConfigError:
        return False
    return True
