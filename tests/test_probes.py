"""Paper A's probes: A-distance, per-step update norms, freezing for partial fine-tuning."""

import numpy as np
import pytest
import torch

from oneepoch.config import TrainConfig, load_config
from oneepoch.data.batcher import Batcher
from oneepoch.probes.adistance import ADistanceProbe, a_distance, balanced_sample
from oneepoch.probes.updates import UpdateNormLogger, layer_groups, read_updates
from oneepoch.recipes.sweep import RunSpec, execute
from oneepoch.training.checkpoint import load_checkpoint
from oneepoch.training.trainer import Hook, build, prepare_data, train

TINY = ["epochs=1", "batch_size=1000", "eval.per_epoch=2", "eval.train_rows=1000",
        "model.hidden=[16,8]", "threads=1", "progress=false"]


def cfg_for(data, *over):
    return load_config(TrainConfig, None, [*TINY, f"data.path={data}", *over])


# ----------------------------------------------------------------------------- A-distance


def test_a_distance_is_2_for_separable_and_0_for_identical_distributions():
    g = torch.Generator().manual_seed(1)
    y = (torch.arange(4000) % 2).float()
    noise = torch.randn(4000, 8, generator=g)
    shift = torch.zeros(8)
    shift[3] = 8.0
    sep = a_distance(noise + y[:, None] * shift, y)
    same = a_distance(noise, y)
    assert sep.shape == () and float(sep) > 1.98
    assert abs(float(same)) < 0.1
    # batched probes of different strength, fit jointly, ordered as given
    x = torch.stack([noise, noise + y[:, None] * shift * 0.05, noise + y[:, None] * shift])
    a = a_distance(x, y)
    assert a.shape == (3,) and abs(float(a[0])) < 0.1 and 0.05 < float(a[1]) < 1.5
    assert float(a[2]) > 1.98


def test_a_distance_takes_per_probe_labels():
    g = torch.Generator().manual_seed(2)
    n = 2000
    y1 = (torch.arange(n) % 2).float()
    y2 = torch.randint(0, 2, (n,), generator=g).float()
    x = torch.randn(n, 4, generator=g) + 10 * y1[:, None]
    a = a_distance(torch.stack([x, x]), torch.stack([y1, y2]))
    assert float(a[0]) > 1.98 and abs(float(a[1])) < 0.15  # y2 is unrelated to x


def test_balanced_sample():
    label = np.array([1] * 30 + [0] * 70, dtype=np.float32)
    rows = balanced_sample(label, 40, seed=0)
    assert len(rows) == 40 and label[rows].sum() == 20 and np.all(np.diff(rows) > 0)
    assert len(balanced_sample(label, 1000, seed=0)) == 60  # limited by the 30 positives
    assert np.array_equal(rows, balanced_sample(label, 40, seed=0))
    with pytest.raises(ValueError, match="at least 2 samples of each class"):
        balanced_sample(np.ones(10), 4, seed=0)


def test_adistance_hook_logs_per_field_values(tiny_synth, tmp_path):
    res = train(cfg_for(tiny_synth), tmp_path / "r", hooks=[ADistanceProbe(rows=600, every=2)])
    rows = res.metrics
    assert [("adist_train" in r) for r in rows] == [True, False, True]  # evals 0, 1, 2
    fields = ["user_age", "user_gender", "item_ID", "item_cate", "scene_ID", "his_item_ID",
              "his_item_cate"]
    for split in ("train", "test"):
        for f in fields:
            assert -2.0 <= rows[-1][f"adist_{split}_{f}"] <= 2.0
    # at initialisation the embeddings carry no label information
    assert abs(rows[0]["adist_train"]) < 0.3


# ----------------------------------------------------------------------------- update norms


class Snapshots(Hook):
    """Parameters after every step, to recompute the updates independently."""

    def __init__(self):
        self.params = []

    def on_train_start(self, s):
        self.params.append({n: p.detach().clone() for n, p in s.model.named_parameters()})

    def after_step(self, s):
        self.params.append({n: p.detach().clone() for n, p in s.model.named_parameters()})


@pytest.mark.parametrize("optim", ["adam", "sgd"])
def test_update_norm_logger_matches_actual_parameter_change(tiny_synth, tmp_path, optim):
    snap = Snapshots()
    res = train(cfg_for(tiny_synth, "epochs=2", f"optim.name={optim}", "optim.lr=0.05"),
                tmp_path / "r", hooks=[snap, UpdateNormLogger()])
    u = read_updates(res.run_dir)
    assert list(u) == ["step", "epoch", "embedding", "fc1", "fc2", "fc3"]
    n_steps = 12  # 6000 rows / 1000 per batch x 2 epochs
    assert u["step"].tolist() == list(range(1, n_steps + 1))
    assert np.allclose(u["epoch"], np.arange(1, n_steps + 1) / 6)
    model = build(res_cfg := cfg_for(tiny_synth), prepare_data(res_cfg))[0]
    groups = layer_groups(model)
    for t in range(n_steps):
        before, after = snap.params[t], snap.params[t + 1]
        for g, names in groups.items():
            want = max(float((after[n] - before[n]).abs().max()) for n in names)
            assert u[g][t] == pytest.approx(want, rel=1e-4, abs=1e-9), (g, t)
    assert all(u[g].min() > 0 for g in groups)
    # each evaluation row carries the mean norm since the previous one
    last = res.metrics[-1]
    assert last["upd_fc1"] == pytest.approx(float(u["fc1"][-3:].mean()), rel=1e-5)


def test_first_adam_step_moves_every_layer_by_lr(tiny_synth):
    cfg = cfg_for(tiny_synth, "optim.lr=0.01")
    data = prepare_data(cfg)
    model, opt = build(cfg, data)
    opt.track_updates = True
    batch = Batcher(data.splits["train"], 512).get(np.arange(512))
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.label)
    loss.backward()
    opt.step()
    lin = opt.last_update_linf
    # Adam's first step is lr * g / (|g| + eps): the l-inf norm is lr for every tensor
    for name in ("embedding.weight", "mlp.fcs.0.weight", "mlp.fcs.2.bias"):
        assert lin[name] == pytest.approx(0.01, rel=1e-3)


# ----------------------------------------------------------------------------- freezing


@pytest.mark.parametrize("frozen,trained", [("embedding", "mlp"), ("mlp", "embedding")])
def test_continuing_with_a_frozen_group_keeps_it_bit_identical(tiny_synth, tmp_path, frozen,
                                                               trained):
    base = [*TINY, f"data.path={tiny_synth}", "epochs=2", "checkpoint_keep=0"]
    execute(RunSpec(str(tmp_path / "base"), base))
    ck1 = load_checkpoint(tmp_path / "base" / "checkpoints" / "epoch-001")["model"]
    out = tmp_path / f"only-{trained}"
    execute(RunSpec(str(out), [*base, f"freeze=[{frozen}]"],
                    continue_from=str(tmp_path / "base")))
    ck2 = load_checkpoint(out / "checkpoints" / "epoch-002")["model"]
    model = build(cfg := cfg_for(tiny_synth), prepare_data(cfg))[0]
    names = {g: [n for n, _ in model.named_parameters() if
                 (n.startswith("embedding.") if g == "embedding" else n.startswith("mlp."))]
             for g in ("embedding", "mlp")}
    for n in names[frozen]:
        assert torch.equal(ck1[n], ck2[n]), n
    assert any(not torch.equal(ck1[n], ck2[n]) for n in names[trained])
    # the continuation starts from the base's epoch 1: same first-epoch metrics
    from oneepoch.training.trainer import read_metrics
    a, b = read_metrics(tmp_path / "base"), read_metrics(out)
    k = [r["epoch"] for r in a].index(1.0)
    assert [r["test_auc"] for r in a[:k + 1]] == [r["test_auc"] for r in b[:k + 1]]
    assert b[-1]["epoch"] == 2.0


def test_freeze_via_init_from_keeps_embedding_bit_identical(tiny_synth, tmp_path):
    train(cfg_for(tiny_synth, "checkpoint_keep=0"), tmp_path / "a")
    ck = tmp_path / "a" / "checkpoints" / "epoch-001"
    train(cfg_for(tiny_synth, f"init_from={ck}", "freeze=[embedding]"), tmp_path / "b")
    w0 = load_checkpoint(ck)["model"]["embedding.weight"]
    w1 = load_checkpoint(tmp_path / "b" / "checkpoints" / "epoch-001")["model"]
    assert torch.equal(w0, w1["embedding.weight"])
    assert not torch.equal(load_checkpoint(ck)["model"]["mlp.fcs.0.weight"],
                           w1["mlp.fcs.0.weight"])
