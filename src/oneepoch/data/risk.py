"""Is a data set at risk of the one-epoch drop? Rare-ID shares before training, and the
ID-frequency buckets of test rows for per-bucket AUC during training.

Paper A traces the drop to rare, fine-grained IDs: an embedding row seen a handful of times is
memorised in epoch 1 and over-fitted from the first step of epoch 2. :func:`data_risk` measures,
per ID field, how much of the test split rests on such IDs, before any training:

* ``row_share[k]``: the share of test rows whose ID occurs at most ``k`` times in the training
  split's column of that field (``k = 0`` is "never seen");
* ``test_id_share[k]``: the same over the distinct IDs of the test column;
* ``train_id_share[k]``: the share of the training column's distinct IDs seen at most ``k``
  times.

Counting streams: each split is read batch by batch (``pyarrow.parquet.ParquetFile.
iter_batches``); integer IDs are counted in one array indexed by the ID (remapped IDs, the
common case), other IDs (strings, or integers spread over more than 2^24 values) by a hash
aggregation per batch merged into exact counts (see :class:`IdCounter`). Memory is bounded by
the IDs' range or number, not by rows. The test split is counted the same way and looked up
in the training counts once at the end.

A field that shares its vocabulary with a sequence (``his_item_ID`` with ``vocab: item_ID``)
is measured on its own column's counts, and additionally (``vocab_row_share``) on the counts
pooled over every field of the vocabulary, entries of the sequences included: those are what
its embedding rows see (the trainer's vocabulary counts). The calibration in
docs/diagnostics.md found the field's own counts the better predictor of the drop (a history
mention barely trains an item's row), so the rule and the per-bucket AUC use them. Sequence
fields get no test-row figures of their own.

The rule (:func:`risk_level`) reads the riskiest field's share of test rows whose ID is seen
1 or 2 times (``row_share[2] - row_share[0]``: rare yet trained); its thresholds were set from
the measurements in docs/diagnostics.md.

    >>> r = data_risk("runs/demo/data")                    # doctest: +SKIP
    >>> print(r["expectation"])                            # doctest: +SKIP
    high risk: 16% of test rows carry an item_ID seen 1-2 times in training, 23% one never
    seen (expect a test-AUC drop at the start of epoch 2)
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from oneepoch.data.schema import SCHEMA_FILE, DataError, Schema, load_schema, split_files
from oneepoch.metrics import bucket_names

K_VALUES = (0, 1, 2, 5, 10)
RULE_K = 2  # the rule reads the share of test rows whose ID is seen 1..RULE_K times
# Thresholds on that share (of the riskiest field), from docs/diagnostics.md's calibration.
HIGH_RISK = 0.12
MEDIUM_RISK = 0.05
BATCH_ROWS = 1 << 20  # rows per streamed batch


# ----------------------------------------------------------------------------- counting


DENSE_MAX_RANGE = 1 << 24  # integer IDs spanning at most this many values: one count array


class IdCounter:
    """Exact occurrence counts of IDs fed batch by batch (nulls counted apart, in ``nulls``).

    Integer IDs whose values span at most ``dense_max`` numbers (remapped IDs, as most logs
    have) are counted in one array indexed by ``id - min`` (``np.add.at``, or ``np.bincount``
    when the range is smaller than the batch): no hashing, memory 8 bytes per number of the
    range. Otherwise (strings, or IDs spread wider) each batch is reduced by
    a hash aggregation (a ``group_by`` count: measured 4x faster than ``pc.value_counts`` on
    wide integers, as fast on strings); the pairs are buffered and merged
    into the running counts (a ``group_by`` sum) whenever the buffer holds more pairs than the
    counts, so memory stays ~ distinct IDs and merges get rarer as counts grow.

        >>> c = IdCounter(pa.int64())
        >>> c.add(pa.array([3, 1, 3])); c.add(pa.array([3, 2, None]))
        >>> k, n = c.result(); sorted(zip(k.tolist(), n.tolist())), c.nulls
        ([(1, 1), (2, 1), (3, 3)], 1)
    """

    def __init__(self, type_: pa.DataType, min_merge: int = 1 << 20,
                 dense_max: int = DENSE_MAX_RANGE):
        self.type = type_
        self.min_merge = min_merge
        self.dense_max = dense_max
        self.dense: np.ndarray | None = None  # counts of lo .. lo + len - 1 (dense mode)
        self.lo = 0
        self.seen_lo = self.seen_hi = 0  # smallest / largest ID counted densely
        self.hashed = not pa.types.is_integer(type_)
        self.keys: pa.Array = pa.array([], type=type_)
        self.counts: pa.Array = pa.array([], type=pa.int64())
        self._pending: list[tuple[pa.Array, pa.Array]] = []  # (IDs, counts) per batch
        self._pending_len = 0
        self.values_seen = 0
        self.nulls = 0

    def add(self, values: pa.Array) -> None:
        """Count one batch of IDs (already of the counter's type)."""
        if values.null_count:
            self.nulls += values.null_count
            values = values.drop_null()
        self.values_seen += len(values)
        if len(values) == 0:
            return
        if not self.hashed:
            self._add_dense(values.to_numpy().astype(np.int64, copy=False))
            return
        self._add_hashed(values)

    def _add_hashed(self, values: pa.Array) -> None:
        g = pa.table({"k": values}).group_by("k", use_threads=False).aggregate([("k", "count")])
        self._pending.append((g.column("k").combine_chunks(),
                              g.column("k_count").combine_chunks().cast(pa.int64())))
        self._pending_len += g.num_rows
        if self._pending_len > max(self.min_merge, len(self.keys)):
            self._merge()

    def _add_dense(self, v: np.ndarray) -> None:
        vmin, vmax = int(v.min()), int(v.max())
        if self.dense is None:
            lo, hi = vmin, vmax
        else:
            lo, hi = min(self.seen_lo, vmin), max(self.seen_hi, vmax)
        if hi - lo + 1 > self.dense_max:  # too spread out: hash from now on
            self._to_hashed()
            self._add_hashed(pa.array(v, type=self.type))
            return
        if self.dense is None:
            self.dense, self.lo = np.zeros(hi - lo + 1, dtype=np.int64), lo
        elif lo < self.lo or hi >= self.lo + len(self.dense):
            # slack on the growing side(s), so growth is amortised (within the limit)
            room = max(0, min(len(self.dense), self.dense_max - (hi - lo + 1)))
            both = lo < self.lo and hi >= self.lo + len(self.dense)
            new_lo = lo - (room // 2 if both else room) if lo < self.lo else lo
            new_hi = (hi + (room // 2 if both else room) if hi >= self.lo + len(self.dense)
                      else hi)
            grown = np.zeros(new_hi - new_lo + 1, dtype=np.int64)
            a, b = self.seen_lo - self.lo, self.seen_hi - self.lo + 1  # the part in use
            grown[self.seen_lo - new_lo:self.seen_hi - new_lo + 1] = self.dense[a:b]
            self.dense, self.lo = grown, new_lo
        self.seen_lo, self.seen_hi = lo, hi
        idx = v - self.lo
        if vmax - vmin + 1 <= len(v):  # a small range: one bincount over it
            self.dense[vmin - self.lo:vmax - self.lo + 1] += np.bincount(
                idx - (vmin - self.lo), minlength=vmax - vmin + 1)
        else:
            np.add.at(self.dense, idx, 1)

    def _to_hashed(self) -> None:
        if self.dense is not None:
            nz = np.flatnonzero(self.dense)
            self.keys = pa.array(nz + self.lo, type=self.type)
            self.counts = pa.array(self.dense[nz])
            self.dense = None
        self.hashed = True

    def _merge(self) -> None:
        if not self._pending:
            return
        keys = [self.keys] + [k for k, _ in self._pending]
        counts = [self.counts] + [c for _, c in self._pending]
        self._pending, self._pending_len = [], 0
        t = pa.table({"k": pa.concat_arrays(keys), "c": pa.concat_arrays(counts)})
        g = t.group_by("k", use_threads=False).aggregate([("c", "sum")])
        self.keys = g.column("k").combine_chunks()
        self.counts = g.column("c_sum").combine_chunks()

    def result(self) -> tuple[pa.Array | np.ndarray, np.ndarray]:
        """Distinct non-null IDs and their counts. Counted densely, the IDs are an ascending
        int64 NumPy array; otherwise an Arrow array in no particular order."""
        if self.dense is not None:
            nz = np.flatnonzero(self.dense)
            return nz + self.lo, self.dense[nz]
        self._merge()
        return self.keys, self.counts.to_numpy(zero_copy_only=False).astype(np.int64)

    def nonzero_counts(self) -> np.ndarray:
        """The counts of the distinct IDs (no IDs: cheaper than :meth:`result`)."""
        if self.dense is not None:
            return self.dense[self.dense > 0]
        return self.result()[1]

    def count_of(self, keys: pa.Array | np.ndarray) -> np.ndarray:
        """Count of each of ``keys`` (0 when absent or null): an index into the dense counts,
        else one hash join."""
        if isinstance(keys, np.ndarray):
            if self.dense is None:
                keys = pa.array(keys, type=self.type)
        elif self.dense is not None and pa.types.is_integer(keys.type) and not keys.null_count:
            keys = keys.to_numpy().astype(np.int64, copy=False)
        if isinstance(keys, np.ndarray):
            k = keys.astype(np.int64, copy=False) - self.lo
            ok = (k >= 0) & (k < len(self.dense))
            return np.where(ok, self.dense[np.where(ok, k, 0)], 0)
        keys_, counts = self.result()
        if isinstance(keys_, np.ndarray):
            keys_ = pa.array(keys_, type=self.type)
        return train_count_of(keys, keys_, counts)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _plain_type(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def _id_type(t: pa.DataType, where: str) -> pa.DataType:
    """The ID type inside a column type (list element for lists); DataError if not an ID."""
    t = _plain_type(t)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        t = _plain_type(t.value_type)
    if pa.types.is_integer(t) or _is_string(t):
        return t
    raise DataError(f"{where}: expected int or string IDs, got {t}")


def _to_key(arr: pa.Array | pa.ChunkedArray, key_type: pa.DataType, where: str) -> pa.Array:
    """IDs (flattened when a list column) as ``key_type`` (int64 or string)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        arr = pc.list_flatten(arr)
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    if arr.type.equals(key_type):
        return arr
    try:
        return arr.cast(key_type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise DataError(f"{where}: IDs of type {arr.type} cannot be compared with the training "
                        f"split's {key_type} IDs") from e


# ----------------------------------------------------------------------------- the measurement


@dataclass
class FieldRisk:
    """Rare-ID figures of one single-ID field (shares in [0, 1], keyed by ``k``)."""

    field: str
    vocab: str
    train_ids: int  # distinct IDs of the field's column in the training split
    test_rows: int
    test_ids: int  # distinct IDs of the field in the test split (nulls count as one, unseen)
    row_share: dict[int, float] = field(default_factory=dict)
    test_id_share: dict[int, float] = field(default_factory=dict)
    train_id_share: dict[int, float] = field(default_factory=dict)
    # when the vocabulary is shared with other fields (a history): counts pooled over them
    vocab_train_ids: int = -1
    vocab_row_share: dict[int, float] = field(default_factory=dict)


def _check_split(directory: Path, schema: Schema, split: str, role: str) -> list[Path]:
    if split not in schema.splits:
        raise DataError(f"{directory / SCHEMA_FILE}: no {split!r} split (has "
                        f"{sorted(schema.splits)}); data risk needs the {role} split")
    return split_files(directory, schema, split)


def _columns_ok(files: list[Path], columns: list[str]) -> None:
    for f in files:
        try:
            sch = pq.read_schema(f)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types here
            raise DataError(f"{f}: not a readable Parquet file ({e})") from e
        missing = [c for c in columns if c not in sch.names]
        if missing:
            raise DataError(f"{f}: missing column(s) {missing} named in {SCHEMA_FILE}")
        for c in columns:
            _id_type(sch.field(c).type, f"{f}: column {c!r}")


def _batches(files: list[Path], columns: list[str], batch_rows: int, stats: dict[str, int]):
    for f in files:
        pf = pq.ParquetFile(f)
        for g in range(pf.num_row_groups):
            # a row group at a time: iter_batches over the whole file keeps more memory
            # (measured: 552 vs 205 MiB peak over 3 x 10^7 rows); huge groups are streamed
            if pf.metadata.row_group(g).num_rows <= 4 * batch_rows:
                parts = pf.read_row_group(g, columns=columns).to_batches(batch_rows)
            else:
                parts = pf.iter_batches(batch_size=batch_rows, row_groups=[g], columns=columns)
            yield from _counted(f, parts, stats)


def _counted(f: Path, parts: Any, stats: dict[str, int]):
    for b in parts:
        if b.num_rows:
            stats["batches"] += 1
            stats["rows"] += b.num_rows
            stats["peak_arrow_bytes"] = max(stats["peak_arrow_bytes"],
                                            pa.total_allocated_bytes())
            yield f, b


def data_risk(directory: str | Path, fields: list[str] | None = None, train_split: str = "train",
              test_split: str = "test", ks: tuple[int, ...] = K_VALUES,
              batch_rows: int = BATCH_ROWS) -> dict[str, Any]:
    """Measure rare-ID risk of a CTR data-set folder (see module doc). One streaming pass over
    each split.

    Args:
        directory: data-set folder (``schema.yaml`` + Parquet).
        fields: single-ID fields to report (default: all); naming a column that is not an ID
            field is a :class:`DataError`.
        train_split, test_split: split names in the schema.
        ks: the thresholds ``k`` ("seen at most k times").
        batch_rows: rows per streamed batch (memory knob).

    Returns:
        A JSON-ready dict: ``fields`` (one :class:`FieldRisk` dict each), ``expectation`` (the
        rule's one-line statement), ``level`` (high / medium / low), ``rule``, ``io``
        (rows, batches, seconds) and the thresholds used.
    """
    t0 = time.perf_counter()
    directory = Path(directory)
    schema = load_schema(directory)
    if schema.format != "ctr":
        raise DataError(f"{directory / SCHEMA_FILE}: format is {schema.format!r}; data risk "
                        "needs a CTR data set (format: ctr)")
    singles = [f.name for f in schema.features if not f.is_sequence]
    if fields:
        for name in fields:
            if name not in schema.feature_names:
                raise DataError(f"{directory / SCHEMA_FILE}: {name!r} is not an ID field "
                                f"(ID fields: {', '.join(singles)})")
            if schema.feature(name).is_sequence:
                raise DataError(f"{directory / SCHEMA_FILE}: {name!r} is a sequence field; its "
                                f"entries count toward vocabulary "
                                f"{schema.feature(name).vocab_name!r}: name a single-ID field "
                                f"(ID fields: {', '.join(singles)})")
        report = list(dict.fromkeys(fields))
    else:
        report = singles
    if not report:
        raise DataError(f"{directory / SCHEMA_FILE}: no single-ID field to report")
    ks = tuple(sorted({int(k) for k in ks} | {0, RULE_K}))  # the rule reads 0 and RULE_K
    if batch_rows < 1:
        raise DataError(f"data risk: --batch-rows must be >= 1, got {batch_rows}")
    train_files = _check_split(directory, schema, train_split, "training")
    test_files = _check_split(directory, schema, test_split, "test")
    feats = schema.feature_names
    _columns_ok(train_files, feats)
    _columns_ok(test_files, report)

    # key type per vocabulary: string if any of its columns holds strings, else int64
    first = pq.read_schema(train_files[0])
    key_types: dict[str, pa.DataType] = {}
    for feat in schema.features:
        t = _id_type(first.field(feat.name).type, f"{train_files[0]}: column {feat.name!r}")
        prev = key_types.get(feat.vocab_name)
        key_types[feat.vocab_name] = (pa.string() if _is_string(t) or (
            prev is not None and pa.types.is_string(prev)) else pa.int64())

    io = {"batches": 0, "rows": 0, "peak_arrow_bytes": 0}
    train_io = dict(io)
    counters = {v: IdCounter(key_types[v]) for v in schema.vocab_names}
    users = {v: [f.name for f in schema.features if f.vocab_name == v] for v in schema.vocab_names}
    own = {n: IdCounter(key_types[schema.feature(n).vocab_name]) for n in report
           if len(users[schema.feature(n).vocab_name]) > 1}
    for f, b in _batches(train_files, feats, batch_rows, train_io):
        for feat in schema.features:
            ids = _to_key(b.column(feat.name), key_types[feat.vocab_name],
                          f"{f}: column {feat.name!r}")
            counters[feat.vocab_name].add(ids)
            if feat.name in own:
                own[feat.name].add(ids)

    test_io = dict(io)
    tcounters = {n: IdCounter(key_types[schema.feature(n).vocab_name]) for n in report}
    for f, b in _batches(test_files, report, batch_rows, test_io):
        for n in report:
            tcounters[n].add(_to_key(b.column(n), key_types[schema.feature(n).vocab_name],
                                     f"{f}: column {n!r}"))

    out: list[FieldRisk] = []
    for n in report:
        vname = schema.feature(n).vocab_name
        tkeys, tcount = tcounters[n].result()
        nulls = tcounters[n].nulls  # null test IDs: unseen (the encoder's row 0)
        fc = own.get(n, counters[vname])  # the field's own column
        rcount = fc.nonzero_counts()
        seen = fc.count_of(tkeys)
        rows = int(tcount.sum()) + nulls
        fr = FieldRisk(n, vname, len(rcount), rows, len(tkeys) + (nulls > 0))
        fr.row_share = _row_shares(tcount, seen, nulls, ks)
        for k in ks:
            rare = seen <= k
            fr.test_id_share[k] = (float((rare.sum() + (nulls > 0)) / fr.test_ids)
                                   if fr.test_ids else float("nan"))
            fr.train_id_share[k] = float((rcount <= k).mean()) if len(rcount) else float("nan")
        if n in own:  # shared vocabulary: also what its embedding rows see
            fr.vocab_train_ids = len(counters[vname].nonzero_counts())
            fr.vocab_row_share = _row_shares(tcount, counters[vname].count_of(tkeys), nulls, ks)
        out.append(fr)
        del tkeys, tcount, seen, rcount
        tcounters.pop(n)
    level, line = risk_level(out)
    seconds = time.perf_counter() - t0
    return {
        "data": str(directory), "train_split": train_split, "test_split": test_split,
        "ks": list(ks), "fields": [asdict(f) for f in out], "level": level, "expectation": line,
        "rule": rule_text(),
        "thresholds": {"k": RULE_K, "high": HIGH_RISK, "medium": MEDIUM_RISK},
        "io": {"train_rows": train_io["rows"], "test_rows": test_io["rows"],
               "train_batches": train_io["batches"], "test_batches": test_io["batches"],
               "batch_rows": batch_rows, "seconds": seconds,
               "peak_arrow_mib": max(train_io["peak_arrow_bytes"],
                                     test_io["peak_arrow_bytes"]) / 2**20},
    }


def _row_shares(test_counts: np.ndarray, train_counts: np.ndarray, nulls: int,
                ks: tuple[int, ...]) -> dict[int, float]:
    """Share of test rows (distinct IDs weighted by their test rows; null IDs unseen) whose
    training count is at most k, for each k."""
    rows = int(test_counts.sum()) + nulls
    if not rows:
        return {k: float("nan") for k in ks}
    return {k: float((test_counts[train_counts <= k].sum() + nulls) / rows) for k in ks}


def train_count_of(keys: pa.Array, train_keys: pa.Array, train_counts: np.ndarray
                   ) -> np.ndarray:
    """Training count of each of ``keys`` (0 when absent or null), by one hash join."""
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int64)
    left = pa.table({"k": keys, "i": pa.array(np.arange(len(keys), dtype=np.int64))})
    right = pa.table({"k": train_keys, "c": pa.array(train_counts)})
    j = left.join(right, "k", join_type="left outer", use_threads=False)
    out = np.zeros(len(keys), dtype=np.int64)
    idx = j.column("i").to_numpy()
    out[idx] = pc.fill_null(j.column("c"), 0).to_numpy()
    return out


# ----------------------------------------------------------------------------- the rule


def rare_seen_share(f: FieldRisk | dict[str, Any], k: int = RULE_K) -> float:
    """Share of test rows whose ID the training column holds 1..k times: rare, yet trained
    (unseen IDs hit the untrained out-of-vocabulary row and cannot be over-fitted)."""
    rs = f.row_share if isinstance(f, FieldRisk) else f["row_share"]
    return rs[k] - rs[0]


def rule_text() -> str:
    return (f"riskiest field = largest share of test rows whose ID is seen 1 to {RULE_K} times in "
            f"training; high risk if that share >= {HIGH_RISK:.0%}, medium if >= "
            f"{MEDIUM_RISK:.0%}, else low (thresholds from docs/diagnostics.md)")


def risk_level(fields: list[FieldRisk]) -> tuple[str, str]:
    """(level, one-line expectation) of the rule on the measured fields."""
    if not fields or any(RULE_K not in f.row_share or 0 not in f.row_share for f in fields):
        return "unknown", f"unknown risk: k = 0 and k = {RULE_K} were not both measured"
    best = max(fields, key=rare_seen_share)
    share = rare_seen_share(best)
    level = "high" if share >= HIGH_RISK else "medium" if share >= MEDIUM_RISK else "low"
    what = {"high": "expect a test-AUC drop at the start of epoch 2",
            "medium": "a small drop after epoch 1 is possible",
            "low": "no one-epoch drop expected from rare IDs"}[level]
    art = "an" if best.field[:1].lower() in "aeiou" else "a"
    return level, (f"{level} risk: {100 * share:.0f}% of test rows carry {art} {best.field} seen "
                   f"1-{RULE_K} times in training, {100 * best.row_share[0]:.0f}% one never "
                   f"seen ({what})")


# ----------------------------------------------------------------------------- output


def format_risk(r: dict[str, Any]) -> str:
    """The risk figures as a Markdown table plus the expectation line."""
    ks = r["ks"]
    head = ["field", "vocab", "train IDs", "test rows", "test IDs"]
    lines = ["| " + " | ".join(head + [f"rows <= {k}" for k in ks] +
                               [f"test IDs <= {k}" for k in ks]) + " |",
             "|" + "---|" * 2 + "---:|" * (3 + 2 * len(ks))]
    for f in r["fields"]:
        rs = [f"{100 * f['row_share'][k]:.1f}%" for k in ks]
        ids = [f"{100 * f['test_id_share'][k]:.1f}%" for k in ks]
        lines.append(f"| {f['field']} | {f['vocab']} | {f['train_ids']:,} | {f['test_rows']:,} | "
                     f"{f['test_ids']:,} | " + " | ".join(rs + ids) + " |")
    io = r["io"]
    lines += ["", "rows <= k: share of test rows whose ID occurs at most k times in the training "
              "split (k = 0: unseen); test IDs <= k: the same over distinct test IDs.",
              f"{io['train_rows']:,} train + {io['test_rows']:,} test rows in "
              f"{io['train_batches'] + io['test_batches']} batches, {io['seconds']:.1f} s",
              "", r["expectation"]]
    return "\n".join(lines)


def write_risk(r: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``risk.json``, ``risk.md`` and ``risk.png`` (test-row share against k, one curve
    per field) into ``out_dir`` (each via a temporary file)."""
    from oneepoch.io import atomic_write_text
    from oneepoch.report.figures import plot_risk

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "risk.json", "md": out / "risk.md", "png": out / "risk.png"}
    atomic_write_text(paths["json"], json.dumps(r, indent=1))
    atomic_write_text(paths["md"], f"# Rare-ID risk of {r['data']}\n\n{format_risk(r)}\n")
    plot_risk({f["field"]: (r["ks"], [f["row_share"][k] for k in r["ks"]]) for f in r["fields"]},
              paths["png"], r["expectation"])
    return paths


# ----------------------------------------------------------------------------- buckets


DEFAULT_BOUNDS = (5, 50)


def pick_bucket_field(data: Any, field_name: str = "auto") -> str:
    """The field per-bucket AUC uses: ``auto`` = the single-ID field with the largest
    vocabulary (first on ties); otherwise a single-ID field's name (checked)."""
    if field_name == "auto":
        if not data.single_fields:
            raise DataError("eval.bucket_field: the data set has no single-ID field")
        sizes = [data.vocabs[data.field_vocab(f)].size for f in data.single_fields]
        return data.single_fields[int(np.argmax(sizes))]
    if field_name not in data.single_fields:
        kind = "a sequence field" if field_name in data.seq_fields else "not an ID field"
        raise DataError(f"eval.bucket_field: {field_name!r} is {kind} (single-ID fields: "
                        f"{', '.join(data.single_fields)})")
    return field_name


def frequency_buckets(data: Any, field_name: str = "auto",
                      bounds: tuple[int, ...] | list[int] = DEFAULT_BOUNDS, split: str = "test",
                      train_split: str = "train"
                      ) -> tuple[np.ndarray, list[str], dict[str, str]]:
    """Bucket each row of ``split`` by the training count of its ID in ``field_name``.

    The count is the number of ``train_split`` rows whose encoded ``field_name`` column holds
    the same row (so after an ID filter or hash, the count of the row the model sees); row 0,
    out of vocabulary, counts 0. As in ``data risk``, the field's own column is counted, not
    the entries of a sequence sharing its vocabulary. With bounds ``(a, b)``: ``unseen`` = 0,
    ``tail`` = 1..a, ``torso`` = a+1..b, ``head`` > b. One ``bincount`` over the training
    column and one gather: compute once per run.

    Returns:
        (bucket index per row as int8, bucket names, {name: count range as text}).

        >>> from types import SimpleNamespace as NS
        >>> tr = NS(ids=np.array([[1]] * 60 + [[2]] * 7 + [[3]]))
        >>> d = NS(single_fields=["item"], seq_fields=[], vocabs={"item": NS(size=4)},
        ...        field_vocab=lambda f: f,
        ...        splits={"train": tr, "test": NS(ids=np.array([[0], [1], [2], [3]]))})
        >>> b, names, _ = frequency_buckets(d, "item", (5, 50)); [names[i] for i in b]
        ['unseen', 'head', 'torso', 'tail']
    """
    b = sorted({int(x) for x in bounds})
    if len(b) != len(list(bounds)) or not b or b[0] < 1:
        raise DataError(f"eval.bucket_bounds: need distinct positive counts, got {list(bounds)}")
    name = pick_bucket_field(data, field_name)
    j = data.single_fields.index(name)
    size = data.vocabs[data.field_vocab(name)].size
    train_ids = np.asarray(data.splits[train_split].ids[:, j])
    per_row = np.bincount(train_ids, minlength=size).astype(np.int64)
    per_row[0] = 0
    test_ids = np.asarray(data.splits[split].ids[:, j])
    counts = per_row[test_ids]
    idx = np.searchsorted(np.asarray(b), counts, side="left") + 1
    idx[counts == 0] = 0
    names = bucket_names(len(b))
    lo = [1] + [x + 1 for x in b]
    ranges = {"unseen": "0"}
    for i, nm in enumerate(names[1:]):
        ranges[nm] = f"{lo[i]}-{b[i]}" if i < len(b) else f">{b[-1]}"
    return idx.astype(np.int8), names, ranges


def eval_buckets(data: Any, eval_cfg: Any, train_split: str = "train", test_split: str = "test"
                 ) -> tuple[np.ndarray, list[str], dict[str, str]] | None:
    """The trainer's buckets from an :class:`oneepoch.config.EvalConfig`: None when
    ``bucket_field`` is off (``""`` / ``none``), else :func:`frequency_buckets` of the test
    split. Call once per run; then at each evaluation
    ``row.update(bucket_metrics(labels, probs, *buckets[:2]))``."""
    name = str(getattr(eval_cfg, "bucket_field", "") or "")
    if name.lower() in ("", "none", "off"):
        return None
    return frequency_buckets(data, name, list(eval_cfg.bucket_bounds), test_split, train_split)
