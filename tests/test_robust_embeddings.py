"""Issue 19, item 13: exports follow the umask (safetensors wrote 0600), and ``load_embeddings``
refuses, naming the file, a 1-D or unreadable weight, tables whose dims disagree with each other
or with meta.json, and raw IDs listed twice in a vocabulary."""

from __future__ import annotations

import json
import os
import stat

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from oneepoch.data.dataset import vocab_from_values
from oneepoch.data.schema import DataError
from oneepoch.embeddings import export_embeddings, load_embeddings


def _export(tmp_path, dim=4):
    uv = vocab_from_values("user", pa.array([5, 5, 9, 2]))
    iv = vocab_from_values("item", pa.array(["a", "b", "a", "c"]))
    return export_embeddings(tmp_path / "embeddings", torch.randn(uv.size, dim),
                             torch.randn(iv.size, dim), uv, iv, {"dim": dim})


def test_export_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = _export(tmp_path)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()}
    assert set(modes.values()) == {0o644}, modes


def test_one_dimensional_weight(tmp_path):
    path = _export(tmp_path)
    save_file({"weight": torch.zeros(4)}, str(path / "user.safetensors"))
    with pytest.raises(DataError, match=r"user\.safetensors: 'weight' must be a float matrix "
                                        r"\[rows, dim\].*shape \(4,\)"):
        load_embeddings(path)


def test_missing_weight_and_garbage_file(tmp_path):
    path = _export(tmp_path)
    save_file({"w": torch.zeros(4, 4)}, str(path / "item.safetensors"))
    with pytest.raises(DataError, match=r"item\.safetensors: no tensor named 'weight'"):
        load_embeddings(path)
    (path / "item.safetensors").write_bytes(b"nonsense")
    with pytest.raises(DataError, match=r"item\.safetensors: not a readable safetensors file"):
        load_embeddings(path)
    (path / "item.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"item\.safetensors: missing"):
        load_embeddings(path)


def test_dims_disagree_between_tables_and_with_meta(tmp_path):
    path = _export(tmp_path)
    save_file({"weight": torch.zeros(4, 6)}, str(path / "item.safetensors"))
    with pytest.raises(DataError, match="user.safetensors has dim 4 but item.safetensors has "
                                        "dim 6"):
        load_embeddings(path)
    path = _export(tmp_path / "b")
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "dim": 8}))
    with pytest.raises(DataError, match=r"meta\.json: says dim 8 but the tables have dim 4"):
        load_embeddings(path)
    (path / "meta.json").write_text("{oops")
    with pytest.raises(DataError, match=r"meta\.json: not valid JSON"):
        load_embeddings(path)


def test_duplicate_raw_ids_in_a_vocabulary(tmp_path):
    path = _export(tmp_path)
    t = pq.read_table(path / "item_vocab.parquet")
    raw = t.column("raw").to_pylist()
    raw[2] = raw[0]
    pq.write_table(t.set_column(0, "raw", pa.array(raw)), path / "item_vocab.parquet")
    with pytest.raises(DataError, match=rf"item_vocab\.parquet: column 'raw': 1 raw ID\(s\) "
                                        rf"listed more than once \(e\.g\. {raw[0]!r}\)"):
        load_embeddings(path)


def test_round_trip_still_loads(tmp_path):
    path = _export(tmp_path)
    emb = load_embeddings(path)
    assert emb.user.dim == 4 and emb.item.vocab.raw.to_pylist() == ["a", "b", "c"]


def test_export_refuses_tables_of_different_dims(tmp_path):
    uv = vocab_from_values("user", pa.array([1, 2]))
    with pytest.raises(ValueError, match=r"one dim, got user \(3, 4\) and item \(3, 5\)"):
        export_embeddings(tmp_path / "e", torch.zeros(3, 4), torch.zeros(3, 5), uv, uv, {})
    assert not (tmp_path / "e").exists()
