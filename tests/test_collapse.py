"""Information abundance (embedding collapse) and its probe."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from oneepoch.probes.collapse import CollapseProbe, information_abundance, singular_values


def test_rank_one_table_is_one():
    rng = np.random.default_rng(0)
    e = np.outer(rng.standard_normal(1000), rng.standard_normal(16))
    assert information_abundance(e) == pytest.approx(1.0, abs=1e-6)
    assert information_abundance(torch.tensor(e, dtype=torch.float32)) == pytest.approx(
        1.0, abs=1e-5)


@pytest.mark.parametrize("dim", [1, 8, 32])
def test_orthogonal_table_equals_its_dimension(dim):
    rng = np.random.default_rng(dim)
    q, _ = np.linalg.qr(rng.standard_normal((500, dim)))  # orthonormal columns
    assert information_abundance(3.0 * q) == pytest.approx(dim, rel=1e-9)
    assert information_abundance(torch.from_numpy(q)) == pytest.approx(dim, rel=1e-9)


def test_matches_numpy_svd_with_chunks():
    rng = np.random.default_rng(1)
    e = (rng.standard_normal((3001, 12)) * np.logspace(0, -5, 12)).astype(np.float32)
    s = np.linalg.svd(e.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(singular_values(e, chunk_rows=256), s, rtol=1e-6, atol=1e-9)
    assert information_abundance(e, chunk_rows=100) == pytest.approx(s.sum() / s[0], rel=1e-10)
    assert np.isnan(information_abundance(np.zeros((5, 3))))
    with pytest.raises(ValueError, match="2-D"):
        information_abundance(np.zeros(5))


def test_probe_adds_one_figure_per_vocabulary():
    from oneepoch.models.embedding import FieldEmbedding
    from oneepoch.recipes.sweep import make_probe

    emb = FieldEmbedding({"item": 50, "cate": 6, "tiny": 2}, ["item", "cate", "item"],
                         n_single=2, dim=4)
    with torch.no_grad():  # collapse the item rows (1..49) onto one direction
        emb.weight[1:50] = torch.outer(torch.arange(1.0, 50.0), torch.ones(4))
    model = SimpleNamespace(embedding=emb)
    probe = make_probe("collapse:every=2")
    assert isinstance(probe, CollapseProbe)
    s = SimpleNamespace(model=model)
    probe.on_train_start(s)
    row: dict = {}
    probe.on_eval(s, row)
    assert set(row) == {"ia_item", "ia_cate"}  # "tiny" has one ID besides OOV: skipped
    assert row["ia_item"] == pytest.approx(1.0, abs=1e-5)
    assert row["ia_cate"] == pytest.approx(information_abundance(emb.weight[51:56]))
    assert 1.0 < row["ia_cate"] <= 4.0
    row2: dict = {}
    probe.on_eval(s, row2)  # every=2: second evaluation skipped
    assert set(row2) == {"ia_item", "ia_cate"} and np.isnan(row2["ia_item"])


def test_probe_in_a_training_run(tiny_synth, tmp_path):
    from oneepoch.config import TrainConfig, load_config
    from oneepoch.training.trainer import train

    cfg = load_config(TrainConfig, None, [
        f"data.path={tiny_synth}", f"out_dir={tmp_path}", "name=c", "progress=false",
        "threads=1", "batch_size=512", "eval.per_epoch=2", "epochs=1"])
    rows = train(cfg, hooks=[CollapseProbe()]).metrics
    assert len(rows) == 3 and all("ia_item_ID" in r for r in rows)
    dim = cfg.model.emb_dim
    assert all(1.0 <= r["ia_item_ID"] <= dim for r in rows)
