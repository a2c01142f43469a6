"""Export / load round trip and raw-ID alignment of pre-trained embeddings."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from oneepoch.data.dataset import vocab_from_values
from oneepoch.embeddings import export_embeddings, load_embeddings


def _export(tmp_path, user_raw, item_raw, dim=4):
    uv = vocab_from_values("user", pa.array(user_raw))
    iv = vocab_from_values("item", pa.array(item_raw))
    g = torch.Generator().manual_seed(0)
    uw = torch.randn(uv.size, dim, generator=g)
    iw = torch.randn(iv.size, dim, generator=g)
    path = export_embeddings(tmp_path / "embeddings", uw, iw, uv, iv,
                             {"dim": dim, "temperature": 0.1, "loss": "contrastive"})
    return path, uv, iv, uw, iw


def test_round_trip_is_exact(tmp_path):
    path, uv, iv, uw, iw = _export(tmp_path, [5, 5, 9, 2], [10, 11, 10, 12, 13])
    emb = load_embeddings(path)
    assert torch.equal(emb.user.weight, uw) and torch.equal(emb.item.weight, iw)
    assert emb.item.vocab.raw.to_pylist() == iv.raw.to_pylist()
    meta = json.loads((path / "meta.json").read_text())
    assert meta["dim"] == 4 and meta["users"] == 3 and meta["items"] == 4
    assert sorted(p.name for p in path.iterdir()) == [
        "item.safetensors", "item_vocab.parquet", "meta.json", "user.safetensors",
        "user_vocab.parquet"]
    assert not list(tmp_path.glob(".embeddings.tmp-*"))  # atomic: no temp folder left


def test_alignment_reordered_and_unseen_ids(tmp_path):
    path, _, iv, _, iw = _export(tmp_path, [1], [10, 11, 10, 12, 13])
    emb = load_embeddings(path)
    target = torch.nn.Embedding(6, 4)
    torch.nn.init.constant_(target.weight, 7.0)
    # my model's vocabulary: a different order, two unseen IDs and an OOV row 0
    mine = [13, 99, 10, 12, 98]
    rep = emb.item.init(target, mine, offset=1)
    assert (rep.matched, rep.unseen) == (3, 2)
    raw = iv.raw.to_pylist()
    for r, rid in enumerate(mine, start=1):
        if rid in raw:
            assert torch.equal(target.weight[r], iw[raw.index(rid) + 1])
        else:
            assert torch.all(target.weight[r] == 7.0)  # fresh init kept
    assert torch.all(target.weight[0] == 7.0)  # rows before offset untouched


def test_string_ids_nulls_and_scale(tmp_path):
    path, _, iv, _, iw = _export(tmp_path, ["u1"], ["a", "b", "b"])
    emb = load_embeddings(path)
    w = torch.zeros(3, 4)
    rep = emb.item.init(w, pa.array(["b", None, "zz"]), scale=2.0)
    assert (rep.matched, rep.unseen, rep.skipped) == (1, 1, 1)
    assert torch.equal(w[0], 2.0 * iw[iv.raw.to_pylist().index("b") + 1])
    vecs, found = emb.item.lookup(["a", "nope"])
    assert found.tolist() == [True, False] and torch.all(vecs[1] == 0)


def test_errors_name_the_problem(tmp_path):
    path, *_ = _export(tmp_path, [1, 2], [3, 4])
    emb = load_embeddings(path)
    with pytest.raises(ValueError, match="dim 4.*dim 8"):
        emb.item.init(torch.nn.Embedding(5, 8), [3, 4])
    with pytest.raises(ValueError, match="do not fit"):
        emb.item.init(torch.zeros(2, 4), [3, 4, 5])
    with pytest.raises(FileNotFoundError, match="not an embeddings export"):
        load_embeddings(tmp_path)
    uv = vocab_from_values("user", pa.array([1]))
    with pytest.raises(ValueError, match="rows"):
        export_embeddings(tmp_path / "x", torch.zeros(5, 2), torch.zeros(2, 2), uv, uv, {})


def test_int_ids_cast_from_numpy(tmp_path):
    path, *_ = _export(tmp_path, [1], np.array([100, 200, 300]))
    emb = load_embeddings(path)
    assert emb.item.rows_of(np.array([300, 5], dtype=np.int32)).tolist()[1] == 0
