"""Amazon Books (McAuley et al.) -> CTR data set, with DIN's preprocessing as used by paper A.

Reads ``reviews_Books_5.json[.gz]`` (2014 release; ``Books_5.json`` of the 2018 release also
works) and ``meta_Books.json[.gz]`` from the folder given as ``raw``. Review lines are JSON;
the 2014 meta lines are Python literals (single quotes), which are parsed line by line with
``ast.literal_eval`` when the fast JSON reader refuses them.

Per user, reviews in time order (ties in file order) are positives; each positive gets one
negative: an item drawn uniformly from the reviewed items that the user never reviewed.
Features: user_ID, item_ID, item_cate (the last entry of the item's first category path, as
DIN does), his_item_ID / his_item_cate (the user's last ``max_len`` earlier reviews). A user's
first review only serves as history (``min_history: 1``). Each user's last review (and its
negative) goes to test, the rest to train.

    >>> from oneepoch.data.prepare import prepare
    >>> prepare("amazon-books", "raw/amazon", "data/amazon-books")    # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from oneepoch.config import num
from oneepoch.data.prepare.common import (
    PrepareError,
    Summary,
    atomic_dir,
    ctr_split_stats,
    find_file,
    finish,
    make_options,
    read_json_lines,
    write_ctr,
)
from oneepoch.data.prepare.samples import (
    Log,
    add_user_id_feature,
    build_ctr_tables,
    ctr_schema,
    split_last,
)

PAPER_A_TABLE2 = ("Paper A, Table 2 (Amazon Books): 150,016 samples; fields user_ID, "
                  "his_item_ID, his_item_cate, item_ID, item_cate; item_ID 85,473 IDs with mean "
                  "1.75 occurrences.")

REVIEW_FIELDS = {"reviewerID": pa.string(), "asin": pa.string(), "unixReviewTime": pa.int64()}
META_FIELDS = {"asin": pa.string(), "categories": pa.list_(pa.list_(pa.string())),
               "category": pa.list_(pa.string())}


@dataclass
class AmazonBooksOptions:
    """Settings of the Amazon Books preparer (``--set key=value``)."""

    max_len: int = num(20, ge=1)  # history length (earlier reviews)
    min_history: int = num(1, ge=0)  # DIN: a user's first review is history only
    negatives: int = num(1, ge=1)  # per positive
    user_id: bool = True  # user_ID as a feature (paper A's Table 2 lists it)
    seed: int = num(0, ge=0)


def _meta_extract(obj: dict[str, Any]) -> tuple[Any, Any, Any]:
    cats = obj.get("categories")
    if not (isinstance(cats, list) and all(isinstance(c, list) for c in cats)):
        cats = None
    else:
        cats = [[str(x) for x in c] for c in cats]
    cat = obj.get("category")
    cat = [str(x) for x in cat] if isinstance(cat, list) else None
    asin = obj.get("asin")
    return (None if asin is None else str(asin)), cats, cat


def _element(lists: pa.Array, last: bool) -> pa.Array:
    """The first or last element of each list (null for null or empty lists)."""
    lens = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
    offsets = lists.offsets.to_numpy()[:-1]  # start of each list in .values
    idx = np.where(lens > 0, offsets + (lens - 1 if last else 0), -1)
    return lists.values.take(pa.array(idx, mask=idx < 0))


def item_categories(meta: pa.Table) -> pa.Table:
    """asin -> category: the last entry of the first ``categories`` path (2014 release), or of
    ``category`` (2018 release)."""
    c2014 = _element(_element(meta.column("categories").combine_chunks(), last=False), last=True)
    c2018 = _element(meta.column("category").combine_chunks(), last=True)
    return pa.table({"asin": meta.column("asin"), "cate": pc.coalesce(c2014, c2018)})


def prepare_amazon_books(raw: str | Path, out: str | Path, options: dict[str, Any] | None = None,
                         overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Prepare Amazon Books (see the module docstring); returns the summary."""
    t0 = time.monotonic()
    opts: AmazonBooksOptions = make_options(AmazonBooksOptions, options or {}, "amazon-books")
    raw = Path(raw)
    folder = raw if raw.is_dir() else raw.parent
    rpath = find_file(folder, ["reviews_Books_5.json", "Books_5.json", "reviews_Books.json"],
                      "Amazon Books reviews")
    mpath = find_file(folder, ["meta_Books.json"], "Amazon Books meta")
    reviews = read_json_lines(rpath, REVIEW_FIELDS, required=("reviewerID", "asin"),
                              progress=progress)
    meta = read_json_lines(mpath, META_FIELDS, extract=_meta_extract, required=("asin",),
                           progress=progress)
    if meta.column("categories").null_count == meta.num_rows and \
            meta.column("category").null_count == meta.num_rows and meta.num_rows:
        raise PrepareError(f"{mpath}: no line has 'categories' or 'category': is this the "
                           "meta file?")
    summary = Summary(name="amazon-books", sources={"reviews": str(rpath), "meta": str(mpath)},
                      options=asdict(opts), reference=PAPER_A_TABLE2)
    summary.rows_read = {"reviews": reviews.num_rows, "meta": meta.num_rows}
    no_time = reviews.column("unixReviewTime").null_count
    summary.drop("review without unixReviewTime", no_time)
    if no_time:
        reviews = reviews.filter(pc.is_valid(reviews.column("unixReviewTime")))
    cats = item_categories(meta)
    asin = reviews.column("asin").combine_chunks()
    cate = cats.column("cate").combine_chunks().take(
        pc.index_in(asin, value_set=cats.column("asin").combine_chunks()))
    if cate.null_count:
        summary.notes.append(f"{cate.null_count:,} review(s) of items without a meta category: "
                             "their item_cate is out of vocabulary")
    log = Log(reviews.column("reviewerID").combine_chunks(), asin,
              reviews.column("unixReviewTime").to_numpy(zero_copy_only=False).astype(np.int64),
              None, {"item_cate": cate})
    test = split_last(log, last=1)
    rng = np.random.default_rng([opts.seed, 5])
    tables, info = build_ctr_tables(log, test, max_len=opts.max_len, negatives=opts.negatives,
                                    rng=rng, min_history=opts.min_history)
    summary.drop("no unreviewed item left for a negative", info.get("negatives_not_found", 0))
    summary.drop(f"reviews with fewer than {opts.min_history} earlier review(s): history only, "
                 "no sample (a user's first review)", info["dropped_short_history"])
    if opts.user_id:
        tables = add_user_id_feature(tables)
    schema = ctr_schema("amazon-books", tables, opts.max_len, user_feature=opts.user_id,
                        user_features=[], item_features=["item_cate"], history=True)
    ctr_split_stats(tables, "label", summary)
    n_items = pc.count_distinct(tables["train"].column("item_ID")).as_py()
    total = sum(t.num_rows for t in tables.values())
    summary.reference += (f" This run: {total:,} samples ({tables['train'].num_rows:,} train), "
                          f"item_ID {n_items:,} IDs in train.")
    with atomic_dir(out, overwrite) as tmp:
        write_ctr(tmp, tables, schema)
        result = finish(tmp, summary, t0)
    return result
