"""Turn an interaction log (user, item, optional time and label) into CTR samples: histories of
earlier positives, sampled negatives for positive-only logs, and a train/test split.

Used by the MovieLens, Amazon Books and generic interaction-table preparers.

    >>> import numpy as np, pyarrow as pa
    >>> log = Log(user=pa.array([1, 1, 1]), item=pa.array([10, 11, 12]), ts=np.array([1, 2, 3]),
    ...           label=np.array([1, 0, 1]))
    >>> tables, info = build_ctr_tables(log, split_last(log, fraction=0.34), max_len=5,
    ...                                 rng=np.random.default_rng(0))
    >>> tables["test"].column("his_item_ID").to_pylist()      # the last rating sees item 10
    [[10]]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from oneepoch.data.prepare.common import (
    PrepareError,
    codes,
    history_index,
    list_column,
    pair_keys,
    rank_in_group,
    sample_negatives,
    user_time_order,
)
from oneepoch.data.schema import Feature, Schema


@dataclass
class Log:
    """An interaction log, one entry per row. ``label`` None = every row is a positive.

    ``item_features`` / ``user_features``: raw columns aligned with the rows (a feature of the
    item or the user, e.g. the item's category; negatives take their item's value).
    """

    user: pa.Array
    item: pa.Array
    ts: np.ndarray | None = None
    label: np.ndarray | None = None
    item_features: dict[str, pa.Array] = field(default_factory=dict)
    user_features: dict[str, pa.Array] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.user)

    def take(self, idx: np.ndarray) -> Log:
        ix = pa.array(idx)
        return Log(self.user.take(ix), self.item.take(ix),
                   None if self.ts is None else self.ts[idx],
                   None if self.label is None else self.label[idx],
                   {k: v.take(ix) for k, v in self.item_features.items()},
                   {k: v.take(ix) for k, v in self.user_features.items()})


def _order(log: Log) -> tuple[np.ndarray, np.ndarray]:
    ucode, _ = codes(log.user)
    order = user_time_order(ucode, log.ts)
    return ucode, order


def split_last(log: Log, fraction: float = 0.0, last: int = 0) -> np.ndarray:
    """Per-user time split: each user's last ``last`` rows, or last ``floor(fraction * n)``
    rows, go to test. Returns a boolean test mask aligned with the log's rows."""
    ucode, order = _order(log)
    pos, size = rank_in_group(ucode[order])
    n_test = np.full(len(size), last) if last else np.floor(size * fraction).astype(np.int64)
    test_sorted = pos >= size - n_test
    mask = np.zeros(len(log), dtype=bool)
    mask[order] = test_sorted
    return mask


def split_global(log: Log, fraction: float) -> np.ndarray:
    """Global time split: the latest ``fraction`` of rows (by time, ties in file order)."""
    if log.ts is None:
        raise PrepareError("a global time split needs a timestamp column")
    order = np.lexsort((np.arange(len(log)), log.ts))
    n_test = int(np.floor(len(log) * fraction))
    mask = np.zeros(len(log), dtype=bool)
    mask[order[len(log) - n_test:]] = True
    return mask


def split_random(log: Log, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Random row split (for logs without time): a seeded ``fraction`` of rows to test."""
    return rng.random(len(log)) < fraction


def _first_value_per_code(code: np.ndarray, n: int, values: pa.Array) -> pa.Array:
    """The value of each code's first row (codes 0..n-1), e.g. an item's category."""
    first = np.full(n, -1, dtype=np.int64)
    rows = np.arange(len(code))[::-1]
    first[code[::-1]] = rows  # later writes win: reversed, so the first row wins
    return values.take(pa.array(first))


def build_ctr_tables(log: Log, test_mask: np.ndarray, *, max_len: int = 20,
                     negatives: int = 0, rng: np.random.Generator, min_history: int = 0,
                     history: bool = True
                     ) -> tuple[dict[str, pa.Table], dict[str, int]]:
    """CTR samples from a log. Returns ``{"train": table, "test": table}`` and counts.

    Each row becomes a sample with label ``log.label`` (or 1 for positive-only logs, which
    then get ``negatives`` sampled negatives each: items the user never interacted with,
    drawn uniformly from the log's items, sharing the positive's history, time and split).
    History = the user's last ``max_len`` earlier positives (item and item features), oldest
    first; rows with fewer than ``min_history`` earlier positives give no sample (counted in
    ``info["dropped_short_history"]``). Rows come out grouped by user, in time order.
    """
    n = len(log)
    ucode, order = _order(log)
    icode, iraw = codes(log.item)
    _, uraw = codes(log.user)
    n_items = len(iraw)
    u = ucode[order]
    label = (np.ones(n, dtype=np.int8) if log.label is None
             else np.asarray(log.label, dtype=np.int8)[order])
    test = np.asarray(test_mask, dtype=bool)[order]
    it = icode[order]
    info: dict[str, int] = {}
    if history and max_len > 0:
        offsets, flat = history_index(u, label == 1, max_len)
    else:
        offsets, flat = np.zeros(n + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    # rows with too short a history give no sample (their positives still count as history)
    row_lens = np.diff(offsets)
    rows = np.flatnonzero(row_lens >= min_history)
    info["dropped_short_history"] = int(n - len(rows))
    # samples: each kept row, then its sampled negatives
    k = negatives if log.label is None else 0
    src = np.repeat(rows, 1 + k)
    is_neg = np.tile(np.arange(1 + k) > 0, len(rows))
    s_item = it[src]
    s_label = label[src].copy()
    if k:
        keys = pair_keys(ucode, icode, n_items)
        neg = sample_negatives(rng, u[src[is_neg]], keys, n_items)
        s_item[is_neg] = neg
        s_label[is_neg] = 0
        failed = neg < 0
        info["negatives_not_found"] = int(failed.sum())
        if failed.any():  # the user interacted with (nearly) every item: no negative
            keep = np.ones(len(src), dtype=bool)
            keep[np.flatnonzero(is_neg)[failed]] = False
            src, is_neg, s_item, s_label = src[keep], is_neg[keep], s_item[keep], s_label[keep]
    lens = row_lens[src]
    # item features are looked up per item code (so negatives get their own item's values)
    item_feats = {name: _first_value_per_code(icode, n_items, col)
                  for name, col in log.item_features.items()}
    user_feats_sorted = {name: col.take(pa.array(order)) for name, col in
                         log.user_features.items()}
    s_offsets = np.zeros(len(src) + 1, dtype=np.int64)
    np.cumsum(lens, out=s_offsets[1:])
    total = int(s_offsets[-1])
    gather = (np.repeat(offsets[:-1][src], lens) + np.arange(total)
              - np.repeat(s_offsets[:-1], lens))
    hist_items = it[flat[gather]] if total else np.zeros(0, dtype=np.int64)
    tables: dict[str, pa.Table] = {}
    s_test = test[src]
    for split, want in (("train", False), ("test", True)):
        sel = np.flatnonzero(s_test == want)
        cols: dict[str, pa.Array] = {}
        ssrc = src[sel]
        cols["user_id"] = uraw.take(pa.array(u[ssrc]))
        for name, col in user_feats_sorted.items():
            cols[name] = col.take(pa.array(ssrc))
        sitem = pa.array(s_item[sel])
        cols["item_ID"] = iraw.take(sitem)
        for name, col in item_feats.items():
            cols[name] = col.take(sitem)
        if history and max_len > 0:
            sl = lens[sel]
            so = np.zeros(len(sel) + 1, dtype=np.int64)
            np.cumsum(sl, out=so[1:])
            g = (np.repeat(s_offsets[:-1][sel], sl) + np.arange(int(so[-1]))
                 - np.repeat(so[:-1], sl))
            hi = pa.array(hist_items[g])
            cols["his_item_ID"] = list_column(so, iraw.take(hi))
            for name, col in item_feats.items():
                cols[f"his_{name}"] = list_column(so, col.take(hi))
        if log.ts is not None:
            cols["timestamp"] = pa.array(np.asarray(log.ts)[order][ssrc])
        cols["label"] = pa.array(s_label[sel])
        tables[split] = pa.table(cols)
    return tables, info


def ctr_schema(name: str, tables: dict[str, pa.Table], max_len: int, *, user_feature: bool,
               user_features: list[str], item_features: list[str], history: bool,
               ) -> Schema:
    """The schema of :func:`build_ctr_tables`' output (``user_ID`` = the ``user_id`` column's
    feature twin, written when ``user_feature``)."""
    feats: list[Feature] = []
    if user_feature:
        feats.append(Feature("user_ID"))
    feats += [Feature(f) for f in user_features]
    if history and max_len > 0:
        feats.append(Feature("his_item_ID", "sequence", max_len, "item_ID"))
        feats += [Feature(f"his_{f}", "sequence", max_len, f) for f in item_features]
    feats.append(Feature("item_ID"))
    feats += [Feature(f) for f in item_features]
    has_ts = "timestamp" in tables["train"].column_names
    return Schema(format="ctr", name=name, label="label", user_key="user_id",
                  timestamp="timestamp" if has_ts else "", features=feats)


def add_user_id_feature(tables: dict[str, pa.Table]) -> dict[str, pa.Table]:
    """Add ``user_ID`` (a copy of ``user_id``) as the first feature column."""
    return {s: t.add_column(1, "user_ID", t.column("user_id")) for s, t in tables.items()}


def positive_rate(table: pa.Table) -> float:
    return float(pc.mean(table.column("label")).as_py() or 0.0) if table.num_rows else 0.0
