"""MovieLens -> CTR data set (and an engagement log of the training ratings).

Reads, from the folder given as ``raw`` (detected by file names, gzip accepted):

- ml-100k in RecBole's atomic format: ``*.inter``, ``*.user``, ``*.item`` (tab-separated,
  header ``name:type``);
- ml-100k original: ``u.data``, ``u.user``, ``u.item`` (genre flags);
- ml-1m (and ml-10m): ``ratings.dat``, ``users.dat``, ``movies.dat`` (``::``-separated);
- ml-latest / ml-20m / ml-25m: ``ratings.csv``, ``movies.csv``.

Every rating is a sample: rating >= ``threshold`` is a click (1), lower ratings are non-clicks.
Fields: user_ID, user_age, user_gender, user_occupation (where the source has them),
his_item_ID / his_item_cate (the user's last ``max_len`` earlier clicks), item_ID, item_cate
(the movie's first listed genre, or the whole genre list with ``genre: all``). Split in time:
each user's latest ``test_fraction`` of ratings go to test (``split: user``), or the latest
ratings overall (``split: global``). ml-100k ages are bucketed like ml-1m's (1, 18, 25, 35,
45, 50, 56).

    >>> from oneepoch.data.prepare import prepare
    >>> prepare("movielens", "data/ml-100k", "data/ml100k-ctr", {"threshold": 4})  # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from oneepoch.config import choice, num
from oneepoch.data.prepare.common import (
    ENGAGEMENTS_DIR,
    PrepareError,
    Summary,
    TextFormat,
    atomic_dir,
    ctr_split_stats,
    find_optional,
    finish,
    make_options,
    read_bytes,
    read_text_table,
    write_ctr,
    write_engagements,
)
from oneepoch.data.prepare.samples import (
    Log,
    add_user_id_feature,
    build_ctr_tables,
    ctr_schema,
    split_global,
    split_last,
)

ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western"]
AGE_BUCKETS = np.array([18, 25, 35, 45, 50, 56])  # ml-1m's age groups: 1, 18, 25, ..., 56
AGE_LABELS = np.array([1, 18, 25, 35, 45, 50, 56])


@dataclass
class MovieLensOptions:
    """Settings of the MovieLens preparer (``--set key=value``)."""

    threshold: float = num(4.0)  # rating >= threshold is a click
    max_len: int = num(20, ge=0)  # history length (earlier clicks)
    split: str = choice("user", "global")  # user: each user's latest ratings; global: overall
    test_fraction: float = num(0.2, gt=0, lt=1)
    user_id: bool = True  # user_ID as a feature
    user_features: bool = True  # age, gender, occupation where the source has them
    genre: str = choice("first", "all")  # first: first listed genre; all: the list as one ID
    min_history: int = num(0, ge=0)
    engagements: bool = True  # also write engagements/ (every training rating)
    seed: int = num(0, ge=0)


def _strip_type(name: str) -> str:
    return name.split(":", 1)[0]


def _dat(path: Path, names: list[str], types: dict[str, pa.DataType]) -> pa.Table:
    """A ``::``-separated .dat file (ml-1m / ml-10m), latin-1."""
    data = read_bytes(path).replace(b"::", b"\x1f")
    return read_text_table(path, TextFormat(delimiter="\x1f", header=False, names=names,
                                            types=types, encoding="latin1", quoting=False),
                           data=data)


def _first_or_all(genres: pa.Array, sep: str, mode: str) -> pa.Array:
    if mode == "all":
        return genres
    return pc.list_element(pc.split_pattern(genres, sep), 0)


def read_movielens(raw: str | Path, opts: MovieLensOptions
                   ) -> tuple[str, pa.Table, pa.Table | None, pa.Table | None, dict[str, str]]:
    """Detect the release in ``raw`` and read ratings (user_id, item_id, rating, timestamp),
    users (user_id + features) and items (item_id, genre)."""
    raw = Path(raw)
    folder = raw if raw.is_dir() else raw.parent
    if not folder.is_dir():
        raise PrepareError(f"{raw}: no such folder (expected a MovieLens folder)")
    i64, f64 = pa.int64(), pa.float64()
    inter = sorted(p for p in folder.iterdir() if p.name.endswith((".inter", ".inter.gz")))
    if inter:  # RecBole atomic files
        stem = inter[0].name.split(".inter")[0]
        fmt = TextFormat(delimiter="\t", header=True, quoting=False, header_rename=_strip_type)
        r = read_text_table(inter[0], TextFormat(
            delimiter="\t", header=True, quoting=False, header_rename=_strip_type,
            names=["user_id", "item_id", "rating", "timestamp"],
            types={"rating": f64, "timestamp": f64}))
        sources = {"ratings": str(inter[0])}
        users = items = None
        up = find_optional(folder, [f"{stem}.user"])
        if up:
            users = read_text_table(up, fmt)
            sources["users"] = str(up)
        ip = find_optional(folder, [f"{stem}.item"])
        if ip:
            items = read_text_table(ip, fmt)
            if "class" not in items.column_names:
                raise PrepareError(f"{ip}: missing column 'class' (the genres); the header has "
                                   f"{items.column_names}")
            items = pa.table({"item_id": items.column("item_id"), "genre": _first_or_all(
                items.column("class").combine_chunks(), " ", opts.genre)})
            sources["items"] = str(ip)
        return "ml-recbole", r, users, items, sources
    p = find_optional(folder, ["u.data"])
    if p:  # original ml-100k
        r = read_text_table(p, TextFormat(delimiter="\t", header=False, quoting=False,
                                          names=["user_id", "item_id", "rating", "timestamp"],
                                          types={"user_id": i64, "item_id": i64, "rating": f64,
                                                 "timestamp": f64}))
        sources = {"ratings": str(p)}
        users = items = None
        up = find_optional(folder, ["u.user"])
        if up:
            users = read_text_table(up, TextFormat(
                delimiter="|", header=False, quoting=False, encoding="latin1",
                names=["user_id", "age", "gender", "occupation", "zip_code"],
                types={"user_id": i64, "age": i64}))
            sources["users"] = str(up)
        ip = find_optional(folder, ["u.item"])
        if ip:
            cols = ["item_id", "title", "release", "video_release", "url", *ML100K_GENRES]
            t = read_text_table(ip, TextFormat(delimiter="|", header=False, quoting=False,
                                               encoding="latin1", names=cols,
                                               types={"item_id": i64} | {
                                                   g: i64 for g in ML100K_GENRES}))
            flags = np.stack([t.column(g).to_numpy() for g in ML100K_GENRES], axis=1) > 0
            names = np.array(ML100K_GENRES, dtype=object)
            if opts.genre == "first":
                genre = np.where(flags.any(axis=1), names[np.argmax(flags, axis=1)], None)
            else:
                genre = np.array(["|".join(names[f]) or None for f in flags], dtype=object)
            items = pa.table({"item_id": t.column("item_id"), "genre": pa.array(
                genre, type=pa.string())})
            sources["items"] = str(ip)
        return "ml-100k", r, users, items, sources
    p = find_optional(folder, ["ratings.dat"])
    if p:  # ml-1m / ml-10m
        r = _dat(p, ["user_id", "item_id", "rating", "timestamp"],
                 {"user_id": i64, "item_id": i64, "rating": f64, "timestamp": f64})
        sources = {"ratings": str(p)}
        users = items = None
        up = find_optional(folder, ["users.dat"])
        if up:
            users = _dat(up, ["user_id", "gender", "age", "occupation", "zip_code"],
                         {"user_id": i64, "age": i64, "occupation": i64})
            sources["users"] = str(up)
        ip = find_optional(folder, ["movies.dat"])
        if ip:
            m = _dat(ip, ["item_id", "title", "genres"], {"item_id": i64})
            items = pa.table({"item_id": m.column("item_id"), "genre": _first_or_all(
                m.column("genres").combine_chunks(), "|", opts.genre)})
            sources["items"] = str(ip)
        return "ml-1m", r, users, items, sources
    p = find_optional(folder, ["ratings.csv"])
    if p:  # ml-latest style
        r = read_text_table(p, TextFormat(names=["userId", "movieId", "rating", "timestamp"],
                                          types={"userId": i64, "movieId": i64, "rating": f64,
                                                 "timestamp": f64}))
        r = r.rename_columns({"userId": "user_id", "movieId": "item_id"})
        sources = {"ratings": str(p)}
        items = None
        ip = find_optional(folder, ["movies.csv"])
        if ip:
            m = read_text_table(ip, TextFormat(names=["movieId", "title", "genres"],
                                               types={"movieId": i64}))
            items = pa.table({"item_id": m.column("movieId"), "genre": _first_or_all(
                m.column("genres").combine_chunks(), "|", opts.genre)})
            sources["items"] = str(ip)
        return "ml-latest", r, None, items, sources
    raise PrepareError(f"{folder}: no MovieLens ratings file found; looked for *.inter "
                       "(RecBole), u.data (ml-100k), ratings.dat (ml-1m), ratings.csv "
                       "(ml-latest), each optionally .gz")


def _lookup(keys: pa.Array, table: pa.Table, key: str, column: str) -> pa.Array:
    """``table[column]`` for each of ``keys`` (matched on ``table[key]``; null if absent)."""
    kcol = table.column(key).combine_chunks()
    if kcol.type != keys.type:  # e.g. int IDs in one file, string tokens in the other
        kcol, keys = kcol.cast(pa.string()), keys.cast(pa.string())
    idx = pc.index_in(keys, value_set=kcol)
    return table.column(column).combine_chunks().take(idx)


def prepare_movielens(raw: str | Path, out: str | Path, options: dict[str, Any] | None = None,
                      overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Prepare a MovieLens release (see the module docstring); returns the summary."""
    t0 = time.monotonic()
    opts: MovieLensOptions = make_options(MovieLensOptions, options or {}, "movielens")
    kind, r, users, items, sources = read_movielens(raw, opts)
    summary = Summary(name=f"movielens ({kind})", sources=sources, options=asdict(opts))
    summary.rows_read["ratings"] = r.num_rows
    for what, t in (("users", users), ("items", items)):
        if t is not None:
            summary.rows_read[what] = t.num_rows
    ok = pc.and_(pc.is_valid(r.column("user_id")), pc.is_valid(r.column("item_id")))
    ok = pc.and_(ok, pc.is_valid(r.column("rating")))
    n_bad = r.num_rows - pc.sum(ok).as_py()
    summary.drop("missing user, item or rating", n_bad)
    if n_bad:
        r = r.filter(ok)
    rating = r.column("rating").to_numpy(zero_copy_only=False).astype(np.float64)
    ts = pc.fill_null(r.column("timestamp"), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    user = r.column("user_id").combine_chunks()
    item = r.column("item_id").combine_chunks()
    label = (rating >= opts.threshold).astype(np.int8)
    item_features: dict[str, pa.Array] = {}
    user_features: dict[str, pa.Array] = {}
    if items is not None:
        cate = _lookup(item, items, "item_id", "genre")
        item_features["item_cate"] = cate
        missing = cate.null_count
        if missing:
            summary.notes.append(f"{missing:,} rating(s) of items without genre: item_cate "
                                 "is out of vocabulary for them")
    else:
        summary.notes.append("no item file: item_cate not written")
    if users is not None and opts.user_features:
        for col in ("age", "gender", "occupation"):
            if col in users.column_names:
                vals = _lookup(user, users, "user_id", col)
                if col == "age" and kind in ("ml-100k", "ml-recbole") and pa.types.is_integer(
                        vals.type):
                    a = pc.fill_null(vals, -1).to_numpy()
                    vals = pa.array(np.where(a >= 0, AGE_LABELS[np.digitize(a, AGE_BUCKETS)],
                                             -1), mask=a < 0)
                user_features[f"user_{col}"] = vals
    log = Log(user, item, ts, label, item_features, user_features)
    test = (split_last(log, opts.test_fraction) if opts.split == "user"
            else split_global(log, opts.test_fraction))
    rng = np.random.default_rng([opts.seed, 7])
    tables, info = build_ctr_tables(log, test, max_len=opts.max_len, rng=rng,
                                    min_history=opts.min_history)
    summary.drop(f"fewer than {opts.min_history} earlier clicks", info["dropped_short_history"])
    if opts.user_id:
        tables = add_user_id_feature(tables)
    schema = ctr_schema(f"movielens-{kind}", tables, opts.max_len, user_feature=opts.user_id,
                        user_features=list(user_features), item_features=list(item_features),
                        history=True)
    ctr_split_stats(tables, "label", summary)
    summary.notes.append(f"rating >= {opts.threshold:g} is a click; split {opts.split!r}, "
                         f"test fraction {opts.test_fraction:g}")
    with atomic_dir(out, overwrite) as tmp:
        write_ctr(tmp, tables, schema)
        if opts.engagements:
            tr = ~test
            eng = pa.table({"user_id": user.filter(pa.array(tr)),
                            "item_id": item.filter(pa.array(tr)),
                            "timestamp": pa.array(ts[tr]),
                            "engagement_type": pa.array(np.rint(rating[tr]).astype(np.int64))})
            write_engagements(tmp / ENGAGEMENTS_DIR, eng, f"movielens-{kind}-engagements",
                              engagement_type="engagement_type")
            summary.extra["engagements"] = eng.num_rows
            summary.notes.append(f"{ENGAGEMENTS_DIR}/: the {eng.num_rows:,} training-split "
                                 "ratings (any rating; engagement_type = rating) for pre-training")
        result = finish(tmp, summary, t0)
    return result
