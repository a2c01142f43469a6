"""Generic interaction table -> CTR data set.

For your own logs and for tables already remapped and split (e.g. the KGAT Amazon Books and
multi-behaviour Taobao tables). The input is one delimited file (gzip accepted) with a header;
options name the columns:

- ``user``, ``item`` (required);
- ``label``: a 0/1 column; without one the log is positive-only and every row gets
  ``negatives`` sampled items the user never interacted with (in any split) as label 0;
- ``where``: keep only rows where this 0/1 column is 1 (e.g. ``view``);
- ``split``: a column of ``train``/``test`` values (other values are dropped and counted);
  without one, ``time`` gives a per-user time split (latest ``test_fraction`` of rows), and
  without either a seeded random row split;
- ``time``: timestamps, also enabling histories (``his_item_ID`` of the last ``max_len``
  earlier positives);
- ``item_features`` / ``user_features``: extra categorical columns (e.g. a category); an
  item's first value is used for every sample of the item, negatives included.

    >>> from oneepoch.data.prepare import prepare
    >>> prepare("interactions", "taobao-mb/interactions.csv.gz", "data/taobao-mb",
    ...         {"label": "buy", "where": "view", "split": "view_split"})   # doctest: +SKIP
    >>> prepare("interactions", "amazon-book-kgat/interactions.csv.gz", "data/kgat",
    ...         {"split": "split", "negatives": 1})                       # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from oneepoch.config import ConfigError, num, setting
from oneepoch.data.prepare.common import (
    PrepareError,
    Summary,
    TextFormat,
    atomic_dir,
    ctr_split_stats,
    find_file,
    finish,
    make_options,
    read_text_table,
    write_ctr,
)
from oneepoch.data.prepare.samples import (
    Log,
    add_user_id_feature,
    build_ctr_tables,
    ctr_schema,
    split_last,
    split_random,
)


def _one_char(v: str) -> str | None:
    ok = len(v) == 1 or v in ("\\t", "tab")
    return None if ok else "the delimiter must be one character (\\t or tab for tabs)"


@dataclass
class InteractionsOptions:
    """Settings of the generic interaction-table preparer (``--set key=value``)."""

    user: str = "user_id"
    item: str = "item_id"
    label: str = ""  # 0/1 column; empty: positive-only log, negatives are sampled
    where: str = ""  # keep rows where this 0/1 column is 1
    split: str = ""  # column with train/test values
    time: str = ""  # timestamp column (histories; per-user time split when no split column)
    item_features: list[str] = field(default_factory=list)
    user_features: list[str] = field(default_factory=list)
    negatives: int = num(1, ge=0)  # per positive, positive-only logs
    max_len: int = num(20, ge=0)  # history length (needs time)
    min_history: int = num(0, ge=0)
    test_fraction: float = num(0.2, gt=0, lt=1)  # without a split column
    user_id: bool = True  # user_ID as a feature
    delimiter: str = setting(",", check=_one_char)  # one character (\\t or tab: a tab)
    seed: int = num(0, ge=0)

    def validate(self, prefix: str) -> None:
        if not self.user or not self.item:
            raise ConfigError(f"config keys '{prefix}user' and '{prefix}item': name the user "
                              "and item columns")
        if not self.label and self.negatives == 0:
            raise ConfigError(f"config key '{prefix}negatives': without a label column every "
                              "row is a positive: set negatives >= 1 (or name the label column)")


def _zero_one(path: Path, t: pa.Table, col: str) -> np.ndarray:
    """A 0/1 column as int8, with an error naming the first bad row's line."""
    c = t.column(col).combine_chunks()
    if not (pa.types.is_integer(c.type) or pa.types.is_floating(c.type)
            or pa.types.is_boolean(c.type)):
        raise PrepareError(f"{path}: column {col!r}: expected 0/1 values, got {c.type}")
    v = pc.fill_null(c.cast(pa.float64()), -1.0).to_numpy()
    bad = (v != 0) & (v != 1)
    if bad.any():
        i = int(np.argmax(bad))
        raise PrepareError(f"{path}: line {i + 2}: column {col!r}: expected 0 or 1, got "
                           f"{c[i].as_py()!r} ({int(bad.sum()):,} such row(s))")
    return v.astype(np.int8)


def prepare_interactions(raw: str | Path, out: str | Path, options: dict[str, Any] | None = None,
                         overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Prepare a generic interaction table (see the module docstring); returns the summary."""
    t0 = time.monotonic()
    opts: InteractionsOptions = make_options(InteractionsOptions, options or {}, "interactions")
    path = find_file(raw, ["interactions.csv", "interactions.tsv"], "interaction table")
    want = [c for c in (opts.user, opts.item, opts.label, opts.where, opts.split, opts.time,
                        *opts.item_features, *opts.user_features) if c]
    delim = "\t" if opts.delimiter in ("\\t", "tab") else opts.delimiter
    t = read_text_table(path, TextFormat(delimiter=delim, header=True, names=want))
    summary = Summary(name=f"interactions ({path.name})", sources={"interactions": str(path)},
                      options=asdict(opts))
    summary.rows_read["interactions"] = t.num_rows
    t = t.select(list(dict.fromkeys(want)))
    ok = pc.and_(pc.is_valid(t.column(opts.user)), pc.is_valid(t.column(opts.item)))
    summary.drop("missing user or item", t.num_rows - pc.sum(ok).as_py())
    t = t.filter(ok)
    if opts.where:
        keep = _zero_one(path, t, opts.where) == 1
        summary.drop(f"{opts.where} != 1", int((~keep).sum()))
        t = t.filter(pa.array(keep))
    test: np.ndarray | None = None
    if opts.split:
        s = pc.utf8_lower(t.column(opts.split).cast(pa.string())).combine_chunks()
        is_train = pc.fill_null(pc.equal(s, "train"), False).to_numpy(zero_copy_only=False)
        is_test = pc.fill_null(pc.equal(s, "test"), False).to_numpy(zero_copy_only=False)
        other = ~(is_train | is_test)
        if other.any():
            vals = pc.unique(s.filter(pa.array(other))).to_pylist()[:5]
            summary.drop(f"{opts.split} not train/test (e.g. {vals})", int(other.sum()))
            t = t.filter(pa.array(~other))
            is_test = is_test[~other]
        test = is_test
    label = _zero_one(path, t, opts.label) if opts.label else None
    ts = None
    if opts.time:
        tcol = t.column(opts.time).combine_chunks()
        if pa.types.is_timestamp(tcol.type):
            tcol = tcol.cast(pa.int64())
        if not (pa.types.is_integer(tcol.type) or pa.types.is_floating(tcol.type)):
            raise PrepareError(f"{path}: column {opts.time!r}: expected numeric timestamps, "
                               f"got {tcol.type}")
        ts = pc.fill_null(tcol, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    log = Log(t.column(opts.user).combine_chunks(), t.column(opts.item).combine_chunks(), ts,
              label, {f: t.column(f).combine_chunks() for f in opts.item_features},
              {f: t.column(f).combine_chunks() for f in opts.user_features})
    rng = np.random.default_rng([opts.seed, 11])
    if test is None:
        test = (split_last(log, opts.test_fraction) if ts is not None
                else split_random(log, opts.test_fraction, rng))
        summary.notes.append("split: " + ("each user's latest rows" if ts is not None
                                          else "random rows (seeded)")
                             + f", test fraction {opts.test_fraction:g}")
    history = ts is not None and opts.max_len > 0
    if not history:
        summary.notes.append("no time column: no behaviour history written")
    tables, info = build_ctr_tables(log, test, max_len=opts.max_len, rng=rng,
                                    negatives=opts.negatives if label is None else 0,
                                    min_history=opts.min_history if history else 0,
                                    history=history)
    summary.drop("no unobserved item left for a negative", info.get("negatives_not_found", 0))
    summary.drop(f"fewer than {opts.min_history} earlier positives",
                 info["dropped_short_history"])
    if label is None:
        summary.notes.append(f"positive-only log: {opts.negatives} sampled negative(s) per "
                             "positive (items the user never interacted with, uniform)")
    if opts.user_id:
        tables = add_user_id_feature(tables)
    schema = ctr_schema(f"interactions-{path.name.split('.')[0]}", tables, opts.max_len,
                        user_feature=opts.user_id, user_features=list(opts.user_features),
                        item_features=list(opts.item_features), history=history)
    sizes = {k: v.num_rows for k, v in tables.items()}
    if min(sizes.values()) == 0:
        raise PrepareError(f"{path}: a split came out empty (rows per split: {sizes})")
    ctr_split_stats(tables, "label", summary)
    with atomic_dir(out, overwrite) as tmp:
        write_ctr(tmp, tables, schema)
        result = finish(tmp, summary, t0)
    return result
