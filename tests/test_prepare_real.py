"""Preparers on the real files of ../shared/data (skipped, with a reason, when absent)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from conftest import SHARED_DATA
from oneepoch.data.dataset import load_ctr
from oneepoch.data.prepare import prepare
from oneepoch.data.schema import load_schema

ML100K = SHARED_DATA / "ml-100k"
KGAT = SHARED_DATA / "amazon-book-kgat" / "interactions.csv.gz"
TAOBAO_MB = SHARED_DATA / "taobao-mb" / "interactions.csv.gz"


def _need(path):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not present (real data for "
                              "integration tests lives in ../shared/data)")


@_need(ML100K / "ml-100k.inter")
def test_movielens_100k_recbole(tmp_path):
    out = tmp_path / "ml100k"
    s = prepare("movielens", ML100K, out, progress=False)
    raw = pacsv.read_csv(ML100K / "ml-100k.inter", parse_options=pacsv.ParseOptions(
        delimiter="\t"))
    users = raw.column(0).to_numpy()
    rating = raw.column(2).to_numpy()
    per_user = np.bincount(users)
    assert s["rows_read"] == {"ratings": 100_000, "users": 943, "items": 1_682}
    assert s["samples"]["test"] == int(np.floor(per_user * 0.2).sum())
    assert sum(s["samples"].values()) == 100_000 and not s["dropped"]
    tr, te = (pq.read_table(out / f"{x}.parquet") for x in ("train", "test"))
    n_pos = pc.sum(tr.column("label")).as_py() + pc.sum(te.column("label")).as_py()
    assert n_pos == int((rating >= 4).sum())
    # time-ordered: every test rating of a user is at or after their train ratings
    last_train = pa.TableGroupBy(tr, "user_id").aggregate([("timestamp", "max")])
    first_test = pa.TableGroupBy(te, "user_id").aggregate([("timestamp", "min")])
    j = last_train.join(first_test, "user_id")
    assert pc.all(pc.less_equal(j.column("timestamp_max"), j.column("timestamp_min"))).as_py()
    data = load_ctr(out)
    assert data.vocabs["user_ID"].size == 944
    assert set(data.schema.feature_names) == {
        "user_ID", "user_age", "user_gender", "user_occupation", "his_item_ID",
        "his_item_cate", "item_ID", "item_cate"}
    assert data.vocabs["item_cate"].size - 1 == 18  # first-listed genre
    assert max(data.splits["train"].lens[0]) == 20
    eng = load_schema(out / "engagements")
    assert eng.format == "engagements" and s["extra"]["engagements"] == s["samples"]["train"]


@pytest.mark.slow
@_need(KGAT)
def test_interactions_amazon_book_kgat(tmp_path):
    out = tmp_path / "kgat"
    s = prepare("interactions", KGAT, out, {"split": "split"}, progress=False)
    assert s["rows_read"]["interactions"] == 846_434
    raw = pacsv.read_csv(KGAT)
    n_train = pc.sum(pc.equal(raw.column("split"), "train")).as_py()
    assert s["samples"] == {"train": 2 * n_train, "test": 2 * (846_434 - n_train)}
    assert s["positive_rate"] == {"train": 0.5, "test": 0.5}
    te = pq.read_table(out / "test.parquet")
    neg = te.filter(pc.equal(te.column("label"), 0))
    keys = pc.add(pc.multiply(raw.column("user_id").cast(pa.int64()), 1 << 20),
                  raw.column("item_id").cast(pa.int64()))
    nkeys = pc.add(pc.multiply(neg.column("user_ID").cast(pa.int64()), 1 << 20),
                   neg.column("item_ID").cast(pa.int64()))
    assert not pc.any(pc.is_in(nkeys, value_set=keys)).as_py()  # never an observed pair
    assert load_ctr(out).vocabs["item_ID"].size - 1 == 24_915


@pytest.mark.slow
@_need(TAOBAO_MB)
def test_interactions_taobao_mb(tmp_path):
    out = tmp_path / "tbmb"
    s = prepare("interactions", TAOBAO_MB, out, {"label": "buy", "where": "view",
                                                 "split": "view_split"}, progress=False)
    assert sum(s["samples"].values()) == 873_954  # the viewed pairs
    assert s["samples"]["test"] == 15_449  # leave-one-out: one per user
    assert 0.09 < s["positive_rate"]["train"] < 0.11
    assert load_ctr(out).schema.feature_names == ["user_ID", "item_ID"]
