"""Issue 19, items 4, 7, 8 and 10: a replaced file never trains on a stale cache; a split with
one class is refused (evaluation) or warned about (train) before training; the share of test IDs
unseen in training is reported; corrupt Parquet data and int/string IDs across files are a
DataError naming the file and column (or cast, as the vocabulary builder does)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import HAND_SCHEMA, hand_table, write_ctr
from oneepoch.cli import main
from oneepoch.data.dataset import CACHE_DIR, load_ctr, oov_shares, parquet_footer, validate
from oneepoch.data.schema import DataError


def make(tmp_path, train=None, test=None, schema=HAND_SCHEMA):
    return write_ctr(tmp_path / "d", {"train": train if train is not None else hand_table(),
                                      "test": test if test is not None else hand_table(seed=1)},
                     schema)


PLAIN = dict(compression="none", use_dictionary=False)  # fixed-size columns: same file size


def _labelled(y):
    n = len(y)
    return pa.table({"uid": pa.array(np.arange(n) % 3), "item": pa.array(np.arange(n) % 4),
                     "cate": pa.array(np.arange(n) % 2 + 10),
                     "hist": pa.array([[1]] * n, type=pa.list_(pa.int64())),
                     "y": pa.array(np.asarray(y, dtype=np.int64))})


# ----------------------------------------------------------------------------- item 4


def test_replaced_file_of_same_size_and_mtime_is_not_read_from_the_stale_cache(tmp_path):
    d = make(tmp_path, test=_labelled([0, 1]))
    f = d / "train.parquet"
    y = np.array([0, 1, 1, 0, 1, 0, 0, 1])
    pq.write_table(_labelled(y), f, **PLAIN)
    st = f.stat()
    assert load_ctr(d).splits["train"].label.tolist() == y.tolist()  # cached now
    tmp = d / "new.parquet"
    pq.write_table(_labelled(1 - y), tmp, **PLAIN)
    os.replace(tmp, f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    assert load_ctr(d).splits["train"].label.tolist() == (1 - y).tolist()


def test_parquet_footer_is_a_content_fingerprint(tmp_path):
    a, b, c = tmp_path / "a.parquet", tmp_path / "b.parquet", tmp_path / "c.parquet"
    t = _labelled([0, 1, 1, 0])
    pq.write_table(t, a, **PLAIN)
    pq.write_table(t, b, **PLAIN)
    other = t.set_column(2, "cate", pa.array([10, 12, 11, 10]))  # same size, other values
    pq.write_table(other, c, **PLAIN)
    assert a.stat().st_size == c.stat().st_size
    assert parquet_footer(a) == parquet_footer(b) != parquet_footer(c)
    (tmp_path / "x.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"x\.parquet: not a Parquet file"):
        parquet_footer(tmp_path / "x.parquet")


def test_damaged_cache_is_rebuilt(tmp_path):
    d = make(tmp_path)
    want = load_ctr(d).splits["train"].ids.copy()
    (cdir,) = (d / CACHE_DIR).iterdir()
    (cdir / "train.ids.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.warns(UserWarning, match="damaged encoded cache"):
        got = load_ctr(d)
    np.testing.assert_array_equal(got.splits["train"].ids, want)
    np.testing.assert_array_equal(load_ctr(d).splits["train"].ids, want)  # rewritten


# ----------------------------------------------------------------------------- item 7


@pytest.mark.parametrize("value, cls", [(1, "1 \\(no negatives\\)"), (0, "0 \\(no positives\\)")])
def test_single_class_test_split_is_refused(tmp_path, value, cls):
    d = make(tmp_path, train=_labelled([0, 1]), test=_labelled([value] * 5))
    with pytest.raises(DataError, match=rf"test\.parquet: split 'test': all 5 labels in column "
                                        rf"'y' are {cls}; AUC is undefined"):
        load_ctr(d)
    with pytest.warns(UserWarning, match="split 'test'"):
        load_ctr(d, single_class="warn")  # encodes and writes the cache
    assert (d / CACHE_DIR).exists()
    with pytest.raises(DataError, match="split 'test'"):  # the cached path checks too
        load_ctr(d)


def test_single_class_train_split_warns(tmp_path):
    d = make(tmp_path, train=_labelled([0] * 6), test=_labelled([0, 1]))
    with pytest.warns(UserWarning, match=r"train\.parquet: split 'train': all 6 labels in column "
                                         r"'y' are 0 \(no positives\); .*train AUC is undefined"):
        load_ctr(d)


def test_data_validate_reports_single_class(tmp_path, capsys):
    d = make(tmp_path, train=_labelled([0, 1]), test=_labelled([1, 1, 1]))
    assert main(["data", "validate", str(d)]) == 2
    err = capsys.readouterr().err
    assert "split 'test': all 3 labels" in err and len(err.strip().splitlines()) == 1
    d2 = make(tmp_path / "b", train=_labelled([1] * 4), test=_labelled([0, 1]))
    assert main(["data", "validate", str(d2)]) == 0
    out = capsys.readouterr().out
    assert "warning:" in out and "split 'train': all 4 labels" in out


# ----------------------------------------------------------------------------- item 8


def test_oov_shares_per_field(tmp_path):
    train = pa.table({"uid": [1, 2, 3, 4], "item": ["a", "b", "c", "a"], "cate": [7, 7, 8, 8],
                      "hist": pa.array([["a"], ["b"], ["c"], []]), "y": [0, 1, 1, 0]})
    test = pa.table({"uid": [1, 9, 9, 9, 9], "item": ["a", "z", "y", "b", None],
                     "cate": [7, 7, 7, 7, 9],
                     "hist": pa.array([["a", "q"], [], ["q", "q", "b"], ["c"], None]),
                     "y": [0, 1, 0, 1, 0]})
    data = load_ctr(make(tmp_path, train, test))
    got = oov_shares(data)
    assert got == {"item": pytest.approx(3 / 5), "cate": pytest.approx(1 / 5),
                   "hist": pytest.approx(3 / 6)}
    assert oov_shares(data, "train") == {"item": 0.0, "cate": 0.0, "hist": 0.0}
    text = "\n".join(validate(tmp_path / "d"))
    assert "test: out-of-vocabulary IDs (unseen in train) per field: item 60.0%, cate 20.0%, " \
           "hist 50.0%" in text


# ----------------------------------------------------------------------------- item 10


def _corrupt_column(f, column, n=64):
    md = pq.ParquetFile(f).metadata
    i = md.schema.to_arrow_schema().get_field_index(column)
    col = md.row_group(0).column(i)
    start = col.dictionary_page_offset or col.data_page_offset
    raw = bytearray(f.read_bytes())
    mid = start + col.total_compressed_size // 2
    raw[mid:mid + n] = b"\xff" * n
    f.write_bytes(bytes(raw))


def test_parquet_corrupt_in_the_middle_names_file_and_column(tmp_path):
    rng = np.random.default_rng(0)
    n = 5000
    train = hand_table(n=n, cate=pa.array(rng.integers(0, 1 << 40, n)))
    d = make(tmp_path, train=train)
    pq.write_table(train, d / "train.parquet", compression="snappy")
    _corrupt_column(d / "train.parquet", "cate")
    pq.read_schema(d / "train.parquet")  # the footer is intact
    with pytest.raises(DataError, match=r"train\.parquet: column 'cate': corrupt Parquet data"):
        load_ctr(d)


def test_page_checksums_catch_corruption_that_still_decodes(tmp_path):
    d = make(tmp_path)
    t = _labelled(np.arange(40) % 2)
    pq.write_table(t, d / "train.parquet", write_page_checksum=True, **PLAIN)
    _corrupt_column(d / "train.parquet", "cate", n=4)
    with pytest.raises(DataError, match=r"train\.parquet: column 'cate': corrupt Parquet data"):
        load_ctr(d)


SCHEMA_2FILES = HAND_SCHEMA.replace("train: train.parquet", "train: [a.parquet, b.parquet]")


def test_int_ids_in_one_file_and_string_ids_in_another_are_cast(tmp_path):
    d = make(tmp_path, schema=SCHEMA_2FILES)
    a = pa.table({"uid": [1, 2], "item": [5, 6], "cate": [1, 2],
                  "hist": pa.array([[5], [6, 5]]), "y": [0, 1]})
    b = pa.table({"uid": ["1", "3"], "item": ["5", "x"],
                  "cate": pa.array(["1", "2"]).dictionary_encode(),
                  "hist": pa.array([["x"], []]), "y": [1.0, 0.0]})
    pq.write_table(a, d / "a.parquet")
    pq.write_table(b, d / "b.parquet")
    data = load_ctr(d)
    v = data.vocabs["item"]
    assert v.raw.to_pylist() == ["5", "6", "x"] and v.counts.tolist() == [4, 2, 2]
    tr = data.splits["train"]
    assert tr.ids[:, 0].tolist() == [1, 2, 1, 3]
    assert tr.ids[:, 1].tolist() == [1, 2, 1, 2]
    assert tr.seqs[0].tolist() == [[1, 0, 0], [2, 1, 0], [3, 0, 0], [0, 0, 0]]
    assert tr.user.tolist()[0] == tr.user.tolist()[2]  # uid 1 and "1": one user


def test_types_that_cannot_be_joined_name_both_files(tmp_path):
    schema = SCHEMA_2FILES.replace("user_key: uid", "user_key: uid\ntimestamp: ts")
    d = make(tmp_path, train=hand_table().append_column("ts", pa.array(range(8))),
             test=hand_table(seed=1).append_column("ts", pa.array(range(8))), schema=schema)
    pq.write_table(hand_table(n=3).append_column("ts", pa.array([1, 2, 3])), d / "a.parquet")
    pq.write_table(hand_table(n=3, seed=2).append_column("ts", pa.array(["x", "y", "z"])),
                   d / "b.parquet")
    with pytest.raises(DataError, match=r"b\.parquet: column 'ts' has type string but "
                                        r".*a\.parquet has int64"):
        load_ctr(d)


def test_validate_still_quiet_on_good_data(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lines = validate(make(tmp_path))
    assert any("out-of-vocabulary" in x for x in lines)


@pytest.mark.parametrize("schema, msg", [
    ("features: {a: id}\nsplits: {train: 5}", r"split 'train': expected a file name"),
    ("features: {a: {type: sequence, max_len: abc}}\nsplits: {train: t.parquet}",
     r"feature 'a': max_len must be a whole number, got 'abc'"),
    ("features: {a: {type: sequence, max_len: 2.5}}\nsplits: {train: t.parquet}",
     r"feature .a.: max_len must be a whole number, got 2.5"),
])
def test_schema_mistakes_are_data_errors(tmp_path, schema, msg):
    (tmp_path / "schema.yaml").write_text(schema)
    with pytest.raises(DataError, match=r"schema\.yaml: " + msg):
        load_ctr(tmp_path)


def test_binary_schema_file(tmp_path):
    (tmp_path / "schema.yaml").write_bytes(b"\xff\xfe\x00format: ctr")
    with pytest.raises(DataError, match=r"schema\.yaml: not valid YAML"):
        load_ctr(tmp_path)
