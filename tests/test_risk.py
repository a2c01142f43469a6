"""``oneepoch data risk`` (rare-ID shares, streamed), frequency buckets and per-bucket AUC."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import HAND_SCHEMA, hand_table, write_ctr
from oneepoch.cli import main
from oneepoch.data.dataset import load_ctr
from oneepoch.data.risk import IdCounter, bucket_names, data_risk, frequency_buckets
from oneepoch.metrics import auc, bucket_auc, bucket_metrics


def _brute_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    d = pos[:, None] - neg[None, :]
    return float(((d > 0) + 0.5 * (d == 0)).mean())


@pytest.fixture()
def hand(tmp_path: Path) -> Path:
    return write_ctr(tmp_path / "hand", {"train": hand_table(300, 1), "test": hand_table(80, 2)},
                     HAND_SCHEMA)


def _expected(train: pa.Table, test: pa.Table, field: str, pooled: list[str]) -> dict:
    counts: Counter = Counter()
    for c in pooled:
        col = train.column(c).to_pylist()
        for v in col:
            counts.update(v if isinstance(v, list) else [v])
    test_ids = test.column(field).to_pylist()
    return {k: np.mean([counts[v] <= k for v in test_ids]) for k in (0, 1, 2, 5, 10)}, counts


def test_risk_matches_brute_force_and_streams(hand: Path):
    train, test = pq.read_table(hand / "train.parquet"), pq.read_table(hand / "test.parquet")
    big = data_risk(hand)
    small = data_risk(hand, batch_rows=7)
    assert small["io"]["train_batches"] == -(-300 // 7)
    assert small["io"]["test_batches"] == -(-80 // 7)
    assert big["io"]["train_batches"] == 1
    assert [f["field"] for f in big["fields"]] == ["item", "cate"]  # single-ID fields only
    for r in (big, small):
        item = r["fields"][0]
        # the rule's figures: the item column's own counts
        want, counts = _expected(train, test, "item", ["item"])
        for k, v in want.items():
            assert item["row_share"][k] == pytest.approx(v)
        assert item["train_ids"] == len(counts)
        # item shares its vocabulary with the history: pooled counts include its entries
        pooled, pooled_counts = _expected(train, test, "item", ["item", "hist"])
        assert item["vocab_train_ids"] == len(pooled_counts) > len(counts)
        for k, v in pooled.items():
            assert item["vocab_row_share"][k] == pytest.approx(v)
        distinct = set(test.column("item").to_pylist())
        assert item["test_ids"] == len(distinct)
        assert item["test_id_share"][0] == pytest.approx(
            np.mean([counts[v] == 0 for v in distinct]))
        assert item["train_id_share"][5] == pytest.approx(
            np.mean([c <= 5 for c in counts.values()]))
        cate_want, _ = _expected(train, test, "cate", ["cate"])
        assert r["fields"][1]["row_share"] == pytest.approx(cate_want)
    assert big["level"] in ("high", "medium", "low")
    assert big["expectation"].startswith(big["level"] + " risk:")


def test_unseen_and_rare_ids_counted(tmp_path: Path):
    # item 1: 3 times, item 2: once, item 9: never in train; test rows 1, 2, 9, 9
    train = pa.table({"item": [1, 1, 1, 2], "y": [0, 1, 0, 1]})
    test = pa.table({"item": [1, 2, 9, 9], "y": [1, 0, 1, 0]})
    d = write_ctr(tmp_path / "d", {"train": train, "test": test}, textwrap.dedent("""\
        label: y
        features: {item: id}
        splits: {train: train.parquet, test: test.parquet}
        """))
    f = data_risk(d)["fields"][0]
    assert f["row_share"] == {0: 0.5, 1: 0.75, 2: 0.75, 5: 1.0, 10: 1.0}
    assert f["test_id_share"][0] == pytest.approx(1 / 3)
    assert f["train_id_share"][1] == 0.5
    # a null test ID counts as unseen (the encoder maps it to row 0); string IDs hash-counted
    pq.write_table(pa.table({"item": [1, None, 9, 1], "y": [1, 0, 1, 0]}), d / "test.parquet")
    f = data_risk(d)["fields"][0]
    assert f["row_share"][0] == 0.5 and f["test_ids"] == 3
    pq.write_table(pa.table({"item": ["a", "a", "a", "b"], "y": [0, 1, 0, 1]}),
                   d / "train.parquet")
    pq.write_table(pa.table({"item": ["a", "b", "z", None], "y": [1, 0, 1, 0]}),
                   d / "test.parquet")
    f = data_risk(d)["fields"][0]
    assert f["row_share"] == {0: 0.5, 1: 0.75, 2: 0.75, 5: 1.0, 10: 1.0}


def test_counter_merges_exactly():
    rng = np.random.default_rng(0)
    vals = rng.integers(0, 500, 20_000)
    c = IdCounter(pa.int64(), min_merge=16, dense_max=1)  # hashed, with many merges
    for a in range(0, len(vals), 999):
        c.add(pa.array(vals[a:a + 999]))
    keys, counts = c.result()
    assert c.hashed
    got = dict(zip(keys.to_pylist(), counts.tolist(), strict=True))
    assert got == dict(Counter(vals.tolist()))
    d = IdCounter(pa.int64())  # dense: the same counts
    for a in range(0, len(vals), 999):
        d.add(pa.array(vals[a:a + 999]))
    keys, counts = d.result()
    assert not d.hashed and keys.tolist() == sorted(got)
    assert dict(zip(keys.tolist(), counts.tolist(), strict=True)) == got


def test_counter_dense_grows_and_falls_back_to_hashing():
    rng = np.random.default_rng(1)
    want: Counter = Counter()
    c = IdCounter(pa.int64(), min_merge=8, dense_max=5_000)
    wide = False
    # dense: a small range, then growth above and below (negative IDs too), then too wide
    for lo, hi, n in [(100, 120, 50), (100, 3000, 400), (-900, 50, 400), (-900, 3900, 5),
                      (0, 10**9, 300), (5, 9, 20)]:
        v = rng.integers(lo, hi, n)
        want.update(v.tolist())
        arr = pa.array(np.concatenate([v, [0]]), mask=np.r_[np.zeros(n, bool), True])
        c.add(arr)
        wide = wide or hi - lo > 5_000
        assert (c.dense is None) == wide and c.hashed == wide
    assert c.hashed and c.nulls == 6 and c.values_seen == sum(want.values())
    keys, counts = c.result()
    np.testing.assert_array_equal(np.sort(c.nonzero_counts()), np.sort(counts))
    assert dict(zip(keys.to_pylist(), counts.tolist(), strict=True)) == dict(want)
    probe = pa.array([105, -7, 10**12, 3])
    np.testing.assert_array_equal(c.count_of(probe), [want[x] for x in probe.to_pylist()])
    d = IdCounter(pa.int64())
    d.add(pa.array([5, 5, 9]))
    np.testing.assert_array_equal(d.count_of(pa.array([5, 9, 4, 10, 7])), [2, 1, 0, 0, 0])
    np.testing.assert_array_equal(d.count_of(pa.array([5, None])), [2, 0])


def test_cli_risk_writes_table_json_png(hand: Path, tmp_path: Path, capsys):
    assert main(["data", "risk", str(hand), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "| item | item |" in out and "risk:" in out
    r = json.loads((tmp_path / "r" / "risk.json").read_text())
    assert r["fields"][0]["field"] == "item"
    assert (tmp_path / "r" / "risk.png").stat().st_size > 1000
    assert "| field |" in (tmp_path / "r" / "risk.md").read_text()


def test_cli_bad_input_is_one_line(hand: Path, tmp_path: Path, capsys):
    assert main(["data", "risk", str(hand), "--field", "y"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'y' is not an ID field" in err
    assert main(["data", "risk", str(hand), "--field", "hist"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'hist' is a sequence field" in err
    bad = write_ctr(tmp_path / "bad", {"train": hand_table(20, 1),
                                       "test": hand_table(20, 2, cate=pa.array([0.5] * 20))},
                    HAND_SCHEMA)
    assert main(["data", "risk", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "column 'cate': expected int or string IDs, got double" in err
    no_test = write_ctr(tmp_path / "nt", {"train": hand_table(20, 1)},
                        HAND_SCHEMA.replace("  test: test.parquet\n", ""))
    assert main(["data", "risk", str(no_test)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no 'test' split" in err and "schema.yaml" in err


def test_frequency_buckets_and_bucket_auc(tmp_path: Path):
    reps = {"i0": 1, "i1": 2, "i2": 3, "i3": 10, "i4": 40}  # training counts; i5 unseen
    tr_items = pa.array([i for i, r in reps.items() for _ in range(r)])
    te_items = pa.array([f"i{v}" for v in np.random.default_rng(5).integers(0, 6, 90)])
    hand = write_ctr(tmp_path / "b", {"train": hand_table(56, 1, item=tr_items),
                                      "test": hand_table(90, 2, item=te_items)}, HAND_SCHEMA)
    data = load_ctr(hand, cache=False)
    b, names, ranges = frequency_buckets(data, "item", [2, 30])
    assert names == ["unseen", "tail", "torso", "head"]
    assert ranges == {"unseen": "0", "tail": "1-2", "torso": "3-30", "head": ">30"}
    train = pq.read_table(hand / "train.parquet")
    test = pq.read_table(hand / "test.parquet")
    _, counts = _expected(train, test, "item", ["item"])  # the column's own counts
    c = np.array([counts[v] for v in test.column("item").to_pylist()])
    want = np.where(c == 0, 0, np.where(c <= 2, 1, np.where(c <= 30, 2, 3)))
    np.testing.assert_array_equal(b, want)
    assert set(want.tolist()) == {0, 1, 2, 3}  # every bucket occurs in the hand-made data
    # auto = the single-ID field with the largest vocabulary
    assert frequency_buckets(data, "auto", [2, 30])[0].tolist() == b.tolist()
    with pytest.raises(ValueError, match="'hist' is a sequence field"):
        frequency_buckets(data, "hist")
    with pytest.raises(ValueError, match="'nope' is not an ID field"):
        frequency_buckets(data, "nope")

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.random(500), 1)  # ties
    bk = rng.integers(0, 4, 500)
    bk[bk == 3] = 2  # bucket 3 empty
    got = bucket_auc(y, s, bk, bucket_names(2))
    for i, n in enumerate(bucket_names(2)):
        m = bk == i
        assert got[n][1] == int(m.sum())
        if m.any():
            assert got[n][0] == pytest.approx(_brute_auc(y[m], s[m]))
            assert got[n][0] == pytest.approx(auc(y[m], s[m]))
    assert np.isnan(got["head"][0]) and got["head"][1] == 0
    m = bucket_metrics(y, s, bk, bucket_names(2))
    assert m["test_n_tail"] == int((bk == 1).sum())
    assert m["test_auc_tail"] == pytest.approx(_brute_auc(y[bk == 1], s[bk == 1]))


def test_bucket_curves_in_report(tmp_path: Path):
    from oneepoch.report.figures import bucket_keys, plot_bucket_curves

    rows = [{"epoch": e, "test_auc": 0.7, "test_auc_tail": 0.6 + e / 10, "test_n_tail": 10,
             "test_auc_head": 0.8, "test_n_head": 90} for e in (0.0, 0.5, 1.0, 1.5)]
    assert bucket_keys(rows) == ["tail", "head"]
    p = plot_bucket_curves([("a", rows), ("b", rows)], tmp_path / "b.png")
    assert p is not None and p.stat().st_size > 1000
    assert plot_bucket_curves([("a", [{"epoch": 0, "test_auc": 0.5}])], tmp_path / "n.png") is None


_MEM_SCRIPT = """
import resource, sys
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
from oneepoch.data.risk import data_risk
d = sys.argv[1]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
r = data_risk(d, batch_rows=1 << 16)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(base, peak, r["io"]["train_batches"], r["fields"][0]["row_share"][0])
"""


@pytest.mark.slow
def test_risk_streams_a_file_larger_than_its_memory_cap(tmp_path: Path):
    """A 256 MiB (in memory) training split is counted within a 96 MiB RSS increase."""
    d = tmp_path / "big"
    d.mkdir()
    rows, group = 16 * 2**20, 2**20
    rng = np.random.default_rng(0)
    schema = pa.schema([("item", pa.int64()), ("user", pa.int64()), ("y", pa.int8())])
    with pq.ParquetWriter(d / "train.parquet", schema) as w:
        for _ in range(rows // group):
            w.write_table(pa.table({"item": rng.integers(0, 50_000, group),
                                    "user": rng.integers(0, 20_000, group),
                                    "y": rng.integers(0, 2, group).astype(np.int8)}, schema))
    pq.write_table(pa.table({"item": np.arange(0, 100_000, 2), "user": np.zeros(50_000, int),
                             "y": np.zeros(50_000, np.int8)}, schema), d / "test.parquet")
    (d / "schema.yaml").write_text("label: y\nfeatures: {item: id, user: id}\n"
                                   "splits: {train: train.parquet, test: test.parquet}\n")
    cap_kib = 96 * 1024
    assert rows * 17 > 2.5 * cap_kib * 1024  # the split is far larger than the cap
    out = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, str(d)], capture_output=True,
                         text=True, check=True).stdout.split()
    base, peak, batches, unseen = int(out[0]), int(out[1]), int(out[2]), float(out[3])
    assert batches == rows // 2**16
    assert unseen == pytest.approx(0.5)  # test items 50,000..99,998 never occur in train
    assert peak - base < cap_kib, f"RSS grew by {(peak - base) / 1024:.0f} MiB"


def test_rule_reads_rare_but_seen_ids():
    from oneepoch.data.risk import HIGH_RISK, MEDIUM_RISK, FieldRisk, risk_level

    def fr(name: str, unseen: float, upto2: float) -> FieldRisk:
        return FieldRisk(name, name, 10, 100, 10, row_share={0: unseen, 1: upto2, 2: upto2})

    # mostly unseen IDs (a global time split): their row is untrained, nothing to over-fit
    level, line = risk_level([fr("user_ID", 0.85, 0.85 + MEDIUM_RISK / 2)])
    assert level == "low" and "85% one never seen" in line
    level, line = risk_level([fr("cate", 0.0, 0.0), fr("item_ID", 0.2, 0.2 + HIGH_RISK)])
    assert level == "high"
    assert line.startswith(f"high risk: {100 * HIGH_RISK:.0f}% of test rows carry an item_ID "
                           "seen 1-2 times in training")
    assert risk_level([fr("item", 0.0, (HIGH_RISK + MEDIUM_RISK) / 2)])[0] == "medium"


def test_eval_buckets_follow_the_config(tmp_path: Path):
    from oneepoch.config import EvalConfig
    from oneepoch.data.risk import eval_buckets

    d = write_ctr(tmp_path / "e", {"train": hand_table(40, 1), "test": hand_table(10, 2)},
                  HAND_SCHEMA)
    data = load_ctr(d, cache=False)
    assert eval_buckets(data, EvalConfig(bucket_field="")) is None
    assert eval_buckets(data, EvalConfig(bucket_field="none")) is None
    b, names, ranges = eval_buckets(data, EvalConfig())
    assert names == ["unseen", "tail", "torso", "head"] and ranges["tail"] == "1-5"
    assert len(b) == 10
    b2, _, _ = eval_buckets(data, EvalConfig(bucket_field="cate", bucket_bounds=[1, 3]))
    np.testing.assert_array_equal(b2, frequency_buckets(data, "cate", [1, 3])[0])
