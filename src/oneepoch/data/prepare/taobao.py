"""Taobao UserBehavior -> paper A's CTR set + an engagement log, streaming in bounded memory.

``UserBehavior.csv`` (no header): user, item, category, behaviour (pv / cart / fav / buy),
unix timestamp; ~100M rows, 3.7 GB. Two passes keep memory flat in the number of rows:

1. stream the file in blocks (pyarrow's CSV reader), check every value, and spill the rows
   to ``buckets`` temporary Arrow files partitioned by user (LZ4-compressed); collect the
   catalogue of clicked items and their categories (memory ~ number of items);
2. per bucket (rows / buckets in memory): sort each user's behaviours by time (ties in file
   order), build the CTR sample and write the engagement rows.

CTR set (paper A, Table 2): clicks (pv) only, one sample per user with at least
``1 + min_history`` clicks: the target is the user's last click, the history their previous
``max_len`` clicks (items and categories). With ``target: coin`` (default, one sample per user
as in paper A's 987,648 samples) a seeded coin per user replaces the target by a random
negative, an item drawn uniformly from the clicked items that the user never interacted
with (label 0); with ``target: pair`` each user gives both samples. The user ID is not a
feature (``user_id`` stays as the GAUC key). A seeded ``test_fraction`` of users form test.

Engagement log (``engagements/``): every behaviour row, the behaviour type as ``surface``;
for test users, rows at or after their target click are left out (no test leakage).

    >>> from oneepoch.data.prepare import prepare
    >>> prepare("taobao-userbehavior", "raw/UserBehavior.csv", "data/taobao")  # doctest: +SKIP
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from oneepoch.config import choice, num
from oneepoch.data.prepare.common import (
    ENGAGEMENTS_DIR,
    PrepareError,
    Progress,
    Summary,
    TextFormat,
    atomic_dir,
    find_file,
    finish,
    list_column,
    make_options,
    sample_negatives,
    stream_text_table,
)
from oneepoch.data.schema import Feature, Schema

COLUMNS = ["user", "item", "category", "behavior", "timestamp"]
BEHAVIORS = ["pv", "buy", "cart", "fav"]
PV = 0
PAPER_A_TABLE2 = ("Paper A, Table 2 (Taobao): clicks only, 987,648 samples, one per user "
                  "(user_ID dropped); item_ID 725,540 IDs with mean 1.36 occurrences.")
_SPILL = pa.schema([("user", pa.int64()), ("item", pa.int64()), ("category", pa.int64()),
                    ("behavior", pa.int8()), ("timestamp", pa.int64())])


@dataclass
class TaobaoOptions:
    """Settings of the Taobao UserBehavior preparer (``--set key=value``)."""

    max_len: int = num(20, ge=1)  # history length (earlier clicks)
    min_history: int = num(1, ge=0)  # users need 1 + min_history clicks
    target: str = choice("coin", "pair")  # coin: one sample per user (pos or neg); pair: both
    test_fraction: float = num(0.1, ge=0, lt=1)  # share of users in test
    start: int = num(0, ge=0)  # keep timestamps >= start (0: no limit)
    end: int = num(0, ge=0)  # keep timestamps < end (0: no limit)
    engagements: bool = True
    buckets: int = num(64, ge=1, le=4096)  # user partitions spilled to disk (memory: rows/buckets)
    block_mb: int = num(64, ge=1)  # CSV block read at a time
    seed: int = num(0, ge=0)


def mix64(x: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """A seeded SplitMix64 hash of integer IDs (uint64), for per-user decisions that do not
    depend on the order or partition in which users are met."""
    k = np.uint64((seed * 0x9E3779B97F4A7C15 + salt * 0xD1B54A32D192ED03) % (1 << 64))
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + k
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _unit(h: np.ndarray) -> np.ndarray:
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class CatalogueBuilder:
    """Collects clicked items with their first-seen category, batch by batch, in memory
    proportional to the number of items: a dense table while IDs are small non-negative
    integers (Taobao's are), else sorted runs merged with amortised doubling.

        >>> b = CatalogueBuilder()
        >>> b.add(np.array([5, 2, 5]), np.array([1, 2, 3]))
        >>> b.add(np.array([2, 9]), np.array([7, 8]))
        >>> [a.tolist() for a in b.result()]
        [[2, 5, 9], [2, 1, 8]]
    """

    DENSE_LIMIT = 1 << 26

    def __init__(self) -> None:
        self.seen: np.ndarray | None = np.zeros(0, dtype=bool)
        self.cate = np.zeros(0, dtype=np.int64)
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, items: np.ndarray, cats: np.ndarray) -> None:
        if not len(items):
            return
        if self.seen is not None and (items.min() < 0 or items.max() >= self.DENSE_LIMIT):
            known = np.flatnonzero(self.seen)  # switch to sorted runs for good
            self.runs, self.seen = [(known, self.cate[known])], None
        if self.seen is None:
            u, first = np.unique(items, return_index=True)
            self.runs.append((u, cats[first]))
            if sum(len(r[0]) for r in self.runs[1:]) > max(1 << 21, len(self.runs[0][0])):
                self.runs = [self._merge(self.runs)]
            return
        top = int(items.max()) + 1
        if top > len(self.seen):
            size = max(top, 2 * len(self.seen))
            self.seen = np.concatenate([self.seen, np.zeros(size - len(self.seen), bool)])
            self.cate = np.concatenate([self.cate, np.zeros(size - len(self.cate), np.int64)])
        new = np.flatnonzero(~self.seen[items])
        if len(new):
            u, first = np.unique(items[new], return_index=True)
            self.cate[u] = cats[new[first]]
            self.seen[u] = True

    @staticmethod
    def _merge(runs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        items = np.concatenate([r[0] for r in runs])
        cats = np.concatenate([r[1] for r in runs])
        uniq, first = np.unique(items, return_index=True)  # earlier runs win
        return uniq, cats[first]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Sorted unique items and their categories."""
        if self.seen is not None:
            items = np.flatnonzero(self.seen).astype(np.int64)
            return items, self.cate[items]
        return self._merge(self.runs) if self.runs else (np.zeros(0, np.int64),) * 2


class Catalogue:
    """The clicked items (sorted) with their categories, and a fast item -> position lookup:
    a dense table for small non-negative IDs (as Taobao's), else a binary search.

        >>> Catalogue(np.array([3, 7]), np.array([1, 2])).codes(np.array([7, 5, 3])).tolist()
        [1, -1, 0]
    """

    def __init__(self, items: np.ndarray, cates: np.ndarray) -> None:
        self.items, self.cates = items, cates
        self.table: np.ndarray | None = None
        if len(items) and items[0] >= 0 and items[-1] < (1 << 26):
            self.table = np.full(int(items[-1]) + 1, -1, dtype=np.int32)
            self.table[items] = np.arange(len(items), dtype=np.int32)

    def __len__(self) -> int:
        return len(self.items)

    def codes(self, items: np.ndarray) -> np.ndarray:
        """Position of each item in the catalogue, -1 when absent."""
        if self.table is not None:
            ok = (items >= 0) & (items < len(self.table))
            out = np.full(len(items), -1, dtype=np.int64)
            out[ok] = self.table[items[ok]]
            return out
        pos = np.minimum(np.searchsorted(self.items, items), len(self.items) - 1)
        return np.where(self.items[pos] == items, pos, -1)


def _check_batch(path: Path, b: pa.RecordBatch, line: int) -> None:
    for name in COLUMNS:
        col = b.column(name)
        if col.null_count:
            i = int(np.argmax(col.is_null().to_numpy(zero_copy_only=False)))
            raise PrepareError(f"{path}: line {line + i}: column {name!r} is empty")


def _pass1(path: Path, opts: TaobaoOptions, spill: Path, summary: Summary,
           progress: bool) -> tuple[np.ndarray, np.ndarray]:
    fmt = TextFormat(delimiter=",", header=False, names=COLUMNS, quoting=False,
                     types={"user": pa.int64(), "item": pa.int64(), "category": pa.int64(),
                            "behavior": pa.string(), "timestamp": pa.int64()})
    writers = [ipc.new_file(str(spill / f"b{k:04d}.arrow"), _SPILL,
                            options=ipc.IpcWriteOptions(compression="lz4"))
               for k in range(opts.buckets)]
    counts = np.zeros(len(BEHAVIORS), dtype=np.int64)
    builder = CatalogueBuilder()
    n_read = n_time = 0
    prog = Progress("pass 1/2 (read and partition)", enabled=progress)
    behaviors = pa.array(BEHAVIORS)
    try:
        for batch, line in stream_text_table(path, fmt, block_size=opts.block_mb << 20):
            _check_batch(path, batch, line)
            code = pc.index_in(batch.column("behavior"), value_set=behaviors)
            if code.null_count:
                i = int(np.argmax(code.is_null().to_numpy(zero_copy_only=False)))
                raise PrepareError(f"{path}: line {line + i}: column 'behavior': unknown value "
                                   f"{batch.column('behavior')[i].as_py()!r} (expected one of "
                                   f"{BEHAVIORS}); is this UserBehavior.csv (user, item, "
                                   "category, behavior, timestamp, no header)?")
            n = batch.num_rows
            n_read += n
            u = batch.column("user").to_numpy()
            it = batch.column("item").to_numpy()
            cat = batch.column("category").to_numpy()
            beh = code.to_numpy().astype(np.int8)
            ts = batch.column("timestamp").to_numpy()
            keep = np.ones(n, dtype=bool)
            if opts.start:
                keep &= ts >= opts.start
            if opts.end:
                keep &= ts < opts.end
            if not keep.all():
                n_time += int((~keep).sum())
                u, it, cat, beh, ts = u[keep], it[keep], cat[keep], beh[keep], ts[keep]
            counts += np.bincount(beh, minlength=len(BEHAVIORS))
            pv = beh == PV
            builder.add(it[pv], cat[pv])
            bucket = (mix64(u, 0, 1) % np.uint64(opts.buckets)).astype(np.int16)
            order = np.argsort(bucket, kind="stable")  # radix sort on int16
            bounds = np.searchsorted(bucket[order], np.arange(opts.buckets + 1))
            cols = [u[order], it[order], cat[order], beh[order], ts[order]]
            for k in range(opts.buckets):
                lo, hi = bounds[k], bounds[k + 1]
                if hi > lo:
                    writers[k].write_batch(pa.record_batch(
                        [pa.array(c[lo:hi]) for c in cols], schema=_SPILL))
            prog.update(n_read)
    finally:
        for w in writers:
            w.close()
    prog.update(n_read, force=True)
    summary.rows_read["rows"] = n_read
    for name, c in zip(BEHAVIORS, counts, strict=True):
        summary.rows_read[name] = int(c)
    summary.drop("timestamp outside [start, end)", n_time)
    if not n_read:
        raise PrepareError(f"{path}: no rows")
    cat_items, cat_cates = builder.result()
    if not len(cat_items):
        raise PrepareError(f"{path}: no click (pv) rows: nothing to prepare")
    return cat_items, cat_cates


def _bucket_samples(t: pa.Table, opts: TaobaoOptions, catalogue: Catalogue,
                    rng: np.random.Generator
                    ) -> tuple[dict[str, pa.Table], np.ndarray | None, dict[str, int]]:
    """CTR samples of one user bucket, and the engagement rows to keep."""
    u = t.column("user").to_numpy()
    it = t.column("item").to_numpy()
    cat = t.column("category").to_numpy()
    beh = t.column("behavior").to_numpy()
    ts = t.column("timestamp").to_numpy()
    order = np.lexsort((ts, u))  # stable: ties keep file order
    u, it, cat, beh, ts = u[order], it[order], cat[order], beh[order], ts[order]
    pv = np.flatnonzero(beh == PV)
    pu, pi, pcat, pts = u[pv], it[pv], cat[pv], ts[pv]
    info = {"users": int(len(u) and 1 + np.count_nonzero(u[1:] != u[:-1]))}
    if not len(pu):
        return {}, None, info
    new = np.r_[True, pu[1:] != pu[:-1]]
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(pu)]
    n_clicks = ends - starts
    ok = n_clicks >= 1 + opts.min_history
    info["users_too_few_clicks"] = int((~ok).sum()) + info["users"] - len(starts)
    starts, ends = starts[ok], ends[ok]
    if not len(starts):  # nobody here has enough clicks: no sample, every engagement kept
        return {}, None, info
    tgt = ends - 1
    users = pu[tgt]
    lens = np.minimum(tgt - starts, opts.max_len)
    offsets = np.zeros(len(tgt) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    hist_rows = (np.repeat(tgt - lens, lens) + np.arange(int(offsets[-1]))
                 - np.repeat(offsets[:-1], lens))
    # negatives: uniform over clicked items, never interacted with by the user (any behaviour)
    n_cat = len(catalogue)
    cat_items, cat_cates = catalogue.items, catalogue.cates
    ucode = np.searchsorted(users, u)  # users sorted ascending (u is sorted)
    known = np.isin(u, users)
    icode = catalogue.codes(it)
    in_cat = (icode >= 0) & known
    keys = np.sort(ucode[in_cat] * n_cat + icode[in_cat])  # duplicates are harmless
    if opts.target == "coin":
        is_pos = (mix64(users, opts.seed, 2) & np.uint64(1)) == 1
        rows = np.arange(len(users))
    else:
        is_pos = np.tile([True, False], len(users))
        rows = np.repeat(np.arange(len(users)), 2)
    item = pi[tgt][rows].copy()
    cate = pcat[tgt][rows].copy()
    neg = ~is_pos
    draw = sample_negatives(rng, rows[neg], keys, n_cat)
    failed = draw < 0
    item[np.flatnonzero(neg)] = np.where(failed, -1, cat_items[np.maximum(draw, 0)])
    cate[np.flatnonzero(neg)] = np.where(failed, -1, cat_cates[np.maximum(draw, 0)])
    keep = np.ones(len(rows), dtype=bool)
    keep[np.flatnonzero(neg)[failed]] = False
    info["negatives_not_found"] = int(failed.sum())
    test_user = _unit(mix64(users, opts.seed, 3)) < opts.test_fraction
    tables: dict[str, pa.Table] = {}
    for split, want in (("train", False), ("test", True)):
        sel = np.flatnonzero((test_user[rows] == want) & keep)
        r = rows[sel]
        sl = lens[r]
        so = np.zeros(len(r) + 1, dtype=np.int64)
        np.cumsum(sl, out=so[1:])
        g = np.repeat(offsets[:-1][r], sl) + np.arange(int(so[-1])) - np.repeat(so[:-1], sl)
        h = hist_rows[g]
        tables[split] = pa.table({
            "user_id": pa.array(users[r]),
            "his_item_ID": list_column(so, pa.array(pi[h])),
            "his_item_cate": list_column(so, pa.array(pcat[h])),
            "item_ID": pa.array(item[sel]),
            "item_cate": pa.array(cate[sel]),
            "timestamp": pa.array(pts[tgt][r]),
            "label": pa.array(is_pos[sel].astype(np.int8)),
        })
    # engagement rows: all, except a test user's rows at or after the target click
    cut = np.full(len(users), np.iinfo(np.int64).max, dtype=np.int64)
    cut[test_user] = pts[tgt][test_user]
    row_cut = np.where(known, cut[np.minimum(ucode, len(users) - 1)], np.iinfo(np.int64).max)
    target_pos = pv[tgt[test_user]]  # the target rows themselves (ties at the same second)
    eng_keep = ts < row_cut
    eng_keep[target_pos] = False
    info["engagements_held_out"] = int((~eng_keep).sum())
    return tables, order[eng_keep], info


def _ctr_schema(max_len: int) -> Schema:
    return Schema(format="ctr", name="taobao-userbehavior", label="label", user_key="user_id",
                  timestamp="timestamp", features=[
                      Feature("his_item_ID", "sequence", max_len, "item_ID"),
                      Feature("his_item_cate", "sequence", max_len, "item_cate"),
                      Feature("item_ID"), Feature("item_cate")],
                  splits={"train": ["train.parquet"], "test": ["test.parquet"]})


def prepare_taobao(raw: str | Path, out: str | Path, options: dict[str, Any] | None = None,
                   overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Prepare Taobao UserBehavior (see the module docstring); returns the summary."""
    t0 = time.monotonic()
    opts: TaobaoOptions = make_options(TaobaoOptions, options or {}, "taobao-userbehavior")
    path = find_file(raw, ["UserBehavior.csv"], "Taobao UserBehavior")
    summary = Summary(name="taobao-userbehavior", sources={"behaviours": str(path)},
                      options=asdict(opts), reference=PAPER_A_TABLE2)
    out = Path(out)
    with atomic_dir(out, overwrite) as tmp:
        spill = Path(tempfile.mkdtemp(dir=tmp, prefix=".spill-"))
        try:
            catalogue = Catalogue(*_pass1(path, opts, spill, summary, progress))
            summary.extra["clicked_items"] = len(catalogue)
            writers: dict[str, pq.ParquetWriter] = {}
            eng_dir = tmp / ENGAGEMENTS_DIR
            eng_writer = None
            if opts.engagements:
                eng_dir.mkdir()
                eng_schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()),
                                        ("surface", pa.string()), ("timestamp", pa.int64())])
                eng_writer = pq.ParquetWriter(eng_dir / "engagements.parquet", eng_schema)
            totals: dict[str, int] = {}
            pos: dict[str, int] = {}
            surfaces = pa.array(BEHAVIORS)
            prog = Progress("pass 2/2 (samples per user bucket)", total=opts.buckets,
                            enabled=progress, unit="buckets")
            for k in range(opts.buckets):
                with ipc.open_file(str(spill / f"b{k:04d}.arrow")) as f:
                    t = f.read_all()
                rng = np.random.default_rng([opts.seed, 13, k])
                tables, eng_rows, info = _bucket_samples(t, opts, catalogue, rng)
                for key, v in info.items():
                    totals[key] = totals.get(key, 0) + v
                for split, st in tables.items():
                    if split not in writers:
                        writers[split] = pq.ParquetWriter(tmp / f"{split}.parquet", st.schema)
                    writers[split].write_table(st)
                    summary.samples[split] = summary.samples.get(split, 0) + st.num_rows
                    pos[split] = pos.get(split, 0) + int(pc.sum(st.column("label")).as_py() or 0)
                if eng_writer is not None:
                    e = t.take(pa.array(eng_rows if eng_rows is not None
                                        else np.arange(t.num_rows)))
                    eng_writer.write_table(pa.table({
                        "user_id": e.column("user"), "item_id": e.column("item"),
                        "surface": surfaces.take(e.column("behavior")),
                        "timestamp": e.column("timestamp")}, schema=eng_schema))
                (spill / f"b{k:04d}.arrow").unlink()
                prog.update(k + 1)
            for w in writers.values():
                w.close()
            if eng_writer is not None:
                eng_writer.close()
                Schema(format="engagements", name="taobao-userbehavior-engagements",
                       user="user_id", item="item_id", surface="surface",
                       timestamp="timestamp",
                       splits={"train": ["engagements.parquet"]}).save(eng_dir)
                summary.extra["engagements"] = summary.rows_read["rows"] - sum(
                    summary.dropped.values()) - totals.get("engagements_held_out", 0)
                summary.notes.append(
                    f"{ENGAGEMENTS_DIR}/: {summary.extra['engagements']:,} behaviours, surface "
                    "= behaviour type; test users' behaviours at or after their target click "
                    f"({totals.get('engagements_held_out', 0):,} rows) left out")
        finally:
            shutil.rmtree(spill, ignore_errors=True)
        if set(summary.samples) != {"train", "test"}:
            raise PrepareError(f"{path}: too few users with {1 + opts.min_history}+ clicks to "
                               f"fill train and test (samples: {summary.samples})")
        summary.positive_rate = {s: pos[s] / max(n, 1) for s, n in summary.samples.items()}
        summary.extra["users"] = totals.get("users", 0)
        summary.drop(f"users with fewer than {1 + opts.min_history} clicks (no sample)",
                     totals.get("users_too_few_clicks", 0))
        summary.drop("no unclicked item left for a negative",
                     totals.get("negatives_not_found", 0))
        summary.notes.append(f"one sample per user ({opts.target}); {opts.test_fraction:g} of "
                             "users in test; user ID is not a feature (user_id = GAUC key)")
        _ctr_schema(opts.max_len).save(tmp)
        summary.reference += f" This run: {sum(summary.samples.values()):,} samples."
        result = finish(tmp, summary, t0)
    return result
