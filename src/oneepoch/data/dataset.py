"""Read a data-set folder, validate it, build vocabularies and encode splits once (cached).

    >>> data = load_ctr("runs/demo/data")            # doctest: +SKIP
    >>> data.splits["train"].ids.shape                # (rows, single-ID fields)  # doctest: +SKIP

Vocabularies are frequency-ordered over the train split: row 0 is the out-of-vocabulary row,
row 1 the most frequent ID, and so on (ties broken by the raw value), so "keep the top-k IDs"
is ``row <= k``. Encoded arrays are cached in ``DIR/.oneepoch-cache/<key>/`` (key = hash of the
schema and, per file, its name, size, mtime, change time, inode and Parquet footer: the footer
holds the row count, every column chunk's size and statistics, so a file replaced by another of
the same size and mtime still gets a new key) and memory-mapped when large.

Every problem with the input is a :class:`DataError` naming the file (and column): unreadable or
corrupt Parquet, missing columns, wrong types, bad labels, an ID column of int IDs in one file
and string IDs in another that cannot be matched, and an evaluation split with a single class
(a train split with a single class is a warning).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from oneepoch.data.schema import DataError, Schema, load_schema, split_files
from oneepoch.io import atomic_dir

CACHE_DIR = ".oneepoch-cache"
CACHE_VERSION = 2
MMAP_BYTES = 1 << 30  # splits larger than this are memory-mapped rather than loaded


@dataclass
class Vocab:
    """Frequency-ordered vocabulary of one ID space; row 0 = out of vocabulary."""

    name: str
    raw: pa.Array  # raw IDs, row i+1
    counts: np.ndarray  # train occurrences, aligned with raw
    n_ids: int = -1  # rows besides OOV when not one per raw ID (hashed vocabularies)

    @property
    def size(self) -> int:
        """Number of embedding rows (IDs + the OOV row)."""
        return (len(self.raw) if self.n_ids < 0 else self.n_ids) + 1

    def encode(self, values: pa.Array) -> np.ndarray:
        """Map raw IDs to rows (unknown or null -> 0)."""
        if len(values) == 0:
            return np.zeros(0, dtype=np.int32)
        if not values.type.equals(self.raw.type):
            try:
                values = values.cast(self.raw.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise DataError(f"vocabulary {self.name!r}: IDs of type {values.type} cannot be "
                                f"matched with the vocabulary's {self.raw.type} IDs") from e
        idx = pc.index_in(values, value_set=self.raw)
        return pc.fill_null(idx, -1).to_numpy().astype(np.int64) + 1

    def to_table(self) -> pa.Table:
        return pa.table({"raw": self.raw, "count": self.counts,
                         "row": np.arange(1, self.size, dtype=np.int64)})


@dataclass
class EncodedSplit:
    """One split as contiguous integer arrays (rows of the field's vocabulary)."""

    ids: np.ndarray  # [N, S] int32, single-ID fields in CTRData.single_fields order
    seqs: list[np.ndarray]  # per sequence field: [N, max_len] int32, left-aligned, 0-padded
    lens: list[np.ndarray]  # per sequence field: [N] int32 true lengths
    label: np.ndarray  # [N] float32
    user: np.ndarray | None = None  # [N] int64 user group (for GAUC), or None

    def __len__(self) -> int:
        return len(self.label)


@dataclass
class CTRData:
    """A loaded, encoded CTR data set."""

    schema: Schema
    vocabs: dict[str, Vocab]
    splits: dict[str, EncodedSplit]
    single_fields: list[str] = field(default_factory=list)
    seq_fields: list[str] = field(default_factory=list)
    path: Path | None = None

    @property
    def fields(self) -> list[str]:
        """All fields in model order: single-ID fields, then sequences."""
        return self.single_fields + self.seq_fields

    def field_vocab(self, name: str) -> str:
        return self.schema.feature(name).vocab_name

    @property
    def vocab_sizes(self) -> dict[str, int]:
        return {k: v.size for k, v in self.vocabs.items()}


# ----------------------------------------------------------------------------- reading


_ARROW_ERRORS = (pa.ArrowException, OSError, ValueError, TypeError, IndexError, KeyError)


def _read_table(f: Path, columns: list[str]) -> pa.Table:
    """Read ``columns`` of one Parquet file; a corrupt file is a DataError naming the file and
    (found by reading them one at a time) the first column that cannot be read."""
    try:  # page checksums, when the writer stored them, catch corruption that still decodes
        return pq.read_table(f, columns=columns, page_checksum_verification=True)
    except _ARROW_ERRORS as e:
        bad = ""
        for c in columns:
            try:
                pq.read_table(f, columns=[c], page_checksum_verification=True)
            except _ARROW_ERRORS:
                bad = f" column {c!r}:"
                break
        raise DataError(f"{f}:{bad} corrupt Parquet data ({type(e).__name__}: {e}); "
                        "write the file again") from e


def _id_target(types: list[pa.DataType]) -> pa.DataType:
    """The common type of one ID column read as ``types`` in different files: strings when any
    file has strings (as the vocabulary builder does), else int64."""
    if any(pa.types.is_string(t) or pa.types.is_large_string(t) for t in types):
        return pa.string()
    return pa.int64()


def _unify(tables: list[pa.Table], files: list[Path], schema: Schema) -> list[pa.Table]:
    """Cast ID columns whose type differs between the files of one split to a common type
    (int and string IDs -> strings) and labels to float64; other columns are left to the
    concatenation."""
    id_cols = set(schema.feature_names) | {schema.user_key, schema.user, schema.item,
                                           schema.surface, schema.engagement_type}
    for c in schema.columns():
        types = [t.schema.field(c).type for t in tables]
        if all(t.equals(types[0]) for t in types):
            continue
        if schema.format == "ctr" and c == schema.label:  # 0/1 as int, float or bool (checked)
            tables = [t.set_column(t.schema.get_field_index(c), c, t.column(c).cast(pa.float64()))
                      for t in tables]
            continue
        if c not in id_cols:
            continue
        is_list = [pa.types.is_list(t) or pa.types.is_large_list(t) for t in types]
        values = [_plain(t.value_type) if lst else _plain(t)
                  for t, lst in zip(types, is_list, strict=True)]
        target = _id_target(values)
        for i, (t, f) in enumerate(zip(tables, files, strict=True)):
            col = t.column(c)
            try:
                if is_list[i]:
                    if pa.types.is_dictionary(col.type.value_type):
                        col = col.cast(pa.list_(col.type.value_type.value_type))
                    col = col.cast(pa.list_(target))
                else:
                    if pa.types.is_dictionary(col.type):
                        col = col.cast(col.type.value_type)
                    col = col.cast(target)
            except _ARROW_ERRORS as e:
                other = files[0] if i else files[1]
                raise DataError(f"{f}: column {c!r}: IDs of type {types[i]} cannot be matched "
                                f"with the {types[0 if i else 1]} IDs of {other} ({e})") from e
            tables[i] = t.set_column(t.schema.get_field_index(c), c, col)
    return tables


def _read_split(directory: Path, schema: Schema, split: str) -> tuple[pa.Table, list[Path]]:
    files = split_files(directory, schema, split)
    tables = []
    for f in files:
        try:
            meta = pq.read_schema(f)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types here
            raise DataError(f"{f}: not a readable Parquet file ({e})") from e
        missing = [c for c in schema.columns() if c not in meta.names]
        if missing:
            raise DataError(f"{f}: missing column(s) {missing} named in schema.yaml "
                            f"(file has {meta.names})")
        t = _read_table(f, schema.columns())
        if t.num_rows == 0:
            raise DataError(f"{f}: empty file (0 rows)")
        _check_types(t, schema, f)
        tables.append(t)
    if len(tables) == 1:
        return tables[0].combine_chunks(), files
    tables = _unify(tables, files, schema)
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except _ARROW_ERRORS as e:
        # name the column and two files whose types disagree
        for c in schema.columns():
            types = [t.schema.field(c).type for t in tables]
            j = next((j for j, t in enumerate(types) if not t.equals(types[0])), None)
            if j is not None:
                raise DataError(f"{files[j]}: column {c!r} has type {types[j]} but {files[0]} "
                                f"has {types[0]}; give every file of split {split!r} the same "
                                "type") from e
        raise DataError(f"{', '.join(map(str, files))}: split {split!r}: the files cannot be "
                        f"joined ({e})") from e
    return table.combine_chunks(), files


def read_split(directory: str | Path, schema: Schema, split: str) -> pa.Table:
    """Read and type-check one split's Parquet files as one table (any data-set format)."""
    return _read_split(Path(directory), schema, split)[0]


def _is_id_type(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def _check_types(t: pa.Table, schema: Schema, f: Path) -> None:
    if schema.format == "engagements":
        for c in (schema.user, schema.item, schema.surface, schema.engagement_type):
            if c and not _is_id_type(_plain(t.schema.field(c).type)):
                raise DataError(f"{f}: column {c!r}: expected int or string IDs, "
                                f"got {t.schema.field(c).type}")
        return
    for feat in schema.features:
        typ = _plain(t.schema.field(feat.name).type)
        if feat.is_sequence:
            if not (pa.types.is_list(typ) or pa.types.is_large_list(typ)) or not _is_id_type(
                    _plain(typ.value_type)):
                raise DataError(f"{f}: column {feat.name!r}: a sequence feature needs a list of "
                                f"int or string IDs, got {typ}")
        elif not _is_id_type(typ):
            raise DataError(f"{f}: column {feat.name!r}: expected int or string IDs, got {typ}")
    lab = t.column(schema.label)
    if not (pa.types.is_integer(lab.type) or pa.types.is_floating(lab.type)
            or pa.types.is_boolean(lab.type)):
        raise DataError(f"{f}: label column {schema.label!r}: expected 0/1 numbers, got {lab.type}")
    arr = lab.combine_chunks()
    if arr.null_count:
        raise DataError(f"{f}: label column {schema.label!r}: {arr.null_count} null value(s)")
    vals = arr.to_numpy(zero_copy_only=False).astype(np.float64)
    bad = ~((vals == 0) | (vals == 1))
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{f}: label column {schema.label!r}: {int(bad.sum())} value(s) outside "
                        f"{{0, 1}} (first at row {i}: {vals[i]})")


def _plain(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def _as_plain(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    if pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())
    return arr


def _flat_values(col: pa.Array) -> pa.Array:
    return _as_plain(pc.list_flatten(col))


# ----------------------------------------------------------------------------- vocabularies


def build_vocabs(schema: Schema, train: pa.Table) -> dict[str, Vocab]:
    """Count each vocabulary's IDs over the train split (shared fields pooled)."""
    vocabs: dict[str, Vocab] = {}
    for vname in schema.vocab_names:
        parts = []
        for feat in schema.features:
            if feat.vocab_name != vname:
                continue
            col = _as_plain(train.column(feat.name))
            parts.append(_flat_values(col) if feat.is_sequence else col)
        types = {p.type for p in parts}
        if len(types) > 1:
            if any(pa.types.is_string(t) for t in types):
                parts = [p.cast(pa.string()) for p in parts]
            else:
                parts = [p.cast(pa.int64()) for p in parts]
        vocabs[vname] = vocab_from_values(vname, pa.concat_arrays(parts))
    return vocabs


def vocab_from_values(name: str, values: pa.Array) -> Vocab:
    """A frequency-ordered :class:`Vocab` of the (non-null) raw IDs in ``values``.

        >>> vocab_from_values("item", pa.array([7, 3, 7, 5, 3, 7])).raw.to_pylist()
        [7, 3, 5]
    """
    vc = pc.value_counts(_as_plain(values).drop_null())
    raw = vc.field("values")
    counts = vc.field("counts").to_numpy().astype(np.int64)
    # frequency-descending, ties by raw value: deterministic whatever the hash order
    order_raw = pc.sort_indices(raw).to_numpy()
    raw = raw.take(pa.array(order_raw))
    counts = counts[order_raw]
    order = np.argsort(-counts, kind="stable")
    return Vocab(name, raw.take(pa.array(order)), counts[order])


# ----------------------------------------------------------------------------- encoding


def _encode_sequence(col: pa.Array, vocab: Vocab, max_len: int, name: str, f: str,
                     on_long: str) -> tuple[np.ndarray, np.ndarray]:
    col = _as_plain(col)
    n = len(col)
    lens = pc.fill_null(pc.list_value_length(col), 0).to_numpy().astype(np.int64)
    too_long = lens > max_len
    if too_long.any():
        msg = (f"{f}: column {name!r}: {int(too_long.sum())} sequence(s) longer than "
               f"max_len={max_len} (longest {int(lens.max())})")
        if on_long == "error":
            raise DataError(msg)
        warnings.warn(msg + "; keeping the last max_len items", stacklevel=3)
    flat = vocab.encode(_flat_values(col))
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(lens[:-1], out=starts[1:])
    row = np.repeat(np.arange(n), lens)
    pos = np.arange(len(flat)) - np.repeat(starts, lens)
    skip = np.repeat(np.maximum(lens - max_len, 0), lens)
    keep = pos >= skip
    out = np.zeros((n, max_len), dtype=np.int32)
    out[row[keep], (pos - skip)[keep]] = flat[keep]
    return out, np.minimum(lens, max_len).astype(np.int32)


def encode_split(schema: Schema, table: pa.Table, vocabs: dict[str, Vocab], where: str,
                 user_vocab: Vocab | None = None) -> EncodedSplit:
    """Encode one split's table into an :class:`EncodedSplit`."""
    singles = [f for f in schema.features if not f.is_sequence]
    seqs = [f for f in schema.features if f.is_sequence]
    n = table.num_rows
    ids = np.zeros((n, len(singles)), dtype=np.int32)
    for j, feat in enumerate(singles):
        ids[:, j] = vocabs[feat.vocab_name].encode(_as_plain(table.column(feat.name)))
    seq_arr, len_arr = [], []
    for feat in seqs:
        s, ln = _encode_sequence(table.column(feat.name), vocabs[feat.vocab_name], feat.max_len,
                                 feat.name, where, schema.on_long_sequence)
        seq_arr.append(s)
        len_arr.append(ln)
    label = table.column(schema.label).combine_chunks().to_numpy(
        zero_copy_only=False).astype(np.float32)
    user = None
    if schema.user_key:
        ucol = _as_plain(table.column(schema.user_key))
        if user_vocab is not None:
            user = user_vocab.encode(ucol)
        else:
            user = pc.dictionary_encode(ucol).indices.to_numpy().astype(np.int64)
    return EncodedSplit(ids, seq_arr, len_arr, label, user)


# ----------------------------------------------------------------------------- cache


FOOTER_MAX = 64 << 20  # larger footers (very wide files) are hashed by their last 64 MiB


def parquet_footer(f: str | Path) -> bytes:
    """The raw footer of a Parquet file (its file metadata: schema, row groups, every column
    chunk's offsets, sizes and statistics) plus the trailing length and magic: a cheap content
    fingerprint, read from the end of the file without reading the data.

    Raises :class:`DataError` when ``f`` does not end like a Parquet file.
    """
    f = Path(f)
    with open(f, "rb") as fh:
        size = fh.seek(0, 2)
        if size < 12:
            raise DataError(f"{f}: not a Parquet file ({size} bytes)")
        fh.seek(size - 8)
        tail = fh.read(8)
        n = int.from_bytes(tail[:4], "little")
        if tail[4:] != b"PAR1" or n + 12 > size:
            raise DataError(f"{f}: not a Parquet file (no footer: truncated or another format)")
        n = min(n, FOOTER_MAX)
        fh.seek(size - 8 - n)
        return fh.read(n) + tail


def _cache_key(directory: Path, schema: Schema) -> str:
    """Hash of the schema and each file's name, size, mtime, change time, inode and footer."""
    h = hashlib.sha1()
    h.update(json.dumps(schema.to_dict(), sort_keys=True).encode())
    h.update(str(CACHE_VERSION).encode())
    for split in sorted(schema.splits):
        for f in split_files(directory, schema, split):
            st = f.stat()
            h.update(f"{split}:{f.name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:"
                     f"{st.st_ino}:".encode())
            h.update(hashlib.sha1(parquet_footer(f)).digest())
    return h.hexdigest()[:16]


def _save_split(d: Path, name: str, s: EncodedSplit) -> None:
    np.save(d / f"{name}.ids.npy", s.ids)
    for k, (a, ln) in enumerate(zip(s.seqs, s.lens, strict=True)):
        np.save(d / f"{name}.seq{k}.npy", a)
        np.save(d / f"{name}.len{k}.npy", ln)
    np.save(d / f"{name}.label.npy", s.label)
    if s.user is not None:
        np.save(d / f"{name}.user.npy", s.user)


def _load_split(d: Path, name: str, n_seq: int, has_user: bool) -> EncodedSplit:
    total = sum(p.stat().st_size for p in d.glob(f"{name}.*.npy"))
    mode = "r" if total > MMAP_BYTES else None

    def ld(suffix: str) -> np.ndarray:
        return np.load(d / f"{name}.{suffix}.npy", mmap_mode=mode)

    return EncodedSplit(ld("ids"), [ld(f"seq{k}") for k in range(n_seq)],
                        [ld(f"len{k}") for k in range(n_seq)], ld("label"),
                        ld("user") if has_user else None)


def load_ctr(directory: str | Path, splits: list[str] | None = None,
             cache: bool = True, single_class: str = "error") -> CTRData:
    """Load (and on first use encode and cache) a CTR data set folder.

    Args:
        directory: folder with ``schema.yaml`` and Parquet files.
        splits: splits to load (default: all in the schema). The vocabulary always comes from
            ``train``.
        cache: reuse / write the encoded cache beside the data.
        single_class: an evaluation split (not ``train``) whose labels are all one class is a
            :class:`DataError` (``"error"``) or a warning (``"warn"``); see :func:`check_labels`.
    """
    directory = Path(directory)
    schema = load_schema(directory)
    if schema.format != "ctr":
        raise DataError(f"{directory / 'schema.yaml'}: format is {schema.format!r}, "
                        "a CTR data set needs format: ctr")
    if "train" not in schema.splits:
        raise DataError(f"{directory / 'schema.yaml'}: needs a 'train' split (vocabularies are "
                        "built from it)")
    want = splits or list(schema.splits)
    singles = [f.name for f in schema.features if not f.is_sequence]
    seqs = [f.name for f in schema.features if f.is_sequence]
    key = _cache_key(directory, schema)
    cdir = directory / CACHE_DIR / key
    if cache and (cdir / "meta.json").exists():
        try:
            vocabs = {}
            for vname in schema.vocab_names:
                t = pq.read_table(cdir / f"vocab.{vname}.parquet")
                vocabs[vname] = Vocab(vname, t.column("raw").combine_chunks(),
                                      t.column("count").to_numpy())
            enc = {s: _load_split(cdir, s, len(seqs), bool(schema.user_key)) for s in want}
        except _ARROW_ERRORS as e:  # a damaged cache: encode again (and replace it)
            warnings.warn(f"{cdir}: damaged encoded cache ({type(e).__name__}: {e}); "
                          "encoding the data again", stacklevel=2)
        else:
            check_labels(directory, schema, enc, single_class)
            return CTRData(schema, vocabs, enc, singles, seqs, directory)

    train, files = _read_split(directory, schema, "train")
    vocabs = build_vocabs(schema, train)
    user_vocab = None
    tables = {"train": (train, files)}
    for s in schema.splits:
        if s != "train":
            tables[s] = _read_split(directory, schema, s)
    if schema.user_key:
        ucols = [_as_plain(t.column(schema.user_key)) for t, _ in tables.values()]
        if len({c.type for c in ucols}) > 1:
            ucols = [c.cast(pa.string()) for c in ucols]
        uniq = pc.unique(pa.concat_arrays(ucols))
        user_vocab = Vocab("__user__", uniq, np.zeros(len(uniq), dtype=np.int64))
    enc_all = {s: encode_split(schema, t, vocabs, ",".join(map(str, fs)), user_vocab)
               for s, (t, fs) in tables.items()}
    if cache:
        try:
            _write_cache(directory, cdir, schema, vocabs, enc_all)
        except OSError as e:  # read-only data folder: work from memory
            warnings.warn(f"{directory}: could not write the encoded cache ({e})", stacklevel=2)
    enc = {s: enc_all[s] for s in want}
    check_labels(directory, schema, enc, single_class)
    return CTRData(schema, vocabs, enc, singles, seqs, directory)


def check_labels(directory: str | Path, schema: Schema, splits: dict[str, EncodedSplit],
                 single_class: str = "error") -> None:
    """Refuse a split with a single class before any training: AUC is undefined on it.

    An evaluation split (any split but ``train``) with one class is a :class:`DataError`
    naming the split and its file(s) (a warning with ``single_class="warn"``); a ``train``
    split with one class is a warning (the model can only learn a constant, and train AUC is
    NaN).
    """
    if single_class not in ("error", "warn"):
        raise ValueError(f"single_class: 'error' or 'warn', got {single_class!r}")
    for s, e in splits.items():
        n = len(e.label)
        if n == 0:
            continue
        pos = int(np.count_nonzero(np.asarray(e.label)))
        if 0 < pos < n:
            continue
        files = ", ".join(str(f) for f in split_files(directory, schema, s))
        cls = "1 (no negatives)" if pos else "0 (no positives)"
        msg = (f"{files}: split {s!r}: all {n:,} labels in column {schema.label!r} are {cls}")
        if s == "train":
            warnings.warn(msg + "; the model can only learn a constant and train AUC is "
                          "undefined (NaN)", stacklevel=3)
        elif single_class == "warn":
            warnings.warn(msg + "; AUC is undefined on it", stacklevel=3)
        else:
            raise DataError(msg + "; AUC is undefined on it, so no run could be evaluated: "
                            "use a split with both classes")


def oov_shares(data: CTRData, split: str = "test") -> dict[str, float]:
    """Per field, the share of ``split``'s IDs that are out of the train vocabulary (row 0).

    Single-ID fields count rows; sequence fields count the items inside the sequences (padding
    excluded). A null raw ID also encodes to row 0, so it counts here. Computed on the encoded
    split as loaded (before any transform that maps rare IDs to row 0).

        >>> oov_shares(load_ctr("data/x"))              # doctest: +SKIP
        {'user_id': 0.031, 'item_id': 0.12, 'hist': 0.08}
    """
    e = data.splits[split]
    out: dict[str, float] = {}
    ids = np.asarray(e.ids)
    n = ids.shape[0]
    for j, name in enumerate(data.single_fields):
        out[name] = float(np.count_nonzero(ids[:, j] == 0) / n) if n else float("nan")
    for name, seq, lens in zip(data.seq_fields, e.seqs, e.lens, strict=True):
        seq, lens = np.asarray(seq), np.asarray(lens)
        inside = np.arange(seq.shape[1])[None, :] < lens[:, None]
        total = int(lens.sum())
        out[name] = (float(np.count_nonzero((seq == 0) & inside) / total) if total
                     else float("nan"))
    return out


def _write_cache(directory: Path, cdir: Path, schema: Schema, vocabs: dict[str, Vocab],
                 enc: dict[str, EncodedSplit]) -> None:
    root = directory / CACHE_DIR
    root.mkdir(exist_ok=True)
    with atomic_dir(cdir) as tmp:
        for vname, v in vocabs.items():
            pq.write_table(v.to_table(), tmp / f"vocab.{vname}.parquet")
        for s, e in enc.items():
            _save_split(tmp, s, e)
        (tmp / "meta.json").write_text(json.dumps(
            {"version": CACHE_VERSION, "rows": {s: len(e) for s, e in enc.items()},
             "vocab_sizes": {k: v.size for k, v in vocabs.items()}}, indent=1))


def validate(directory: str | Path) -> list[str]:
    """Check a data set fully (schema, columns, types, labels, sequences); return a summary.

    Raises :class:`DataError` on the first problem found.
    """
    directory = Path(directory)
    schema = load_schema(directory)
    lines = [f"{directory}: format {schema.format}, splits {sorted(schema.splits)}"]
    if schema.format == "engagements":
        for s in schema.splits:
            t, files = _read_split(directory, schema, s)
            lines.append(f"  {s}: {t.num_rows:,} engagements in {len(files)} file(s)")
        return lines
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_ctr(directory, cache=False)
    for w in caught:
        lines.append(f"  warning: {w.message}")
    for s, e in data.splits.items():
        lines.append(f"  {s}: {len(e):,} rows, positive rate {float(e.label.mean()):.4f}")
    for vname, v in data.vocabs.items():
        lines.append(f"  vocab {vname}: {v.size - 1:,} IDs")
    for s in data.splits:
        if s == "train":
            continue
        shares = oov_shares(data, s)
        lines.append(f"  {s}: out-of-vocabulary IDs (unseen in train) per field: " + ", ".join(
            f"{f} {100 * v:.1f}%" for f, v in shares.items()))
    return lines
