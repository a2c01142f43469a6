"""The base model's one-call training step (training/fused.py, native.c ctr_step) against the
autograd path: same numbers within float tolerance, the same at any thread count, and every
setting it does not cover trained through autograd."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from conftest import train_metrics
from oneepoch import kernels
from oneepoch.config import TrainConfig, load_config
from oneepoch.data.batcher import Batch, Batcher
from oneepoch.training.fused import FusedStep, sgemm_address
from oneepoch.training.trainer import Hook, build, epoch_order, prepare_data

pytestmark = pytest.mark.skipif(not kernels.available() or sgemm_address() is None,
                                reason="no native kernels or no sgemm_ in this PyTorch")


def _setup(path, *over):
    cfg = load_config(TrainConfig, "ctr", [f"data.path={path}", "batch_size=600", *over])
    data = prepare_data(cfg)
    return cfg, data, data.splits["train"]


def _autograd_step(model, opt, batch):
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.label)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def _state(model, opt):
    """Every tensor a step changes: parameters, Dice running statistics, both Adam states."""
    out = {f"p.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    ro = opt.sparse["embedding.weight"]
    out.update({f"row.{k}": v.clone() for k, v in ro.state.items()})
    for i, p in enumerate(opt.dense_params):
        for k, v in opt.dense.state[p].items():
            out[f"dense{i}.{k}"] = v.clone()
    return out


def test_matches_autograd_path(tiny_synth):
    # batch 600 = chunks of 256, 256 and 88 rows; weight decay on both optimizers
    cfg, data, tr = _setup(tiny_synth, "optim.weight_decay=1e-4")
    (m1, o1), (m2, o2) = build(cfg, data), build(cfg, data)
    m1.train(), m2.train()
    batcher = Batcher(tr, cfg.batch_size)
    fast = FusedStep.build(m2, o2, batcher)
    assert fast is not None
    order = epoch_order(len(tr), 0, "every", 0)
    for rows in list(batcher.epoch_rows(order))[:8]:
        ref = _autograd_step(m1, o1, batcher.get(rows))
        assert abs(fast(rows) - ref) < 1e-5
    assert o2.sparse["embedding.weight"].step_count == o1.sparse["embedding.weight"].step_count
    s1, s2 = _state(m1, o1), _state(m2, o2)
    assert s1.keys() == s2.keys()
    for k in s1:  # Adam's first steps amplify float rounding of tiny gradients a little
        torch.testing.assert_close(s2[k], s1[k], rtol=1e-3, atol=2e-5, msg=k)


def _random_batch(emb, bsz, seed, max_len=(6, 4)):
    g = torch.Generator().manual_seed(seed)
    sizes = [emb.vocab_sizes[v] for v in emb.field_vocabs]
    ids = torch.stack([torch.randint(0, n, (bsz,), generator=g) for n in sizes[:emb.n_single]], 1)
    seqs = [torch.randint(0, sizes[emb.n_single + k], (bsz, L), generator=g)
            for k, L in enumerate(max_len)]
    lens = [torch.randint(0, L + 1, (bsz,), generator=g) for L in max_len]
    lens[0][:5] = 0  # empty sequences pool to zeros and get no gradient
    return Batch(ids, seqs, lens, (torch.rand(bsz, generator=g) < 0.4).float())


def _small_model():
    from oneepoch.config import ModelConfig, OptimConfig
    from oneepoch.models.ctr import build_model
    from oneepoch.training.optim import build_optimizer

    torch.manual_seed(0)
    vocab = {"user": 50, "item": 300, "cate": 20}
    model = build_model(ModelConfig(hidden=[32, 16, 8], emb_init_std=0.1), vocab,
                        ["user", "item", "cate", "item", "cate"], n_single=3)
    model.train()
    return model, build_optimizer(model, OptimConfig(lr=1e-2))


def test_step_batch_with_empty_sequences_three_hidden_layers_and_row_lr():
    (m1, o1), (m2, o2) = _small_model(), _small_model()
    row_lr = torch.linspace(0.1, 2.0, m1.embedding.table_rows)
    row_lr[:60] = 0.0  # frozen rows (paper B's frozen two-stage)
    for o in (o1, o2):
        o.sparse["embedding.weight"].row_lr = row_lr
    start = m2.embedding.weight.detach().clone()
    fast = FusedStep(m2, o2, batch_size=300, seq_lens=[6, 4])
    for seed in range(5):
        batch = _random_batch(m1.embedding, 300 - seed * 37, seed)  # 2 chunks, then 1
        ref = _autograd_step(m1, o1, batch)
        assert abs(fast.step_batch(batch) - ref) < 1e-5
    s1, s2 = _state(m1, o1), _state(m2, o2)
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k], rtol=1e-3, atol=2e-5, msg=k)
    w = m2.embedding.weight.detach()
    assert torch.equal(w[:60], start[:60])
    assert (w[60:] != start[60:]).any(dim=1).sum() > 100  # the rows the batches hit moved


def test_same_numbers_at_any_thread_count(tiny_synth):
    cfg, data, tr = _setup(tiny_synth, "batch_size=1024")
    before = torch.get_num_threads()
    states = []
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            model, opt = build(cfg, data)
            model.train()
            batcher = Batcher(tr, 1024)
            fast = FusedStep.build(model, opt, batcher)
            losses = [fast(r) for r in batcher.epoch_rows(epoch_order(len(tr), 0, "every", 0))
                      if len(r) > 1]
            states.append((losses, _state(model, opt)))
    finally:
        torch.set_num_threads(before)
    for losses, st in states[1:]:
        assert losses == states[0][0]
        for k in st:
            assert torch.equal(st[k], states[0][1][k]), k


def test_memory_mapped_split_gives_the_same_steps(tiny_synth, tmp_path):
    cfg, data, tr = _setup(tiny_synth)

    def mm(name, a):
        out = np.memmap(tmp_path / name, dtype=a.dtype, mode="w+", shape=a.shape)
        out[:] = a
        return out

    mapped = dataclasses.replace(
        tr, ids=mm("ids", tr.ids), seqs=[mm(f"s{i}", q) for i, q in enumerate(tr.seqs)],
        lens=[mm(f"n{i}", n) for i, n in enumerate(tr.lens)])
    runs = []
    for split in (tr, mapped):
        model, opt = build(cfg, data)
        model.train()
        batcher = Batcher(split, cfg.batch_size)
        fast = FusedStep.build(model, opt, batcher)
        order = epoch_order(len(tr), 0, "every", 0)
        runs.append(([fast(r) for r in list(batcher.epoch_rows(order))[:4]],
                     model.embedding.weight.detach().clone()))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


def test_out_of_range_id_is_a_clear_error_and_changes_nothing():
    model, opt = _small_model()
    fast = FusedStep(model, opt, batch_size=64, seq_lens=[6, 4])
    batch = _random_batch(model.embedding, 64, 0)
    batch.seqs[0][3, 0], batch.lens[0][3] = 10_000, 2
    before = _state(model, opt)
    with pytest.raises(IndexError, match=r"field 3 \('item' vocabulary.*10000"):
        fast.step_batch(batch)
    after = _state(model, opt)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert bool((model.embedding._slot32 == -1).all())


def test_ids_beyond_int32_are_refused_not_wrapped():
    # 2^32 + 5 would read row 5 if narrowed to the kernels' int32 naively
    model, opt = _small_model()
    fast = FusedStep(model, opt, batch_size=64, seq_lens=[6, 4])
    batch = _random_batch(model.embedding, 64, 0)
    batch.seqs[0][3, 0], batch.lens[0][3] = 2**32 + 5, 2
    before = _state(model, opt)
    with pytest.raises(IndexError, match=str(2**32 + 5)):
        fast.step_batch(batch)
    with pytest.raises(IndexError, match=str(2**32 + 5)):  # the autograd path's native pooling
        model(batch)
    after = _state(model, opt)
    for k in before:
        assert torch.equal(before[k], after[k]), k


@pytest.mark.parametrize("field, value", [(0, 60), (1, -1)])
def test_an_id_outside_its_field_is_refused_on_every_path(field, value):
    # field 0's vocabulary has 50 rows: ID 60 would read field 1's rows, -1 in field 1 the
    # last row of field 0's; every path must refuse them, not pool a neighbour's rows
    model, opt = _small_model()
    fast = FusedStep(model, opt, batch_size=64, seq_lens=[6, 4])
    batch = _random_batch(model.embedding, 64, 0)
    batch.ids[5, field] = value
    msg = rf"field {field} .*has ID {value}"
    with pytest.raises(IndexError, match=msg):
        fast.step_batch(batch)
    with pytest.raises(IndexError, match=msg):  # native pooling (autograd step)
        model(batch)
    model.embedding.fused = False
    with pytest.raises(IndexError, match=msg):  # plain torch embedding_bag
        model(batch)
    model.eval()
    with torch.no_grad(), pytest.raises(IndexError, match=msg):  # native forward
        model(batch)


def test_settings_it_does_not_cover_say_why(tiny_synth):
    class AddsLoss(Hook):
        def on_loss(self, s, batch, logits, loss):
            return loss

    cases = {"model.activation=relu": "Dice", "model.dropout=0.1": "dropout",
             "optim.name=sgd": "optimizer", "freeze=[embedding]": "frozen"}
    for over, reason in cases.items():
        cfg, data, tr = _setup(tiny_synth, over)
        model, opt = build(cfg, data)
        assert reason in (FusedStep.why_not(model, opt, Batcher(tr, 600)) or ""), over
    cfg, data, tr = _setup(tiny_synth)
    model, opt = build(cfg, data)
    assert FusedStep.why_not(model, opt, Batcher(tr, 600)) is None
    assert "hook" in FusedStep.why_not(model, opt, Batcher(tr, 600), [AddsLoss()])
    opt.track_updates = True
    assert "update norms" in FusedStep.why_not(model, opt, Batcher(tr, 600))
    with pytest.raises(ValueError, match="does not apply: update norms"):
        FusedStep(model, opt, 600, [q.shape[1] for q in tr.seqs])


def test_tables_beyond_int32_rows_take_the_autograd_path(tiny_synth, monkeypatch):
    cfg, data, tr = _setup(tiny_synth)
    model, opt = build(cfg, data)
    monkeypatch.setattr(type(model.embedding), "table_rows", property(lambda self: 2**31))
    assert "2^31" in (FusedStep.why_not(model, opt, Batcher(tr, 600)) or "")


def test_train_through_the_fused_step_matches_autograd(tiny_synth, tmp_path, monkeypatch):
    fused = train_metrics(tiny_synth, tmp_path, "fused", epochs=2)
    monkeypatch.setenv("ONEEPOCH_FUSED", "0")
    ref = train_metrics(tiny_synth, tmp_path, "autograd", epochs=2)
    for a, b in zip(fused, ref, strict=True):
        assert a["step"] == b["step"]
        for k in ("test_auc", "test_logloss", "train_auc", "train_loss"):
            if a[k] is not None:
                assert abs(a[k] - b[k]) < 5e-4, (k, a[k], b[k])


def test_fused_forward_matches_the_model_in_eval_mode(tiny_synth, tmp_path):
    from oneepoch.training.fused import FusedForward
    from oneepoch.training.trainer import predict

    cfg, data, tr = _setup(tiny_synth, "model.dropout=0.2")  # dropout is off in eval mode
    model, opt = build(cfg, data)
    model.train()
    batcher = Batcher(tr, 256)
    for rows in list(batcher.epoch_rows(epoch_order(len(tr), 0, "every", 0)))[:5]:
        _autograd_step(model, opt, batcher.get(rows))  # moves the weights and running stats
    assert FusedForward.why_not(model) is None
    rows = np.random.default_rng(0).permutation(len(tr))[:1000]  # 4 chunks, the last short
    got = FusedForward(model).predict(batcher, rows)
    model.eval()
    with torch.no_grad():
        ref = torch.sigmoid(model(batcher.get(rows))).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert model.training is False  # untouched by predict
    model.train()
    np.testing.assert_allclose(predict(model, batcher, rows), ref, rtol=1e-5, atol=1e-6)
    assert model.training  # predict's fast path leaves the mode alone
    mapped = dataclasses.replace(tr, ids=np.memmap(tmp_path / "ids", dtype=tr.ids.dtype,
                                                   mode="w+", shape=tr.ids.shape))
    mapped.ids[:] = tr.ids
    got_mm = FusedForward(model).predict(Batcher(mapped, 300), rows)
    np.testing.assert_allclose(got_mm, ref, rtol=1e-5, atol=1e-6)


def test_fused_forward_bad_id_names_the_field():
    from oneepoch.training.fused import FusedForward

    model, _ = _small_model()
    batch = _random_batch(model.embedding, 50, 0)
    batch.ids[7, 1] = 999
    split = type("Split", (), {})()
    b = Batcher.__new__(Batcher)
    b._arrays, b._label_t, b.batch_size = (batch.ids, batch.seqs, batch.lens), batch.label, 50
    b.split = split
    with pytest.raises(IndexError, match=r"field 1 \('item' vocabulary.*999"):
        FusedForward(model).predict(b, np.arange(50))


def test_steps_in_one_call_give_the_numbers_of_one_call_each(tiny_synth):
    cfg, data, tr = _setup(tiny_synth)
    order = epoch_order(len(tr), 0, "every", 0)[:600 * 5 + 250]  # 6 batches, the last short
    runs = []
    for grouped in (False, True):
        model, opt = build(cfg, data)
        model.train()
        batcher = Batcher(tr, 600)
        fast = FusedStep.build(model, opt, batcher)
        if grouped:  # 2 + 4 batches
            losses = [*fast.steps(order[:1200]), *fast.steps(order[1200:])]
        else:
            losses = [fast(r) for r in batcher.epoch_rows(order)]
        runs.append((losses, _state(model, opt), opt.sparse["embedding.weight"].step_count))
    assert len(runs[0][0]) == 6 and runs[1][0] == runs[0][0]
    assert runs[1][2] == runs[0][2] == 6
    for k in runs[0][1]:
        assert torch.equal(runs[1][1][k], runs[0][1][k]), k
    with pytest.raises(ValueError, match="last batch has 1 row"):
        fast.steps(order[:601])


def test_a_bad_batch_inside_steps_keeps_the_ones_before(tiny_synth):
    cfg, data, tr = _setup(tiny_synth)
    model, opt = build(cfg, data)
    model.train()
    batcher = Batcher(tr, 600)
    fast = FusedStep.build(model, opt, batcher)
    order = epoch_order(len(tr), 0, "every", 0)[:600 * 4]
    fast.steps(order[:1200])  # two good batches
    ref_model, ref_opt = build(cfg, data)
    ref_model.load_state_dict(model.state_dict())
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # not sharing the moments
    ref_fast = FusedStep.build(ref_model, ref_opt, Batcher(tr, 600))
    ref_fast(order[1200:1800])  # what the first batch of the next call does on its own
    after_one = _state(ref_model, ref_opt)
    batcher._arrays[0][order[1900], 0] = 10**7  # batch 2 of the next call: an unknown ID
    with pytest.raises(IndexError, match="10000000"):
        fast.steps(order[1200:])
    assert opt.sparse["embedding.weight"].step_count == 3
    got = _state(model, opt)
    for k in after_one:
        assert torch.equal(got[k], after_one[k]), k
    assert bool((model.embedding._slot32 == -1).all())


def test_train_runs_steps_in_one_call_with_the_same_metrics(tiny_synth, tmp_path,
                                                           monkeypatch):
    from oneepoch.training.trainer import train

    class PerStep(Hook):  # a hook acting after every step: one native call per step
        def after_step(self, s):
            pass

    calls: list[int] = []
    steps = FusedStep.steps
    monkeypatch.setattr(FusedStep, "steps", lambda self, r: calls.append(len(r)) or steps(self, r))
    rows, most = [], []
    for name, hooks in (("bulk", ()), ("per-step", (PerStep(),))):
        calls.clear()
        cfg = load_config(TrainConfig, None, [
            f"data.path={tiny_synth}", f"out_dir={tmp_path}", f"name={name}", "progress=false",
            "threads=1", "batch_size=256", "eval.per_epoch=3", "epochs=2"])
        rows.append([{k: v for k, v in r.items() if k != "elapsed_s"}
                     for r in train(cfg, hooks=hooks).metrics])
        most.append(max(calls))
    assert most[0] > 4 * 256 and most[1] <= 256  # several steps a call, then one
    assert len(rows[0]) >= 6 and rows[0] == rows[1]
