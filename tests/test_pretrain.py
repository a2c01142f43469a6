"""Engagement data, multi-surface synthetic world, stage-1 runs and stage-2 initialisation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from oneepoch.cli import main
from oneepoch.config import TrainConfig, load_config
from oneepoch.data.dataset import load_ctr, validate
from oneepoch.data.schema import DataError
from oneepoch.data.synthetic import SurfacesConfig, SynthConfig, write_multisurface
from oneepoch.embeddings import load_embeddings
from oneepoch.pretrain import PretrainConfig, pretrain
from oneepoch.pretrain.data import load_engagements, subsample_mask
from oneepoch.remedies import hooks_from_config
from oneepoch.remedies.early_stopping import select_hook
from oneepoch.training.checkpoint import list_checkpoints, load_checkpoint
from oneepoch.training.trainer import train

TINY = SurfacesConfig(world=SynthConfig(n_users=300, n_items=600, seed=1), n_train=1_500,
                      n_valid=500, n_test=500, engagement_ratio=5.0, n_heldout=500)
PRE = ["epochs=2", "batch_size=128", "loss.n_uniform=64", "model.dim=8", "threads=1",
       "progress=false", "eval.max_pairs=300", "eval.train_pairs=300", "eval.per_epoch=2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ms") / "world"
    write_multisurface(out, TINY)
    return out


@pytest.fixture(scope="module")
def export(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = load_config(PretrainConfig, "pretrain", [f"data.path={world / 'engagements'}", *PRE])
    res = pretrain(cfg, tmp_path_factory.mktemp("pt") / "run")
    assert res.export_dir is not None
    return res.export_dir


def test_multisurface_world_layout_and_coverage(world: Path):
    info = json.loads((world / "synth.json").read_text())
    assert info["engagements"]["train"] == 7_500  # ratio x one surface's train rows
    for s in ("homefeed", "related"):
        lines = validate(world / s)
        assert any("valid: 500 rows" in x for x in lines)
        data = load_ctr(world / s)
        assert data.fields[0] == "user_ID" and "item_ID" in data.fields
        assert 0 < info["coverage"][s]["tail_items_in_log"] <= 1
    # surfaces differ in popularity skew: related shows more distinct items
    n_items = {s: len(set(pq.read_table(world / s / "train.parquet")["item_ID"].to_pylist()))
               for s in ("homefeed", "related")}
    assert n_items["related"] > n_items["homefeed"]
    t = pq.read_table(world / "engagements" / "train.parquet")
    assert set(t.column("surface").to_pylist()) == {"homefeed", "related"}
    # valid / test come in requests of `slate` impressions of one user
    users = pq.read_table(world / "homefeed" / "test.parquet")["user_ID"].to_numpy()
    assert np.all(users.reshape(-1, TINY.slate) == users[::TINY.slate, None])


def test_cli_synth_surfaces(tmp_path: Path, capsys: pytest.CaptureFixture):
    rc = main(["data", "synth", "--surfaces", "homefeed,related", "--out", str(tmp_path / "d"),
               "--rows", "800", "--test-rows", "200", "--engagement-ratio", "3",
               "--set", "n_users=200", "n_items=400"])
    assert rc == 0
    assert "2,400 engagements" in capsys.readouterr().out
    assert main(["data", "synth", "--surfaces", "nope", "--out", str(tmp_path / "e")]) == 2


def test_load_engagements_vocab_holdout_and_surfaces(world: Path):
    d = load_engagements(world / "engagements")
    assert d.train_user.min() >= 1 and d.train_item.min() >= 1
    assert d.items.counts[0] >= d.items.counts[-1]  # frequency-ordered
    assert len(d.test_user) + d.heldout_unknown == 500
    assert d.item_freq().sum() == pytest.approx(1.0)
    h = load_engagements(world / "engagements", test_split="", holdout=0.1, seed=3)
    assert 0.05 < len(h.test_user) / 7_500 < 0.15
    only = load_engagements(world / "engagements", surfaces=["related"])
    assert len(only.train_user) < len(d.train_user)
    with pytest.raises(DataError, match="no engagements on \\['search'\\]"):
        load_engagements(world / "engagements", surfaces=["search"])
    with pytest.raises(DataError, match="format: engagements"):
        load_engagements(world / "homefeed")


def test_pretrain_run_outputs_and_determinism(world: Path, export: Path, tmp_path: Path):
    run = export.parent
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [round(r["epoch"], 1) for r in rows] == [0.0, 0.5, 1.0, 1.5, 2.0]
    for key in ("test_hit@3", "test_recall@50", "test_ndcg@3", "test_full_loss",
                "test_sampled_loss", "train_hit@3", "tau"):
        assert key in rows[-1]
    assert rows[-1]["test_hit@50"] > rows[0]["test_hit@50"]  # it learns something
    emb = load_embeddings(export)
    assert emb.meta["loss"] == "contrastive" and emb.meta["dim"] == 8
    assert "test_hit@3" in emb.meta["eval"]
    cfg = load_config(PretrainConfig, "pretrain", [f"data.path={world / 'engagements'}", *PRE])
    again = pretrain(cfg, tmp_path / "again")
    assert torch.equal(load_embeddings(again.export_dir).item.weight, emb.item.weight)


def _timeless(rows):
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "pairs_per_s")} for r in rows]


def test_pretrain_resume_is_identical(world: Path, tmp_path: Path):
    over = [f"data.path={world / 'engagements'}", *PRE, "loss.type=contrastive"]
    full = pretrain(load_config(PretrainConfig, "pretrain", over), tmp_path / "full")
    half = pretrain(load_config(PretrainConfig, "pretrain", [*over, "epochs=1"]),
                    tmp_path / "half")
    assert [p.name for p in list_checkpoints(tmp_path / "half")] == ["epoch-001"]
    ck = load_checkpoint(tmp_path / "half" / "checkpoints" / "epoch-001")
    assert ck["epoch"] == 1 and _timeless(ck["rows"]) == _timeless(half.metrics)
    assert ck["optim"]["sparse"]["item_weight"]["step_count"] == ck["step"] > 0
    # settings that do not fit the checkpoint are refused
    with pytest.raises(ValueError, match="cannot resume"):
        pretrain(load_config(PretrainConfig, "pretrain", [*over, "model.dim=4"]),
                 tmp_path / "half", resume=True)
    # the CLI continues from RUN_DIR/config.yaml, to 2 epochs
    assert main(["pretrain", "--resume", str(tmp_path / "half"), "epochs=2"]) == 0
    assert [p.name for p in list_checkpoints(tmp_path / "half")] == ["epoch-002"]
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "epoch-002")
    b = load_checkpoint(tmp_path / "half" / "checkpoints" / "epoch-002")
    for k in a["model"]:  # tables and temperature
        assert torch.equal(a["model"][k], b["model"][k]), k
    for table, st in a["optim"]["sparse"].items():  # row-wise Adam moments and step counts
        for k, v in st.items():
            got = b["optim"]["sparse"][table][k]
            assert torch.equal(v, got) if torch.is_tensor(v) else v == got, (table, k)
    ea, eb = load_embeddings(full.export_dir), load_embeddings(tmp_path / "half" / "embeddings")
    assert torch.equal(ea.user.weight, eb.user.weight)
    assert torch.equal(ea.item.weight, eb.item.weight)
    rows = pq.read_table(tmp_path / "half" / "metrics.parquet").to_pylist()
    assert len(rows) == 5 and _timeless(rows) == _timeless(full.metrics)
    assert ea.meta["temperature"] == eb.meta["temperature"]


@pytest.mark.parametrize("loss", ["bce", "contrastive-normalized-logq"])
def test_pretrain_variants_run(world: Path, tmp_path: Path, loss: str):
    extra = (["loss.type=bce"] if loss == "bce" else
             ["model.normalize=true", "loss.logq=true", "loss.in_batch=false",
              "loss.temperature=0.05", "loss.tau_min=0.02", "loss.tau_max=0.06"])
    cfg = load_config(PretrainConfig, "pretrain", [f"data.path={world / 'engagements'}", *PRE,
                                                   "epochs=1", "export=false", *extra])
    res = pretrain(cfg, tmp_path / loss)
    assert res.export_dir is None and np.isfinite(res.metrics[-1]["train_loss"])
    if loss != "bce":
        assert 0.02 - 1e-6 <= res.metrics[-1]["tau"] <= 0.06 + 1e-6


def _downstream(world: Path, run: Path, *extra: str):
    cfg = load_config(TrainConfig, "ctr", [
        f"data.path={world / 'homefeed'}", "data.test_split=valid", "model.emb_dim=8",
        "epochs=2", "eval.per_epoch=1", "threads=1", "progress=false", "batch_size=128",
        "eval.train_rows=500", *extra])
    return train(cfg, run, hooks=hooks_from_config(cfg))


def _id_rows(data, model, vocab, emb):
    start = model.embedding.rows(vocab).start + 1
    found = emb.rows_of(data.vocabs[vocab].raw) > 0
    return torch.from_numpy(np.flatnonzero(found) + start)


def test_frozen_rows_bit_identical_and_finetune_moves_them(world: Path, export: Path,
                                                            tmp_path: Path):
    emb = load_embeddings(export)
    data = load_ctr(world / "homefeed", ["train", "valid"])
    res = _downstream(world, tmp_path / "frozen", f"init.embeddings={export}", "init.mode=frozen")
    init = json.loads((res.run_dir / "init.json").read_text())
    assert init["vocabularies"]["item_ID"]["matched"] > 0
    assert init["vocabularies"]["user_ID"]["table"] == "user"
    w = load_checkpoint(res.run_dir / "checkpoints" / "epoch-002")["model"]["embedding.weight"]
    from oneepoch.models.ctr import build_model
    model = build_model(load_config(TrainConfig, None, ["model.emb_dim=8"]).model,
                        data.vocab_sizes, [data.field_vocab(f) for f in data.fields],
                        len(data.single_fields))
    for vocab, table in (("item_ID", emb.item), ("user_ID", emb.user)):
        rows = _id_rows(data, model, vocab, table)
        assert len(rows) > 0
        expect = table.weight[torch.from_numpy(table.rows_of(data.vocabs[vocab].raw))]
        expect = expect[table.rows_of(data.vocabs[vocab].raw) > 0]
        assert torch.equal(w[rows], expect)  # frozen: bit-identical after 2 epochs
    res2 = _downstream(world, tmp_path / "ft", f"init.embeddings={export}", "init.mode=finetune")
    w2 = load_checkpoint(res2.run_dir / "checkpoints" / "epoch-002")["model"]["embedding.weight"]
    rows = _id_rows(data, model, "item_ID", emb.item)
    assert not torch.equal(w2[rows], w[rows])  # fine-tuned rows move


def test_init_errors_name_the_setting(world: Path, export: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="model.emb_dim=8"):
        _downstream(world, tmp_path / "a", f"init.embeddings={export}", "model.emb_dim=4")
    with pytest.raises(ValueError, match="init.mode"):
        _downstream(world, tmp_path / "b", f"init.embeddings={export}", "init.mode=thaw")
    with pytest.raises(ValueError, match="init.item_fields: field 'nope'"):
        _downstream(world, tmp_path / "c", f"init.embeddings={export}", "init.item_fields=nope")


def test_single_stage_adds_the_contrastive_term(world: Path, tmp_path: Path):
    base = _downstream(world, tmp_path / "base", "epochs=1")
    ss = _downstream(world, tmp_path / "ss", "epochs=1", "single_stage.weight=0.5")
    assert "single_stage_tau" in ss.metrics[-1]
    assert ss.metrics[-1]["train_loss"] > base.metrics[-1]["train_loss"]  # BCE + 0.5 x CL
    with pytest.raises(ValueError, match="sequence"):
        _downstream(world, tmp_path / "x", "single_stage.weight=0.5",
                    "single_stage.item_field=his_item_ID")


def test_pretrain_cli(world: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    rc = main(["pretrain", f"data.path={world / 'engagements'}", *PRE, "epochs=1",
               f"out_dir={tmp_path}", "name=cli", "select.metric=test_full_loss"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "held-out Hit@3" in out and "init.embeddings=" in out
    assert "exported the point selected on test_full_loss" in out
    assert (tmp_path / "cli" / "embeddings" / "item.safetensors").exists()
    assert main(["pretrain", "data.path=", "epochs=1"]) == 2
    assert main(["pretrain", f"data.path={world / 'engagements'}", "loss.type=hinge"]) == 2


def test_string_ids_engagements(tmp_path: Path):
    d = tmp_path / "eng"
    d.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 400), ("test", 50)):
        pq.write_table(pa.table({"u": [f"u{x}" for x in rng.integers(0, 30, n)],
                                 "i": [f"i{x}" for x in rng.integers(0, 60, n)]}),
                       d / f"{split}.parquet")
    (d / "schema.yaml").write_text("format: engagements\nuser: u\nitem: i\nsplits:\n"
                                   "  train: train.parquet\n  test: test.parquet\n")
    cfg = load_config(PretrainConfig, "pretrain", [f"data.path={d}", *PRE, "epochs=1"])
    res = pretrain(cfg, tmp_path / "run")
    emb = load_embeddings(res.export_dir)
    assert emb.item.rows_of(["i3", "zzz"]).tolist()[1] == 0


def test_low_coverage_export_warns(world: Path, tmp_path: Path):
    from oneepoch.data.dataset import vocab_from_values
    from oneepoch.embeddings import export_embeddings

    data = load_ctr(world / "homefeed", ["train"])
    uv = data.vocabs["user_ID"]
    iv = vocab_from_values("item", data.vocabs["item_ID"].raw.slice(0, 5))  # 5 items only
    path = export_embeddings(tmp_path / "emb", torch.zeros(uv.size, 8), torch.ones(iv.size, 8),
                             uv, iv, {"dim": 8})
    with pytest.warns(UserWarning, match="item_ID IDs .* occur in the pre-training log"):
        res = _downstream(world, tmp_path / "run", f"init.embeddings={path}", "epochs=1")
    rep = json.loads((res.run_dir / "init.json").read_text())["vocabularies"]
    assert rep["item_ID"]["matched"] == 5 and rep["user_ID"]["unseen"] == 0


SELECT = ["epochs=6", "eval.per_epoch=1", "checkpoint_keep=0", "optim.lr=0.05",
          "loss.n_uniform=16", "model.dim=16"]


def _tables_of(ck_dir: Path, cfg: PretrainConfig, data) -> tuple[torch.Tensor, torch.Tensor]:
    """Scoring tables of the model saved in ``ck_dir`` (as the export writes them)."""
    from oneepoch.pretrain.model import TwoTower

    mc, lc = cfg.model, cfg.loss
    m = TwoTower(data.n_users, data.n_items, mc.dim, mc.init_std, mc.normalize,
                 lc.temperature, lc.learn_temperature, lc.tau_min, lc.tau_max)
    m.load_state_dict(load_checkpoint(ck_dir)["model"])
    return m.tables()


@pytest.mark.parametrize("metric", ["test_hit@3", "test_full_loss"])
def test_select_exports_the_best_epoch_bitwise(world: Path, tmp_path: Path, metric: str):
    over = [f"data.path={world / 'engagements'}", *PRE, *SELECT, "data.subsample=0.3"]
    cfg = load_config(PretrainConfig, "pretrain", [*over, f"select.metric={metric}"])
    with pytest.raises(ValueError, match="select.metric: set, but no hook"):
        pretrain(cfg, tmp_path / "nohook")
    res = pretrain(cfg, tmp_path / "run", hooks=[select_hook(cfg)])
    sign = -1 if metric.endswith("loss") else 1
    ends = [r for r in res.metrics if r["step"] > 0]
    best = max(res.metrics, key=lambda r: sign * r[metric])  # first best on ties
    assert 0 < best["epoch"] < 6, "the setting must overfit for this test to mean anything"
    emb = load_embeddings(res.export_dir)
    sel = emb.meta["selected"]
    assert sel == {"epoch": best["epoch"], "step": best["step"], "metric": metric,
                   "value": best[metric], "stopped_early": False}
    assert emb.meta["eval"][metric] == best[metric]
    assert json.loads((res.run_dir / "summary.json").read_text())["selected"] == sel
    data = load_engagements(world / "engagements", subsample=0.3)
    ck = res.run_dir / "checkpoints" / f"epoch-{round(best['epoch']):03d}"
    u, v = _tables_of(ck, cfg, data)
    assert torch.equal(emb.user.weight, u) and torch.equal(emb.item.weight, v)
    u, v = _tables_of(res.run_dir / "checkpoints" / "final", cfg, data)
    assert torch.equal(emb.item.weight, v)
    last_u, last_v = _tables_of(res.run_dir / "checkpoints" / "epoch-006", cfg, data)
    assert not torch.equal(emb.item.weight, last_v)  # not the last epoch's tables
    # off: the export is the last epoch's tables
    plain = pretrain(load_config(PretrainConfig, "pretrain", over), tmp_path / "plain")
    e2 = load_embeddings(plain.export_dir)
    assert e2.meta["selected"]["metric"] == "last" and e2.meta["selected"]["epoch"] == 6
    assert torch.equal(e2.item.weight, last_v)
    assert len(ends) == 6


def test_select_patience_stops_and_resume_keeps_the_choice(world: Path, tmp_path: Path):
    over = [f"data.path={world / 'engagements'}", *PRE, *SELECT, "data.subsample=0.3",
            "select.metric=test_hit@3"]
    def run(extra, where, resume=False):
        cfg = load_config(PretrainConfig, "pretrain", [*over, *extra])
        return pretrain(cfg, where, resume=resume, hooks=[select_hook(cfg)])

    full = run(["select.patience=1"], tmp_path / "stop")
    sel = full.selected
    assert sel["stopped_early"] and full.metrics[-1]["epoch"] == sel["epoch"] + 1
    # resumed halfway, the selection (best tables kept in the checkpoint) is the same
    run(["epochs=3"], tmp_path / "half")
    again = run([], tmp_path / "half", resume=True)
    whole = run([], tmp_path / "whole")
    assert again.selected == whole.selected
    assert torch.equal(load_embeddings(again.export_dir).item.weight,
                       load_embeddings(whole.export_dir).item.weight)


def test_select_settings_are_checked(world: Path):
    from oneepoch.config import ConfigError

    with pytest.raises(ConfigError, match="select.metric"):
        load_config(PretrainConfig, "pretrain", ["select.metric=train_hit@3"])
    with pytest.raises(ConfigError, match="K=5 in eval.ks"):
        load_config(PretrainConfig, "pretrain", ["select.metric=test_hit@5"])
    with pytest.raises(ConfigError, match="data.subsample"):
        load_config(PretrainConfig, "pretrain", ["data.subsample=0"])


def test_subsample_keeps_the_heldout_split(world: Path):
    full = load_engagements(world / "engagements")
    sub = load_engagements(world / "engagements", subsample=0.1)
    assert len(sub.train_user) == round(0.1 * len(full.train_user))
    # the held-out pairs, the vocabularies and the catalogue are unchanged
    assert np.array_equal(sub.test_user, full.test_user)
    assert np.array_equal(sub.test_item, full.test_item)
    assert sub.heldout_unknown == full.heldout_unknown
    assert sub.items.raw.equals(full.items.raw) and sub.users.raw.equals(full.users.raw)
    # the training pairs are a subset (fixed draw, independent of the seed), counts follow it
    keep = subsample_mask(len(full.train_item), 0.1)
    assert np.array_equal(sub.train_user, full.train_user[keep])
    assert np.array_equal(sub.train_item, full.train_item[keep])
    again = load_engagements(world / "engagements", subsample=0.1, seed=5)
    assert np.array_equal(again.train_item, sub.train_item)
    assert sub.items.counts.sum() == len(sub.train_item)
    assert np.array_equal(np.bincount(sub.train_item, minlength=sub.n_items)[1:],
                          sub.items.counts)
    # nested: the 10% sample lies inside the 30% one (same rows, in order)
    assert (keep <= subsample_mask(len(full.train_item), 0.3)).all()
    # with a held-out share carved out of train, the carved pairs do not move either
    h = load_engagements(world / "engagements", test_split="", holdout=0.1, seed=3)
    hs = load_engagements(world / "engagements", test_split="", holdout=0.1, seed=3,
                          subsample=0.2)
    assert np.array_equal(h.test_user, hs.test_user) and np.array_equal(h.test_item,
                                                                        hs.test_item)
