"""Preparers of public data sets: each on a tiny raw-format fixture written here, with exactly
known samples (history, negatives, split), plus error messages and the CLI."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from oneepoch.cli import main
from oneepoch.data.dataset import load_ctr
from oneepoch.data.prepare import PREPARERS, PrepareError, prepare
from oneepoch.data.prepare.common import (
    TextFormat,
    history_index,
    sample_negatives,
    stream_text_table,
)
from oneepoch.data.prepare.taobao import _unit, mix64
from oneepoch.data.schema import load_schema


def rows(out: Path, split: str, cols: tuple[str, ...]) -> list[tuple]:
    t = pq.read_table(out / f"{split}.parquet")
    return list(zip(*(t.column(c).to_pylist() for c in cols), strict=True))


# ----------------------------------------------------------------------------- building blocks


def test_history_index_takes_last_max_len_included_rows_per_user():
    user = np.array([0, 0, 0, 0, 1, 1])
    inc = np.array([1, 0, 1, 1, 1, 1], bool)
    off, flat = history_index(user, inc, 2)
    hist = [flat[off[r]:off[r + 1]].tolist() for r in range(6)]
    assert hist == [[], [0], [0], [0, 2], [], [4]]


def test_sample_negatives_avoids_interacted_items_and_is_seeded():
    pos = np.array([0 * 5 + 0, 0 * 5 + 1, 1 * 5 + 4])  # user 0: items 0, 1; user 1: item 4
    users = np.array([0] * 50 + [1] * 50)
    a = sample_negatives(np.random.default_rng(1), users, pos, 5)
    b = sample_negatives(np.random.default_rng(1), users, pos, 5)
    np.testing.assert_array_equal(a, b)
    assert set(a[:50]) <= {2, 3, 4} and set(a[50:]) <= {0, 1, 2, 3}
    assert len(set(a[:50])) == 3  # uniform over the free items, all of them drawn
    full = np.arange(5)  # user 0 interacted with everything: no negative
    assert (sample_negatives(np.random.default_rng(0), np.array([0]), full, 5) == -1).all()


def test_stream_text_table_header_gzip_small_blocks_and_line_numbers(tmp_path):
    path = tmp_path / "t.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write("a,b\n" + "".join(f"{k},{k * 2}\n" for k in range(5000)))
    fmt = TextFormat(names=["a", "b"], types={"a": pa.int64()})
    got = list(stream_text_table(path, fmt, block_size=4096))
    assert len(got) > 5  # many blocks
    assert [line for _, line in got][:2] == [2, 2 + got[0][0].num_rows]
    assert sum(b.num_rows for b, _ in got) == 5000
    assert np.concatenate([b.column("a").to_numpy() for b, _ in got]).tolist() == list(
        range(5000))
    with gzip.open(path, "wt") as f:
        f.write("a,b\n" + "".join(f"{k},{k}\n" for k in range(3000)) + "x,1\n")
    with pytest.raises(PrepareError, match=r"t\.csv\.gz: line 3002: column 'a'"):
        list(stream_text_table(path, fmt, block_size=4096))


# ----------------------------------------------------------------------------- MovieLens

# user, item, rating, ts; written in scrambled time order
RATINGS = [(1, 13, 5, 400), (2, 12, 4, 250), (1, 10, 5, 100), (1, 11, 2, 200), (2, 10, 3, 150),
           (1, 12, 4, 300)]
ML_EXPECTED_TRAIN = [  # user_id, item_ID, label, his_item_ID, item_cate
    (1, 10, 1, [], "Action"), (1, 11, 0, [10], "Drama"), (2, 10, 0, [], "Action")]
ML_EXPECTED_TEST = [(1, 12, 1, [10], "Comedy"), (1, 13, 1, [10, 12], None),
                    (2, 12, 1, [], "Comedy")]
ML_COLS = ("user_id", "item_ID", "label", "his_item_ID", "item_cate")


def write_movielens(d: Path, kind: str) -> Path:
    d.mkdir(parents=True)
    if kind == "recbole":
        (d / "ml-tiny.inter").write_text(
            "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
            + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS))
        (d / "ml-tiny.user").write_text(
            "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
            "1\t24\tM\twriter\t1234\n2\t60\tF\tother\t99\n")
        (d / "ml-tiny.item").write_text(
            "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
            "10\tHeat \"2\"\t1995\tAction Comedy\n11\tDrama One\t1990\tDrama\n"
            "12\tLove\t1991\tComedy Romance\n")
    elif kind == "100k":
        (d / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS))
        (d / "u.user").write_text("1|24|M|writer|1234\n2|60|F|other|99\n")
        flags = {10: (1, 5), 11: (8,), 12: (5, 14)}  # Action+Comedy, Drama, Comedy+Romance
        lines = []
        for item, on in flags.items():
            f = ["1" if g in on else "0" for g in range(19)]
            lines.append("|".join([str(item), "T (1995)", "01-Jan-1995", "", "http://x", *f]))
        (d / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    elif kind == "1m":
        with gzip.open(d / "ratings.dat.gz", "wt") as f:  # gzip accepted
            f.write("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in RATINGS))
        (d / "users.dat").write_text("1::M::18::20::1234\n2::F::56::0::99\n")
        (d / "movies.dat").write_bytes(
            "10::Heat: Caf\xe9 (1995)::Action|Comedy\n11::D (1990)::Drama\n"
            "12::Love (1991)::Comedy|Romance\n".encode("latin-1"))
    elif kind == "latest":
        (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "".join(
            f"{u},{i},{r}.0,{t}\n" for u, i, r, t in RATINGS))
        (d / "movies.csv").write_text('movieId,title,genres\n10,"Heat, The (1995)",Action|Comedy\n'
                                      "11,D (1990),Drama\n12,Love (1991),Comedy|Romance\n")
    return d


@pytest.mark.parametrize("kind", ["recbole", "100k", "1m", "latest"])
def test_movielens_formats_give_the_expected_samples(tmp_path, kind):
    raw = write_movielens(tmp_path / "raw", kind)
    out = tmp_path / "out"
    s = prepare("movielens", raw, out, {"test_fraction": 0.5}, progress=False)
    assert rows(out, "train", ML_COLS) == ML_EXPECTED_TRAIN
    assert rows(out, "test", ML_COLS) == ML_EXPECTED_TEST
    assert s["samples"] == {"train": 3, "test": 3} and s["rows_read"]["ratings"] == 6
    assert rows(out, "test", ("his_item_cate",)) == [(["Action"],), (["Action", "Comedy"],),
                                                       ([],)]
    data = load_ctr(out, single_class="warn")  # a 3-row test split
    names = data.schema.feature_names
    if kind == "latest":
        assert "user_age" not in names
    else:
        assert rows(out, "train", ("user_age", "user_gender")) == [(18, "M"), (18, "M"),
                                                                    (56, "F")]
    assert data.schema.user_key == "user_id" and "user_ID" in names
    assert (out / "prepare.md").exists() and (out / "stats" / "stats.json").exists()
    eng = pq.read_table(out / "engagements" / "engagements.parquet")
    assert sorted(zip(eng.column("user_id").to_pylist(), eng.column("item_id").to_pylist(),
                      strict=True)) == [(1, 10), (1, 11), (2, 10)]  # training ratings only
    assert load_schema(out / "engagements").format == "engagements"


def test_movielens_options_threshold_max_len_and_global_split(tmp_path):
    raw = write_movielens(tmp_path / "raw", "recbole")
    out = tmp_path / "out"
    prepare("movielens", raw, out, {"threshold": 5, "max_len": 1, "split": "global",
                                    "test_fraction": 0.34, "user_features": False},
            progress=False)
    # global: the latest 2 of 6 ratings (ts 300, 400) -> test; clicks = rating 5
    assert rows(out, "test", ML_COLS[:4]) == [(1, 12, 0, [10]), (1, 13, 1, [10])]
    assert rows(out, "train", ML_COLS[:4]) == [(1, 10, 1, []), (1, 11, 0, [10]),
                                               (2, 10, 0, []), (2, 12, 0, [])]
    assert "user_age" not in load_schema(out).feature_names


def test_movielens_errors_name_file_and_line(tmp_path):
    raw = write_movielens(tmp_path / "raw", "100k")
    with open(raw / "u.data", "a") as f:
        f.write("3\tx\t4\t500\n")
    with pytest.raises(PrepareError, match=r"u\.data: line 7: column 'item_id'"):
        prepare("movielens", raw, tmp_path / "o", progress=False)
    (raw / "u.data").write_text("1\t2\t3\n")
    with pytest.raises(PrepareError, match=r"u\.data: line 1: .*Expected 4 columns, got 3"):
        prepare("movielens", raw, tmp_path / "o", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PrepareError, match="no MovieLens ratings file found"):
        prepare("movielens", empty, tmp_path / "o", progress=False)
    rl = write_movielens(tmp_path / "rl", "latest")
    (rl / "ratings.csv").write_text("userId,movieId,stars\n1,2,3\n")
    with pytest.raises(PrepareError, match=r"ratings\.csv: missing column\(s\) \['rating', "
                       "'timestamp'\\]"):
        prepare("movielens", rl, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()  # nothing half-written


# ----------------------------------------------------------------------------- Amazon Books


def write_amazon(d: Path) -> Path:
    d.mkdir(parents=True)
    reviews = [("A", "i1", 10), ("B", "i2", 15), ("A", "i3", 30), ("A", "i2", 20), ("C", "i1", 1),
               ("B", "i1", 5), ("B", "i4", 25)]
    with gzip.open(d / "reviews_Books_5.json.gz", "wt") as f:
        for u, i, t in reviews:
            f.write(json.dumps({"reviewerID": u, "asin": i, "overall": 5.0, "unixReviewTime": t,
                                "reviewText": "good"}) + "\n")
    (d / "meta_Books.json").write_text(  # 2014 release: Python literals
        "{'asin': 'i1', 'title': \"Bob's book\", 'categories': [['Books', 'Fiction'], ['X']]}\n"
        "{'asin': 'i2', 'categories': [['Books', 'History', 'Europe']], 'price': 3.5}\n"
        "{'asin': 'i3', 'categories': [['Books']]}\n"
        "{'asin': 'i9', 'categories': [['Books', 'Other']]}\n")
    return d


def test_amazon_books_din_preprocessing_exact(tmp_path):
    raw = write_amazon(tmp_path / "raw")
    out = tmp_path / "out"
    s = prepare("amazon-books", raw, out, {"seed": 3}, progress=False)
    cols = ("user_ID", "item_ID", "label", "his_item_ID", "his_item_cate", "item_cate")
    # A reviewed i1, i2, i3 -> its only unreviewed item is i4; B (i1, i2, i4) -> i3; C has one
    # review only (history, no sample). Last review per user -> test.
    assert rows(out, "train", cols) == [
        ("A", "i2", 1, ["i1"], ["Fiction"], "Europe"), ("A", "i4", 0, ["i1"], ["Fiction"], None),
        ("B", "i2", 1, ["i1"], ["Fiction"], "Europe"), ("B", "i3", 0, ["i1"], ["Fiction"], "Books")]
    assert rows(out, "test", cols) == [
        ("A", "i3", 1, ["i1", "i2"], ["Fiction", "Europe"], "Books"),
        ("A", "i4", 0, ["i1", "i2"], ["Fiction", "Europe"], None),
        ("B", "i4", 1, ["i1", "i2"], ["Fiction", "Europe"], None),
        ("B", "i3", 0, ["i1", "i2"], ["Fiction", "Europe"], "Books")]
    assert s["rows_read"] == {"reviews": 7, "meta": 4}
    assert any("first review" in k and v == 3 for k, v in s["dropped"].items())
    assert load_ctr(out).schema.feature_names == ["user_ID", "his_item_ID", "his_item_cate",
                                                  "item_ID", "item_cate"]
    assert "150,016" in (out / "prepare.md").read_text()


def test_amazon_negatives_are_seeded_and_never_reviewed(tmp_path):
    d = tmp_path / "raw"
    d.mkdir()
    rng = np.random.default_rng(0)
    with open(d / "reviews_Books_5.json", "w") as f:
        for u in range(40):
            for k, i in enumerate(rng.choice(60, 6, replace=False)):
                f.write(json.dumps({"reviewerID": f"u{u}", "asin": f"i{i}",
                                    "unixReviewTime": k}) + "\n")
    (d / "meta_Books.json").write_text("".join(
        json.dumps({"asin": f"i{i}", "category": ["Books", f"c{i % 7}"]}) + "\n"
        for i in range(60)))  # 2018-style strict JSON meta
    outs = [tmp_path / n for n in ("a", "b", "c")]
    for o, seed in zip(outs, (1, 1, 2), strict=True):
        prepare("amazon-books", d, o, {"seed": seed}, progress=False)
    a, b, c = (pq.read_table(o / "train.parquet") for o in outs)
    assert a.equals(b) and not a.equals(c)
    reviewed = {}
    for line in (d / "reviews_Books_5.json").read_text().splitlines():
        r = json.loads(line)
        reviewed.setdefault(r["reviewerID"], set()).add(r["asin"])
    t = a.to_pylist()
    negs = [r for r in t if r["label"] == 0]
    assert len(negs) == len(t) // 2 == 40 * 4
    assert all(r["item_ID"] not in reviewed[r["user_ID"]] for r in negs)
    assert all(r["item_cate"] == f"c{int(r['item_ID'][1:]) % 7}" for r in t)


def test_amazon_errors(tmp_path):
    raw = write_amazon(tmp_path / "raw")
    with open(raw / "meta_Books.json", "a") as f:
        f.write("{'asin': 'i5', 'categories': [['Books'\n")
    with pytest.raises(PrepareError, match=r"meta_Books\.json: line 5: malformed line"):
        prepare("amazon-books", raw, tmp_path / "o", progress=False)
    (raw / "meta_Books.json").unlink()
    with pytest.raises(PrepareError, match=r"no Amazon Books meta file found.*meta_Books\.json"):
        prepare("amazon-books", raw, tmp_path / "o", progress=False)
    with gzip.open(raw / "reviews_Books_5.json.gz", "wt") as f:
        f.write('{"asin": "i1", "unixReviewTime": 3}\n')
    (raw / "meta_Books.json").write_text("{'asin': 'i1', 'categories': [['B']]}\n")
    with pytest.raises(PrepareError, match="missing field 'reviewerID' on every line"):
        prepare("amazon-books", raw, tmp_path / "o", progress=False)


# ----------------------------------------------------------------------------- Taobao

TAOBAO = [  # user, item, category, behaviour, ts: u1 clicks i2, i1, i3 (time order)
    (1, 101, 7, "pv", 3), (1, 102, 8, "pv", 1), (1, 103, 9, "cart", 2), (1, 103, 9, "pv", 4),
    (2, 104, 7, "pv", 1),  # one click: no sample
    (3, 101, 7, "pv", 1), (3, 102, 8, "pv", 2), (3, 102, 8, "buy", 3), (3, 104, 7, "fav", 0),
    (4, 103, 9, "pv", 5), (4, 101, 7, "pv", 2), (4, 104, 7, "cart", 1)]


def write_taobao(path: Path, lines: list[tuple] = TAOBAO) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(",".join(map(str, r)) + "\n" for r in lines))
    return path


def _seed_with_both_splits() -> int:
    users = np.array([1, 3, 4])
    for seed in range(100):
        test = _unit(mix64(users, seed, 3)) < 0.5
        if test.any() and not test.all():
            return seed
    raise AssertionError("no seed splits the users")


@pytest.mark.parametrize("buckets", [1, 3])
def test_taobao_pair_samples_exact_and_partition_independent(tmp_path, buckets):
    raw = write_taobao(tmp_path / "raw" / "UserBehavior.csv")
    seed = _seed_with_both_splits()
    out = tmp_path / "out"
    s = prepare("taobao-userbehavior", raw, out, {"target": "pair", "test_fraction": 0.5,
                                                  "seed": seed, "buckets": buckets},
                progress=False)
    test_users = {int(u) for u in (1, 3, 4) if _unit(mix64(np.array([u]), seed, 3))[0] < 0.5}
    # clicked items: 101-104. Negatives must be clicked items the user never touched:
    # u1 touched 101-103 -> 104; u3 touched 101, 102, 104 -> 103; u4 touched 101, 103, 104 -> 102
    expected = {1: [(1, 103, 9, 1, [102, 101], [8, 7]), (1, 104, 7, 0, [102, 101], [8, 7])],
                3: [(3, 102, 8, 1, [101], [7]), (3, 103, 9, 0, [101], [7])],
                4: [(4, 103, 9, 1, [101], [7]), (4, 102, 8, 0, [101], [7])]}
    cols = ("user_id", "item_ID", "item_cate", "label", "his_item_ID", "his_item_cate")
    for split, users in (("test", sorted(test_users)), ("train", sorted({1, 3, 4} - test_users))):
        # rows come grouped by user bucket, so compare as sorted lists
        assert sorted(rows(out, split, cols)) == sorted(r for u in users for r in expected[u])
    assert s["rows_read"] == {"rows": 12, "pv": 8, "buy": 1, "cart": 2, "fav": 1}
    assert any("fewer than 2 clicks" in k and v == 1 for k, v in s["dropped"].items())
    data = load_ctr(out)
    assert data.schema.feature_names == ["his_item_ID", "his_item_cate", "item_ID", "item_cate"]
    eng = pq.read_table(out / "engagements" / "engagements.parquet").to_pylist()
    target_ts = {1: 4, 3: 2, 4: 5}
    want = sorted((u, i, b, t) for u, i, _, b, t in TAOBAO
                  if u not in test_users or t < target_ts[u])
    assert sorted((e["user_id"], e["item_id"], e["surface"], e["timestamp"]) for e in eng) == want
    assert load_schema(out / "engagements").surface == "surface"


def test_taobao_coin_one_sample_per_user_and_seeded(tmp_path):
    rng = np.random.default_rng(0)
    n = 3000
    lines = [(int(u), int(i), int(i) % 13, b, int(t)) for u, i, b, t in zip(
        rng.integers(0, 150, n), rng.integers(0, 400, n),
        rng.choice(["pv", "pv", "pv", "cart", "buy", "fav"], n), rng.integers(0, 10**6, n),
        strict=True)]
    raw = write_taobao(tmp_path / "UserBehavior.csv", lines)
    a, b = tmp_path / "a", tmp_path / "b"
    prepare("taobao-userbehavior", raw, a, {"seed": 4, "buckets": 5}, progress=False)
    s = prepare("taobao-userbehavior", raw, b, {"seed": 4, "buckets": 5, "max_len": 3},
                progress=False)
    ta = pq.read_table(a / "train.parquet").to_pylist() + pq.read_table(
        a / "test.parquet").to_pylist()
    users = [r["user_id"] for r in ta]
    assert len(users) == len(set(users)) == sum(s["samples"].values())
    clicks: dict[int, list[tuple[int, int]]] = {}
    touched: dict[int, set[int]] = {}
    for u, i, _, beh, t in lines:
        touched.setdefault(u, set()).add(i)
        if beh == "pv":
            clicks.setdefault(u, []).append((t, i))
    for r in ta:
        seq = [i for _, i in sorted(clicks[r["user_id"]], key=lambda x: x[0])]
        assert r["his_item_ID"] == seq[:-1][-20:]
        if r["label"] == 1:
            assert r["item_ID"] == seq[-1]
        else:
            assert r["item_ID"] not in touched[r["user_id"]]
        assert r["item_cate"] == r["item_ID"] % 13
    assert 0.3 < np.mean([r["label"] for r in ta]) < 0.7
    tb = pq.read_table(b / "train.parquet")
    assert max(len(h) for h in tb.column("his_item_ID").to_pylist()) == 3
    assert tb.column("item_ID").equals(pq.read_table(a / "train.parquet").column("item_ID"))


def test_taobao_errors_name_line_and_column(tmp_path):
    bad = TAOBAO[:3] + [(1, 105, 7, "click", 9)] + TAOBAO[3:]
    raw = write_taobao(tmp_path / "UserBehavior.csv", bad)
    with pytest.raises(PrepareError, match=r"line 4: column 'behavior': unknown value 'click'"):
        prepare("taobao-userbehavior", raw, tmp_path / "o", progress=False)
    raw.write_text("1,2,3,pv,5\n1,x,3,pv,6\n")
    with pytest.raises(PrepareError, match=r"UserBehavior\.csv: line 2: column 'item'"):
        prepare("taobao-userbehavior", raw, tmp_path / "o", progress=False)
    raw.write_text("1,2,3,pv,5\n1,2,pv,6\n")
    with pytest.raises(PrepareError, match=r"line 2: .*Expected 5 columns, got 4"):
        prepare("taobao-userbehavior", raw, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- interactions


def test_interactions_positive_only_with_split_column(tmp_path):
    raw = tmp_path / "interactions.csv.gz"
    with gzip.open(raw, "wt") as f:  # KGAT-style: positives with a split column
        f.write("user_id,item_id,split\n0,0,train\n0,1,train\n0,2,test\n1,1,train\n1,2,train\n"
                "1,3,test\n2,0,train\n")
    out = tmp_path / "out"
    s = prepare("interactions", raw, out, {"split": "split"}, progress=False)
    # items 0-3: user 0 never touched 3, user 1 never touched 0, user 2 touched only 0
    tr = rows(out, "train", ("user_ID", "item_ID", "label"))
    te = rows(out, "test", ("user_ID", "item_ID", "label"))
    assert tr[:6] == [(0, 0, 1), (0, 3, 0), (0, 1, 1), (0, 3, 0), (1, 1, 1), (1, 0, 0)]
    assert tr[6:8] == [(1, 2, 1), (1, 0, 0)] and tr[8][:2] == (2, 0) and tr[9][1] in (1, 2, 3)
    assert te == [(0, 2, 1), (0, 3, 0), (1, 3, 1), (1, 0, 0)]
    assert s["samples"] == {"train": 10, "test": 4}
    assert load_ctr(out).schema.feature_names == ["user_ID", "item_ID"]


def test_interactions_labelled_filtered_and_timed(tmp_path):
    raw = tmp_path / "log.tsv"
    raw.write_text("u\ti\tview\tbuy\tt\tcat\n" + "".join(
        f"{u}\t{i}\t{v}\t{b}\t{t}\t{c}\n" for u, i, v, b, t, c in [
            ("a", "x", 1, 0, 5, "k1"), ("a", "y", 1, 1, 1, "k2"), ("a", "z", 0, 1, 2, "k1"),
            ("a", "w", 1, 1, 9, "k2"), ("b", "x", 1, 1, 3, "k1"), ("b", "y", 1, 0, 4, "k2")]))
    out = tmp_path / "out"
    s = prepare("interactions", raw, out, {
        "user": "u", "item": "i", "label": "buy", "where": "view", "time": "t",
        "item_features": "cat", "delimiter": "\\t", "test_fraction": 0.5, "user_id": False},
        progress=False)
    cols = ("user_id", "item_ID", "label", "his_item_ID", "his_cat", "cat")
    # per user, the latest floor(0.5 * n) viewed rows go to test; history = earlier buys
    assert rows(out, "train", cols) == [("a", "y", 1, [], [], "k2"),
                                        ("a", "x", 0, ["y"], ["k2"], "k1"),
                                        ("b", "x", 1, [], [], "k1")]
    assert rows(out, "test", cols) == [("a", "w", 1, ["y"], ["k2"], "k2"),
                                       ("b", "y", 0, ["x"], ["k1"], "k2")]
    assert s["dropped"] == {"view != 1": 1}
    data = load_ctr(out)
    assert data.schema.feature_names == ["his_item_ID", "his_cat", "item_ID", "cat"]
    assert data.schema.timestamp == "timestamp"


def test_interactions_errors(tmp_path):
    raw = tmp_path / "t.csv"
    raw.write_text("user,item,lab\n1,2,1\n1,3,2\n")
    with pytest.raises(PrepareError, match=r"t\.csv: missing column\(s\) \['user_id'"):
        prepare("interactions", raw, tmp_path / "o", progress=False)
    with pytest.raises(PrepareError, match=r"t\.csv: line 3: column 'lab': expected 0 or 1"):
        prepare("interactions", raw, tmp_path / "o", {"user": "user", "item": "item",
                                                      "label": "lab"}, progress=False)
    with pytest.raises(PrepareError, match=r"prepare interactions: unknown config key 'lable' "
                       r"\(did you mean 'label'\?\)"):
        prepare("interactions", raw, tmp_path / "o", {"lable": "lab"}, progress=False)
    with pytest.raises(PrepareError, match="unknown data set 'nope'"):
        prepare("nope", raw, tmp_path / "o")


# ----------------------------------------------------------------------------- CLI


def test_cli_prepare_and_errors(tmp_path, capsys):
    raw = write_movielens(tmp_path / "raw", "recbole")
    out = tmp_path / "out"
    assert main(["data", "prepare", "movielens", "--raw", str(raw), "--out", str(out),
                 "--set", "test_fraction=0.5", "--max-len", "1", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "train: 3 samples" in text and "prepare.md" in text
    assert load_schema(out).feature("his_item_ID").max_len == 1
    assert main(["data", "prepare", "movielens", "--raw", str(raw), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["data", "prepare", "movielens", "--raw", str(raw), "--out", str(out),
                 "--overwrite", "--quiet", "--set", "split=weekly"]) == 2
    assert ("prepare movielens: config key 'split': got 'weekly'; allowed: user, global"
            in capsys.readouterr().err)
    assert (out / "train.parquet").exists()  # the failed run left the old data set intact
    assert sorted(PREPARERS) == ["amazon-books", "interactions", "movielens",
                                 "taobao-userbehavior"]


def test_taobao_streams_several_blocks_and_buckets_consistently(tmp_path):
    rng = np.random.default_rng(1)
    n = 90_000  # ~2 MB: two 1 MB blocks
    u, i = rng.integers(0, 2000, n), rng.integers(0, 50_000, n)
    t = rng.integers(1_511_000_000, 1_512_000_000, n)
    beh = rng.choice(np.array(["pv", "cart", "fav", "buy"]), n, p=[0.85, 0.05, 0.05, 0.05])
    raw = tmp_path / "UserBehavior.csv"
    raw.write_text("".join(f"{a},{b},{b % 97},{c},{d}\n" for a, b, c, d in zip(
        u, i, beh, t, strict=True)))
    assert raw.stat().st_size > 1 << 20
    outs = {}
    for k in (1, 7):
        o = tmp_path / f"b{k}"
        s = prepare("taobao-userbehavior", raw, o, {"buckets": k, "block_mb": 1,
                                                     "target": "pair"}, progress=False)
        assert s["rows_read"]["rows"] == n
        tabs = [pq.read_table(o / f"{x}.parquet") for x in ("train", "test")]
        outs[k] = sorted((r["user_id"], r["item_ID"], tuple(r["his_item_ID"]), x)
                         for x, tab in enumerate(tabs) for r in tab.to_pylist() if r["label"])
        eng = pq.read_table(o / "engagements" / "engagements.parquet")
        assert eng.num_rows == s["extra"]["engagements"]
    assert outs[1] == outs[7] and len(outs[1]) == len({r[0] for r in outs[1]})


def test_taobao_bucket_without_samples_keeps_its_engagements(tmp_path):
    lines = [(u, 100 + u, 1, "pv", u) for u in range(1, 40)]  # one click each: no samples
    lines += [(50, 101, 1, "pv", 1), (50, 102, 1, "pv", 2), (51, 103, 1, "pv", 1),
              (51, 101, 1, "pv", 2), (51, 104, 1, "buy", 3)]
    raw = write_taobao(tmp_path / "UserBehavior.csv", lines)
    s = prepare("taobao-userbehavior", raw, tmp_path / "o",
                {"buckets": 16, "test_fraction": 0.5, "seed": _seed_with_both_users([50, 51])},
                progress=False)
    assert sum(s["samples"].values()) == 2
    assert any("fewer than 2 clicks" in k and v == 39 for k, v in s["dropped"].items())
    eng = pq.read_table(tmp_path / "o" / "engagements" / "engagements.parquet")
    test_user = pq.read_table(tmp_path / "o" / "test.parquet").column("user_id")[0].as_py()
    held = {50: 1, 51: 2}[test_user]  # the test user's rows at or after the target click
    assert eng.num_rows == s["extra"]["engagements"] == len(lines) - held
    assert set(eng.column("user_id").to_pylist()) >= set(range(1, 40))


def _seed_with_both_users(users: list[int]) -> int:
    for seed in range(100):
        test = _unit(mix64(np.array(users), seed, 3)) < 0.5
        if test.any() and not test.all():
            return seed
    raise AssertionError("no seed splits the users")


def test_taobao_error_line_numbers_count_across_blocks(tmp_path):
    lines = [f"{k % 500},{k},{k % 7},pv,{k}" for k in range(70_000)]  # ~1.6 MB
    lines[65_431] = "1,2,3,clack,5"
    raw = tmp_path / "UserBehavior.csv"
    raw.write_text("\n".join(lines) + "\n")
    with pytest.raises(PrepareError, match=r"line 65432: column 'behavior': unknown value"):
        prepare("taobao-userbehavior", raw, tmp_path / "o", {"block_mb": 1}, progress=False)
    lines[65_431] = "1,2,3,pv"
    raw.write_text("\n".join(lines) + "\n")
    with pytest.raises(PrepareError, match=r"line 65432: .*Expected 5 columns, got 4"):
        prepare("taobao-userbehavior", raw, tmp_path / "o", {"block_mb": 1}, progress=False)
