import json

import numpy as np
import pytest
import torch

from oneepoch.config import TrainConfig, load_config
from oneepoch.data.dataset import load_ctr
from oneepoch.training.checkpoint import list_checkpoints, load_checkpoint
from oneepoch.training.trainer import Hook, State, read_metrics, train

METRIC_KEYS = ("step", "epoch", "test_auc", "test_gauc", "test_logloss", "train_auc",
               "train_logloss", "train_loss")


def cfg_for(path, tmp_path, *over):
    return load_config(TrainConfig, None, [
        f"data.path={path}", f"out_dir={tmp_path}", "progress=false", "threads=1",
        "batch_size=256", "eval.per_epoch=4", "epochs=2", "model.hidden=32,16", *over])


class Kill(Hook):
    def __init__(self, at_step):
        self.at_step = at_step

    def after_step(self, s: State) -> None:
        if s.step == self.at_step:
            raise KeyboardInterrupt


def strip(rows):
    return [{k: r[k] for k in METRIC_KEYS} for r in rows]


@pytest.mark.parametrize("over", [[], ["model.dropout=0.2", "optim.name=sgd",
                                      "optim.momentum=0.9", "optim.lr=0.05"]])
def test_resume_gives_identical_metrics(tiny_synth, tmp_path, over):
    full = train(cfg_for(tiny_synth, tmp_path, "name=full", *over))
    cfg = cfg_for(tiny_synth, tmp_path, "name=killed", *over)
    spe = -(-6000 // 256)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, hooks=[Kill(spe + 5)])  # killed 5 steps into epoch 2
    assert [p.name for p in list_checkpoints(tmp_path / "killed")] == ["epoch-001"]
    resumed = train(cfg, tmp_path / "killed", resume=True)
    assert strip(resumed.metrics) == strip(full.metrics)
    assert strip(read_metrics(tmp_path / "killed")) == strip(full.metrics)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "epoch-002")["model"]
    b = load_checkpoint(tmp_path / "killed" / "checkpoints" / "epoch-002")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_same_seed_same_run_and_other_seed_differs(tiny_synth, tmp_path):
    r1 = train(cfg_for(tiny_synth, tmp_path, "name=a", "epochs=1"))
    r2 = train(cfg_for(tiny_synth, tmp_path, "name=b", "epochs=1"))
    r3 = train(cfg_for(tiny_synth, tmp_path, "name=c", "epochs=1", "seed=1"))
    assert strip(r1.metrics) == strip(r2.metrics)
    assert strip(r1.metrics) != strip(r3.metrics)


def test_run_folder_contents_and_eval_schedule(tiny_synth, tmp_path):
    res = train(cfg_for(tiny_synth, tmp_path, "name=r", "checkpoint_keep=0"))
    d = tmp_path / "r"
    for f in ("config.yaml", "metrics.parquet", "summary.json"):
        assert (d / f).exists(), f
    assert [p.name for p in list_checkpoints(d)] == ["epoch-001", "epoch-002"]
    assert not list(d.rglob("*.pt")) and not list(d.rglob("*.pkl"))
    ep = [r["epoch"] for r in res.metrics]
    assert ep[0] == 0.0 and 1.0 in ep and ep[-1] == 2.0 and len(ep) == 1 + 2 * 4
    summ = json.loads((d / "summary.json").read_text())
    assert summ["finished"] and summ["verdict"].startswith("one-epoch phenomenon:")
    row = res.metrics[-1]
    assert 0.5 < row["test_auc"] <= 1 and 0 < row["test_logloss"] < 1 and "test_gauc" in row


@pytest.mark.parametrize("opt", ["adam", "rmsprop", "sgd", "adagrad"])
def test_every_optimizer_learns(tiny_synth, tmp_path, opt):
    lr = {"adam": 1e-3, "rmsprop": 1e-3, "sgd": 0.5, "adagrad": 0.05}[opt]
    res = train(cfg_for(tiny_synth, tmp_path, f"name={opt}", "epochs=1", f"optim.name={opt}",
                        f"optim.lr={lr}", "optim.weight_decay=1e-6"))
    assert res.metrics[-1]["test_auc"] > res.metrics[0]["test_auc"] + 0.02


@pytest.mark.parametrize("act", ["dice", "prelu", "relu", "sigmoid"])
def test_activations_and_lr_model_run(tiny_synth, tmp_path, act):
    res = train(cfg_for(tiny_synth, tmp_path, f"name={act}", "epochs=1",
                        f"model.activation={act}"))
    assert np.isfinite(res.metrics[-1]["test_auc"])


def test_lr_model_and_excluded_fields(tiny_synth, tmp_path):
    res = train(cfg_for(tiny_synth, tmp_path, "name=lr", "epochs=1", "model.type=lr",
                        "optim.lr=0.01", "data.exclude_fields=[item_ID,his_item_ID]"))
    assert res.metrics[-1]["test_auc"] > 0.55


def test_freeze_keeps_group_bit_identical(tiny_synth, tmp_path):
    base = train(cfg_for(tiny_synth, tmp_path, "name=base", "epochs=1"))
    ck = base.run_dir / "checkpoints" / "epoch-001"
    train(cfg_for(tiny_synth, tmp_path, "name=fz", "epochs=1", f"init_from={ck}",
                  "freeze=[mlp]"))
    a = load_checkpoint(ck)["model"]
    b = load_checkpoint(tmp_path / "fz" / "checkpoints" / "epoch-001")["model"]
    mlp = [k for k in a if k.startswith("mlp.") and "running" not in k]
    assert mlp and all(torch.equal(a[k], b[k]) for k in mlp)
    assert not torch.equal(a["embedding.weight"], b["embedding.weight"])


def test_sparse_step_touches_only_batch_rows(tiny_synth):
    from oneepoch.config import ModelConfig, OptimConfig
    from oneepoch.data.batcher import Batcher
    from oneepoch.models.ctr import build_model
    from oneepoch.training.optim import build_optimizer

    data = load_ctr(tiny_synth)
    m = build_model(ModelConfig(), data.vocab_sizes, [data.field_vocab(f) for f in data.fields],
                    len(data.single_fields))
    opt = build_optimizer(m, OptimConfig(weight_decay=0.1))
    b = Batcher(data.splits["train"], 64).get(np.arange(64))
    before = m.embedding.weight.detach().clone()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(m(b), b.label)
    loss.backward()
    opt.step()
    changed = (m.embedding.weight != before).any(1).nonzero().squeeze(1)
    flat, _ = m.embedding.bag_inputs(b)
    assert set(changed.tolist()) <= set(flat.tolist())
    assert len(changed) > 0.5 * len(set(flat.tolist()))


def test_fresh_run_drops_an_earlier_runs_checkpoints_and_summary(tiny_synth, tmp_path):
    from oneepoch.config import to_dict
    from oneepoch.runfolder import RunConflict, reuse

    cfg = cfg_for(tiny_synth, tmp_path, "name=r", "epochs=2")
    stale = tmp_path / "r" / "checkpoints" / "epoch-009"
    stale.mkdir(parents=True)
    (stale / "state.json").write_text("{}")
    (tmp_path / "r" / "summary.json").write_text("{}")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, hooks=[Kill(-(-6000 // 256) + 2)])  # killed early in epoch 2
    assert [p.name for p in list_checkpoints(tmp_path / "r")] == ["epoch-001"]
    assert not (tmp_path / "r" / "summary.json").exists()
    # a reproduction recipe continues such a run rather than starting over
    assert reuse(tmp_path / "r", to_dict(cfg)) == "resume"
    other = cfg_for(tiny_synth, tmp_path, "name=r", "epochs=2", "seed=5")
    assert reuse(tmp_path / "r", to_dict(other)) == "fresh"
    train(cfg, tmp_path / "r", resume=True)
    assert reuse(tmp_path / "r", to_dict(cfg)) == "skip"
    with pytest.raises(RunConflict, match="seed"):  # a finished run is never overwritten
        reuse(tmp_path / "r", to_dict(other))
