"""Paper A's data transforms on tiny hand-made data: exact expected vocabulary rows."""

import numpy as np
import pyarrow as pa
import pytest

from conftest import HAND_SCHEMA, write_ctr
from oneepoch.config import DataConfig
from oneepoch.data.dataset import load_ctr
from oneepoch.data.schema import DataError
from oneepoch.data.transforms import (
    apply_transforms,
    corrupt_labels,
    exclude_fields,
    hash_rows,
    sparsify,
)


@pytest.fixture()
def hand(tmp_path):
    # item vocabulary (item + hist pooled, train only): a x4, b x3, c x1, d x1
    # -> rows a=1, b=2, c=3, d=4 (tie c/d broken by raw value); cate: 10, 11, 12 x2 each -> 1..3
    train = pa.table({
        "uid": [1, 1, 2, 2, 3, 3],
        "item": ["a", "a", "a", "b", "b", "c"],
        "cate": [10, 10, 11, 11, 12, 12],
        "hist": pa.array([["a"], ["b"], [], ["d"], [], []]),
        "y": [1, 0, 1, 0, 1, 0]})
    test = pa.table({
        "uid": [1, 2, 3, 4],
        "item": ["a", "c", "d", "e"],
        "cate": [12, 10, 13, 11],
        "hist": pa.array([["c", "e"], ["a"], [], ["d", "b", "a"]]),
        "y": [1, 0, 1, 0]})
    return load_ctr(write_ctr(tmp_path / "hand", {"train": train, "test": test}, HAND_SCHEMA))


def test_hand_encoding_is_what_the_transforms_tests_assume(hand):
    assert hand.vocabs["item"].raw.to_pylist() == ["a", "b", "c", "d"]
    tr, te = hand.splits["train"], hand.splits["test"]
    assert tr.ids.tolist() == [[1, 1], [1, 1], [1, 2], [2, 2], [2, 3], [3, 3]]
    assert tr.seqs[0].tolist() == [[1, 0, 0], [2, 0, 0], [0, 0, 0], [4, 0, 0], [0, 0, 0],
                                   [0, 0, 0]]
    assert te.ids.tolist() == [[1, 3], [3, 1], [4, 0], [0, 2]]
    assert te.seqs[0].tolist() == [[3, 0, 0], [1, 0, 0], [0, 0, 0], [4, 2, 1]]


def test_filter_keeps_top_m_fraction_of_ids_on_shared_vocab(hand):
    out = sparsify(hand, "filter", 0.5, ["item"])  # 4 item IDs -> keep ceil(2.0) = 2: a, b
    tr, te = out.splits["train"], out.splits["test"]
    assert tr.ids[:, 0].tolist() == [1, 1, 1, 2, 2, 0]
    assert tr.ids[:, 1].tolist() == [1, 1, 2, 2, 3, 3]  # cate untouched
    # hist shares the item vocabulary, so it is filtered too
    assert tr.seqs[0].tolist() == [[1, 0, 0], [2, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0],
                                   [0, 0, 0]]
    assert te.ids[:, 0].tolist() == [1, 0, 0, 0]
    assert te.seqs[0].tolist() == [[0, 0, 0], [1, 0, 0], [0, 0, 0], [0, 2, 1]]
    assert tr.lens[0].tolist() == hand.splits["train"].lens[0].tolist()  # lengths unchanged
    assert out.vocabs["item"].size == 3
    assert out.vocabs["item"].raw.to_pylist() == ["a", "b"]
    assert out.vocabs["item"].counts.tolist() == [4, 3]
    assert out.vocabs["cate"] is hand.vocabs["cate"]
    # the input is not modified
    assert hand.splits["train"].ids[:, 0].tolist() == [1, 1, 1, 2, 2, 3]


def test_filter_rounds_up_and_keeps_at_least_one_id(hand):
    out = sparsify(hand, "filter", 0.34, ["cate"])  # 3 cate IDs -> ceil(1.02) = 2
    assert out.splits["train"].ids[:, 1].tolist() == [1, 1, 2, 2, 0, 0]
    assert out.splits["test"].ids[:, 1].tolist() == [0, 1, 0, 2]
    tiny = sparsify(hand, "filter", 1e-5)  # every field: 1 ID left per vocabulary
    assert tiny.splits["train"].ids.tolist() == [[1, 1], [1, 1], [1, 0], [0, 0], [0, 0], [0, 0]]
    assert tiny.vocab_sizes == {"item": 2, "cate": 2}


def _py_hash(row: int, buckets: int, salt: int) -> int:
    """Independent pure-Python statement of the multiplicative hash."""
    return ((row + salt) * 0x9E3779B1) % 2**32 % buckets + 1


def test_hash_rows_exact_values():
    rows = np.array([0, 1, 2, 3, 4, 5, 300_000], dtype=np.int32)
    got = hash_rows(rows, 3, salt=11)
    assert got.tolist() == [0] + [_py_hash(int(r), 3, 11) for r in rows[1:]]
    assert got.dtype == np.int32


def test_hash_maps_every_id_into_m_times_n_buckets(hand):
    out = sparsify(hand, "hash", 0.5, ["item"])  # 4 item IDs -> 2 buckets
    salt = len("item")  # seed 0
    lut = {r: _py_hash(r, 2, salt) for r in range(1, 5)} | {0: 0}
    tr, te = out.splits["train"], out.splits["test"]
    assert tr.ids[:, 0].tolist() == [lut[r] for r in [1, 1, 1, 2, 2, 3]]
    assert te.ids[:, 0].tolist() == [lut[r] for r in [1, 3, 4, 0]]
    assert tr.seqs[0][:, 0].tolist() == [lut[r] for r in [1, 2, 0, 4, 0, 0]]
    assert te.seqs[0].tolist() == [[lut[3], 0, 0], [lut[1], 0, 0], [0, 0, 0],
                                   [lut[4], lut[2], lut[1]]]
    v = out.vocabs["item"]
    assert v.size == 3
    counts = np.zeros(2, dtype=np.int64)
    for r, c in zip(range(1, 5), [4, 3, 1, 1], strict=True):
        counts[lut[r] - 1] += c
    assert v.counts.tolist() == counts.tolist()
    assert out.splits["train"].ids[:, 1].tolist() == [1, 1, 2, 2, 3, 3]


def test_sparsity_errors_name_the_setting(hand):
    with pytest.raises(DataError, match="data.sparsity:"):
        sparsify(hand, "prune", 0.5)
    with pytest.raises(DataError, match="data.sparsity_m"):
        sparsify(hand, "hash", 0.0)
    with pytest.raises(DataError, match="data.sparsity_fields"):
        sparsify(hand, "filter", 0.5, ["nope"])
    assert sparsify(hand, "none", 0.5) is hand


def test_exclude_fields_drops_columns_and_unused_vocabularies(hand):
    out = exclude_fields(hand, ["item", "hist"])
    assert out.fields == ["cate"] and list(out.vocabs) == ["cate"]
    assert out.splits["train"].ids.tolist() == [[1], [1], [2], [2], [3], [3]]
    assert out.splits["test"].ids.tolist() == [[3], [1], [0], [2]]
    assert out.splits["train"].seqs == [] and out.splits["train"].lens == []
    only_hist = exclude_fields(hand, ["item"])  # the shared vocabulary stays for hist
    assert only_hist.fields == ["cate", "hist"] and set(only_hist.vocabs) == {"item", "cate"}
    assert only_hist.splits["test"].seqs[0].tolist() == hand.splits["test"].seqs[0].tolist()
    with pytest.raises(DataError, match="data.exclude_fields: unknown"):
        exclude_fields(hand, ["item_ID"])
    with pytest.raises(DataError, match="no feature"):
        exclude_fields(hand, ["item", "cate", "hist"])


def test_corrupt_labels_fraction_and_determinism():
    y = np.zeros(20_000, dtype=np.float32)
    assert corrupt_labels(y, 0.0, 0) is y
    a, b = corrupt_labels(y, 0.3, 5), corrupt_labels(y, 0.3, 5)
    assert np.array_equal(a, b) and not np.array_equal(a, corrupt_labels(y, 0.3, 6))
    # a randomised label is a coin flip: about half of the 30% become 1
    assert abs(a.mean() - 0.15) < 0.01
    assert y.sum() == 0  # input untouched
    assert abs(corrupt_labels(y, 1.0, 0).mean() - 0.5) < 0.02


def test_apply_transforms_order_and_does_not_mutate_input(hand):
    cfg = DataConfig(exclude_fields=["cate"], sparsity="filter", sparsity_m=0.25,
                     label_noise=1.0)
    before = hand.splits["train"].label.copy()
    out = apply_transforms(hand, cfg, seed=1)
    assert out.fields == ["item", "hist"]
    assert out.splits["train"].ids[:, 0].tolist() == [1, 1, 1, 0, 0, 0]  # top 1 of 4
    assert np.array_equal(hand.splits["train"].label, before)  # the caller's data untouched
    assert out.splits["test"].label.tolist() == hand.splits["test"].label.tolist()
    # the hash does not depend on the training seed: one mapping per (data set, m)
    h0 = apply_transforms(hand, DataConfig(sparsity="hash", sparsity_m=0.5), seed=0)
    h1 = apply_transforms(hand, DataConfig(sparsity="hash", sparsity_m=0.5), seed=7)
    assert np.array_equal(h0.splits["train"].ids, h1.splits["train"].ids)
