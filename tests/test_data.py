import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import HAND_SCHEMA, hand_table, write_ctr
from oneepoch.config import ConfigError, TrainConfig, load_config
from oneepoch.data.dataset import CACHE_DIR, load_ctr, validate
from oneepoch.data.schema import DataError


def make(tmp_path, train=None, test=None, schema=HAND_SCHEMA):
    return write_ctr(tmp_path / "d", {"train": train if train is not None else hand_table(),
                                      "test": test if test is not None else hand_table(seed=1)},
                     schema)


def test_vocab_is_frequency_ordered_with_oov_row_and_shared(tmp_path):
    train = pa.table({
        "uid": [1, 1, 2, 2], "item": ["b", "a", "b", "c"], "cate": [7, 7, 7, 8],
        "hist": pa.array([["a"], ["b", "b"], [], ["c", "a", "b"]]), "y": [0, 1, 1, 0]})
    test = pa.table({"uid": [1], "item": ["z"], "cate": [8], "hist": pa.array([["a", "z"]]),
                     "y": [1]})
    data = load_ctr(make(tmp_path, train, test), single_class="warn")  # a one-row test split
    v = data.vocabs["item"]  # item + hist pooled: b x5, a x3, c x2
    assert v.raw.to_pylist() == ["b", "a", "c"] and v.counts.tolist() == [5, 3, 2]
    assert v.size == 4  # + OOV row 0
    assert data.single_fields == ["item", "cate"] and data.seq_fields == ["hist"]
    tr = data.splits["train"]
    assert tr.ids[:, 0].tolist() == [1, 2, 1, 3]
    assert tr.ids[:, 1].tolist() == [1, 1, 1, 2]
    assert tr.seqs[0].tolist() == [[2, 0, 0], [1, 1, 0], [0, 0, 0], [3, 2, 1]]
    assert tr.lens[0].tolist() == [1, 2, 0, 3]
    te = data.splits["test"]
    assert te.ids[:, 0].tolist() == [0]  # unseen -> OOV
    assert te.seqs[0][0].tolist() == [2, 0, 0] and te.lens[0].tolist() == [2]
    assert tr.label.dtype == np.float32 and tr.user is not None


def test_cache_is_reused_and_invalidated(tmp_path):
    d = make(tmp_path)
    a = load_ctr(d)
    caches = list((d / CACHE_DIR).iterdir())
    assert len(caches) == 1
    b = load_ctr(d)
    np.testing.assert_array_equal(a.splits["train"].ids, b.splits["train"].ids)
    pq.write_table(hand_table(n=9, seed=5), d / "train.parquet")  # changed file -> new cache
    c = load_ctr(d)
    assert len(c.splits["train"]) == 9


def test_missing_column_names_file_and_column(tmp_path):
    d = make(tmp_path, train=hand_table().drop_columns(["cate"]))
    with pytest.raises(DataError, match=r"train\.parquet.*missing column.*'cate'"):
        load_ctr(d)


def test_wrong_type(tmp_path):
    d = make(tmp_path, train=hand_table(cate=pa.array(np.linspace(0, 1, 8))))
    with pytest.raises(DataError, match=r"train\.parquet: column 'cate': expected int or string"):
        load_ctr(d)
    d2 = make(tmp_path / "b", train=hand_table(hist=pa.array(["x"] * 8)))
    with pytest.raises(DataError, match=r"column 'hist': a sequence feature needs a list"):
        load_ctr(d2)


@pytest.mark.parametrize("labels,msg", [
    ([0, 1, 2, 0, 1, 0, 1, 0], r"outside \{0, 1\}"),
    ([0.0, 1.0, float("nan"), 0, 1, 0, 1, 0], r"outside \{0, 1\}"),
    ([0, 1, None, 0, 1, 0, 1, 0], r"null value"),
])
def test_bad_labels(tmp_path, labels, msg):
    d = make(tmp_path, test=hand_table(y=pa.array(labels)))
    with pytest.raises(DataError, match=r"test\.parquet: label column 'y'.*" + msg):
        load_ctr(d)


def test_empty_file(tmp_path):
    d = make(tmp_path, test=hand_table().slice(0, 0))
    with pytest.raises(DataError, match=r"test\.parquet: empty file"):
        load_ctr(d)


def test_long_sequence_truncates_keeping_most_recent(tmp_path):
    train = hand_table(n=2, hist=pa.array([["i1", "i2", "i3", "i4", "i0"], ["i1"]]))
    d = make(tmp_path, train=train)
    with pytest.warns(UserWarning, match=r"'hist': 1 sequence\(s\) longer than max_len=3"):
        data = load_ctr(d, cache=False)
    v = data.vocabs["item"]
    rows = {r: i + 1 for i, r in enumerate(v.raw.to_pylist())}
    assert data.splits["train"].seqs[0][0].tolist() == [rows["i3"], rows["i4"], rows["i0"]]


def test_long_sequence_error_mode(tmp_path):
    train = hand_table(n=2, hist=pa.array([["i1", "i2", "i3", "i4"], ["i1"]]))
    d = make(tmp_path, train=train, schema=HAND_SCHEMA + "on_long_sequence: error\n")
    with pytest.raises(DataError, match=r"train\.parquet: column 'hist': 1 sequence"):
        load_ctr(d)


@pytest.mark.parametrize("schema,msg", [
    (HAND_SCHEMA + "colour: blue\n", r"unknown key\(s\) \['colour'\]"),
    (HAND_SCHEMA.replace("item: id", "item: {type: id, size: 3}"), r"'item': unknown key"),
    (HAND_SCHEMA.replace("max_len: 3, ", ""), r"'hist': a sequence needs max_len"),
    (HAND_SCHEMA.replace("vocab: item", "vocab: nope"), r"shares vocab 'nope'"),
    ("splits: {}\n", r"'splits' must map"),
])
def test_bad_schema(tmp_path, schema, msg):
    d = make(tmp_path, schema=schema)
    with pytest.raises(DataError, match=msg):
        load_ctr(d)


def test_missing_schema_and_split_file(tmp_path):
    with pytest.raises(DataError, match="missing schema file"):
        load_ctr(tmp_path)
    d = make(tmp_path)
    (d / "test.parquet").unlink()
    with pytest.raises(DataError, match=r"test\.parquet: split 'test': no such file"):
        load_ctr(d)


def test_unknown_config_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.hiden'.*did you mean"):
        load_config(TrainConfig, None, ["model.hiden=[10]"])
    with pytest.raises(ConfigError, match=r"config key 'epochs': expected int"):
        load_config(TrainConfig, None, ["epochs=many"])
    cfg = load_config(TrainConfig, None, ["model.hidden=64,32", "eval.at_start=false"])
    assert cfg.model.hidden == [64, 32] and cfg.eval.at_start is False


def test_builtin_ctr_preset_lists_every_default():
    from dataclasses import asdict

    import yaml

    from oneepoch.config import resolve_config_path

    assert yaml.safe_load(resolve_config_path("ctr").read_text()) == asdict(TrainConfig())


def test_validate_reports_rows_and_warnings(tmp_path):
    train = hand_table(n=2, hist=pa.array([["i1", "i2", "i3", "i4"], ["i1"]]))
    d = make(tmp_path, train=train)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lines = validate(d)
    text = "\n".join(lines)
    assert "train: 2 rows" in text and "longer than max_len=3" in text
    assert not (d / CACHE_DIR).exists()  # validation does not write
