"""The one settings mechanism (oneepoch.config): types, choices and ranges checked at load."""

import dataclasses
import typing

import pytest
import torch

from oneepoch.cli import main
from oneepoch.config import (
    CONFIG_DIR,
    ConfigError,
    TrainConfig,
    check_device,
    check_settings,
    from_dict,
    load_config,
    parse_overrides,
    to_dict,
)
from oneepoch.data.prepare import PREPARERS, PrepareError, prepare
from oneepoch.data.synthetic import SurfacesConfig, SynthConfig
from oneepoch.pretrain.config import PretrainConfig
from oneepoch.probes.adistance import ADistanceProbe
from oneepoch.probes.updates import UpdateNormLogger


def _option_classes() -> list[type]:
    import importlib

    return [getattr(importlib.import_module(f"oneepoch.data.prepare.{p.module}"), p.options)
            for p in PREPARERS.values()]


SETTINGS = [TrainConfig, PretrainConfig, SynthConfig, SurfacesConfig, ADistanceProbe.Settings,
            UpdateNormLogger.Settings, *_option_classes()]


def _leaves(cls: type, prefix: str = ""):
    """(key, field, type) of every non-section field of ``cls`` and its sections."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f, hints[f.name]


@pytest.mark.parametrize("cls", SETTINGS, ids=lambda c: c.__name__)
def test_defaults_pass_their_own_checks_and_round_trip(cls):
    default = cls()
    check_settings(default)
    assert from_dict(cls, to_dict(default)) == default  # every default has its declared type


@pytest.mark.parametrize("cls", [TrainConfig, PretrainConfig, SynthConfig],
                         ids=lambda c: c.__name__)
def test_every_numeric_setting_declares_a_range(cls):
    # a new int/float field must say what is allowed (num(default, ge=..)), at least finiteness
    missing = [key for key, f, typ in _leaves(cls)
               if typ in (int, float, list[int], list[float]) and "range" not in f.metadata]
    assert missing == []


@pytest.mark.parametrize("preset,cls", [("ctr", TrainConfig), ("demo", TrainConfig),
                                        ("demo_lr", TrainConfig), ("pretrain", PretrainConfig),
                                        ("hsu2024_pretrain", PretrainConfig)])
def test_builtin_presets_load(preset, cls):
    assert (CONFIG_DIR / f"{preset}.yaml").exists()
    load_config(cls, preset)


@pytest.mark.parametrize("cls,override,choices", [
    (TrainConfig, "shuffle=evry", "none, once, every (did you mean 'every'?)"),
    (TrainConfig, "model.type=dn", "dnn, lr (did you mean 'dnn'?)"),
    (TrainConfig, "model.activation=tanh", "dice, prelu, relu, sigmoid"),
    (TrainConfig, "optim.name=adamw", "adam, rmsprop, sgd, adagrad (did you mean 'adam'?)"),
    (TrainConfig, "init.mode=freeze", "frozen, finetune (did you mean 'frozen'?)"),
    (TrainConfig, "data.sparsity=filtre", "none, filter, hash (did you mean 'filter'?)"),
    (TrainConfig, "freeze=[embedding,emb]", "embedding, mlp"),
    (PretrainConfig, "loss.type=contrastiv", "contrastive, bce (did you mean 'contrastive'?)"),
])
def test_enum_typo_is_refused_naming_key_value_and_choices(cls, override, choices):
    key, _, value = override.partition("=")
    bad = value.strip("[]").split(",")[-1]
    with pytest.raises(ConfigError) as e:
        load_config(cls, None, [override])
    assert str(e.value) == f"config key '{key}': got '{bad}'; allowed: {choices}"


@pytest.mark.parametrize("override,expect", [
    ("batch_size=0", "config key 'batch_size': got 0; must be >= 1"),
    ("batch_size=-5", "config key 'batch_size': got -5; must be >= 1"),
    ("epochs=0", "config key 'epochs': got 0; must be >= 1"),
    ("epochs=-1", "config key 'epochs': got -1; must be >= 1"),
    ("threads=-1", "config key 'threads': got -1; must be >= 0"),
    ("optim.lr=0", "config key 'optim.lr': got 0.0; must be > 0"),
    ("optim.lr=-1e-3", "config key 'optim.lr': got -0.001; must be > 0"),
    ("optim.beta1=1", "config key 'optim.beta1': got 1.0; must be in [0, 1)"),
    ("optim.lr=.inf", "config key 'optim.lr': got inf; must be a finite number > 0"),
    ("optim.lr=.nan", "config key 'optim.lr': got nan; must be a finite number > 0"),
    ("eval.per_epoch=0", "config key 'eval.per_epoch': got 0; must be >= 1"),
    ("model.hidden=[64,0]", "config key 'model.hidden': got 0; must be >= 1"),
    ("data.sparsity_m=1.5", "config key 'data.sparsity_m': got 1.5; must be in (0, 1]"),
    ("device=gpu", "config key 'device': got 'gpu'; must be cpu, cuda or cuda:N"),
    ("single_stage.tau_max=0.05", "config key 'single_stage.temperature': need 0 < "
     "single_stage.tau_min (0.02) <= temperature (0.1) <= single_stage.tau_max (0.05)"),
])
def test_out_of_range_is_refused_at_load(override, expect):
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, None, [override])
    assert str(e.value) == expect


def test_range_applies_to_values_from_a_file_too(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("epochs: 2\noptim:\n  lr: -0.1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: config key 'optim\.lr': got -0\.1"):
        load_config(TrainConfig, p)


def test_types_unknown_keys_and_good_values():
    cfg = load_config(TrainConfig, None, ["batch_size=2e3", "device=cuda:1", "freeze=mlp",
                                          "optim.beta2=0"])
    assert (cfg.batch_size, cfg.device, cfg.freeze, cfg.optim.beta2) == (2000, "cuda:1",
                                                                         ["mlp"], 0.0)
    with pytest.raises(ConfigError, match="expected int, got 1.5"):
        load_config(TrainConfig, None, ["batch_size=1.5"])
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lrr' \(did you mean "
                       r"'optim\.lr'\?\)"):
        load_config(TrainConfig, None, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TrainConfig, None, ["model.hidden=[1,"])


def test_cross_field_rules():
    with pytest.raises(ConfigError, match=r"config key 'loss\.n_uniform': loss\.in_batch=false"):
        load_config(PretrainConfig, None, ["loss.in_batch=false", "loss.n_uniform=0"])
    load_config(PretrainConfig, None, ["loss.type=bce", "loss.in_batch=false",
                                       "loss.n_uniform=0"])
    with pytest.raises(ConfigError, match=r"need hist_min \(30\) <= hist_max \(20\)"):
        SynthConfig.from_dict({"hist_min": 30})


def test_a_partly_given_section_keeps_its_own_default():
    # PretrainConfig.optim defaults to OptimConfig(lr=5e-3), not OptimConfig's 1e-3
    cfg = load_config(PretrainConfig, None, ["optim.name=sgd"])
    assert (cfg.optim.name, cfg.optim.lr) == ("sgd", 5e-3)
    assert load_config(TrainConfig, None, ["optim.name=sgd"]).optim.lr == 1e-3


@pytest.mark.parametrize("override", ["shuffle=evry", "batch_size=0", "epochs=-1", "threads=-1",
                                      "optim.lr=0", "device=gpu"])
def test_cli_train_refuses_bad_settings_before_writing(tmp_path, capsys, tiny_synth, override):
    out = tmp_path / "runs"
    code = main(["train", "--config", "ctr", f"data.path={tiny_synth}", f"out_dir={out}",
                 "name=x", "progress=false", "threads=1", override])
    assert code == 2
    err = capsys.readouterr().err
    key = override.split("=")[0]
    # the bad value came from an override, not from the preset: the message says so
    assert err.startswith(f"oneepoch train: error: config key '{key}': got ")
    assert err.count("\n") == 1  # one line, no traceback
    assert not (out / "x" / "config.yaml").exists() and not out.exists()


def test_synth_set_is_typed_and_checked(tmp_path, capsys):
    assert SynthConfig.from_dict(parse_overrides(["n_items=1e5"])).n_items == 100_000
    with pytest.raises(ConfigError, match=r"unknown config key 'n_item' \(did you mean "
                       r"'n_items'\?\)"):
        SynthConfig.from_dict({"n_item": 5})
    out = tmp_path / "syn"
    assert main(["data", "synth", "--out", str(out), "--set", "n_items=0"]) == 2
    assert "config key 'n_items': got 0; must be >= 1" in capsys.readouterr().err
    assert main(["data", "synth", "--out", str(out), "--surfaces", "homefeed,serch"]) == 2
    assert "did you mean 'search'?" in capsys.readouterr().err
    assert not out.exists()
    # --surfaces: a world --set key applies over the multi-surface world's own defaults
    world = SynthConfig.from_dict({"dim": 4}, base=SurfacesConfig().world)
    assert (world.dim, world.n_users) == (4, 10_000)


def test_prepare_option_typo_and_range(tmp_path):
    with pytest.raises(PrepareError, match=r"prepare movielens: unknown config key 'treshold' "
                       r"\(did you mean 'threshold'\?\)"):
        prepare("movielens", tmp_path / "raw", tmp_path / "o", {"treshold": 4}, progress=False)
    with pytest.raises(PrepareError, match=r"prepare taobao-userbehavior: config key "
                       r"'buckets': got 5000; must be in \[1, 4096\]"):
        prepare("taobao-userbehavior", tmp_path / "raw", tmp_path / "o", {"buckets": 5000},
                progress=False)
    with pytest.raises(PrepareError, match="set negatives >= 1"):
        prepare("interactions", tmp_path / "raw", tmp_path / "o", {"negatives": 0},
                progress=False)
    assert not (tmp_path / "o").exists()


def test_check_device(monkeypatch):
    check_device("cpu")
    with pytest.raises(ConfigError, match="must be cpu, cuda or cuda:N"):
        check_device("gpu:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as e:
        check_device("cuda")
    assert str(e.value) == ("device=cuda: CUDA is not available on this machine "
                            "(torch.cuda.is_available() is False); use device=cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda:1")
    with pytest.raises(ConfigError, match=r"device=cuda:2: this machine has 2 CUDA device"):
        check_device("cuda:2")
    # reading a config never needs the device (reports read configs of GPU runs anywhere)
    assert load_config(TrainConfig, None, ["device=cuda:7"]).device == "cuda:7"
