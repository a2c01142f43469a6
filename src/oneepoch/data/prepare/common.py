"""Building blocks shared by the preparers: reading raw files with clear errors, time-ordered
histories, negative sampling, and atomic output with a summary beside the data.

Everything here works on whole columns (NumPy / pyarrow); nothing loops over rows in Python
except the JSON fallback parser for Python-literal lines, which has no vectorised equivalent.

    >>> import numpy as np
    >>> offsets, flat = history_index(np.array([0, 0, 0, 1]), np.array([1, 0, 1, 1], bool), 2)
    >>> offsets.tolist(), flat.tolist()     # row 2 sees row 0; row 1 sees row 0; user 1 nothing
    ([0, 0, 1, 2, 2], [0, 0])
"""

from __future__ import annotations

import ast
import gzip
import io
import json
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from oneepoch.config import ConfigError, from_dict
from oneepoch.data.schema import DataError, Schema
from oneepoch.io import atomic_dir as _atomic_dir

GZIP_MAGIC = b"\x1f\x8b"


T = TypeVar("T")


class PrepareError(DataError):
    """A raw file is missing, of the wrong kind, or malformed; the message names file and line."""


# ----------------------------------------------------------------------------- locating files


def find_file(raw: str | Path, names: list[str], what: str) -> Path:
    """The first of ``names`` (each also tried with ``.gz``) inside ``raw`` (a folder), or
    ``raw`` itself when it is a file.

    >>> find_file("/nonexistent", ["u.data"], "ratings")       # doctest: +SKIP
    """
    raw = Path(raw)
    if raw.is_file():
        return raw
    if not raw.is_dir():
        raise PrepareError(f"{raw}: no such file or folder (expected the {what})")
    for name in names:
        for cand in (raw / name, raw / f"{name}.gz"):
            if cand.is_file():
                return cand
    raise PrepareError(f"{raw}: no {what} file found; looked for "
                       + ", ".join(f"{n}[.gz]" for n in names))


def find_optional(raw: str | Path, names: list[str]) -> Path | None:
    """Like :func:`find_file` but returns None when ``raw`` is a folder without any of them."""
    raw = Path(raw)
    if not raw.is_dir():
        return None
    for name in names:
        for cand in (raw / name, raw / f"{name}.gz"):
            if cand.is_file():
                return cand
    return None


def is_gzip(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def open_binary(path: str | Path) -> pa.NativeFile:
    """A pyarrow input stream, gunzipped when the file starts with the gzip magic bytes."""
    return pa.input_stream(str(path), compression="gzip" if is_gzip(path) else None)


def open_text(path: str | Path, encoding: str = "utf-8") -> io.TextIOBase:
    """A text stream of a plain or gzip file (detected by content, not by name)."""
    if is_gzip(path):
        return gzip.open(path, "rt", encoding=encoding, errors="replace")
    return open(path, encoding=encoding, errors="replace")


def read_bytes(path: str | Path) -> bytes:
    with open_binary(path) as f:
        return f.read()


# ----------------------------------------------------------------------------- delimited text

_ROW_RE = re.compile(r"Row #(\d+)")
_COL_RE = re.compile(r"In CSV column #(\d+)")


def _csv_error(path: str | Path, err: Exception, names: list[str] | None,
               line_offset: int = 0) -> PrepareError:
    """Rewrite a pyarrow CSV error as 'FILE: line N: column C: problem'."""
    msg = str(err)
    parts = [str(path)]
    m = _ROW_RE.search(msg)
    if m:
        parts.append(f"line {int(m.group(1)) + line_offset}")
    c = _COL_RE.search(msg)
    if c and names and int(c.group(1)) < len(names):
        parts.append(f"column {names[int(c.group(1))]!r}")
    detail = _COL_RE.sub("", _ROW_RE.sub("", msg)).strip(" :")
    detail = detail.replace("CSV parse error: ", "").replace("CSV conversion error", "cannot read")
    return PrepareError(": ".join([*parts, f"malformed line ({detail})"]))


@dataclass
class TextFormat:
    """How a delimited text file is laid out.

    ``names``: column names when the file has no header line (``header=False``), or the
    expected columns to check when it has one. ``types``: pyarrow types of columns to enforce.
    """

    delimiter: str = ","
    header: bool = True
    names: list[str] | None = None
    types: dict[str, pa.DataType] = field(default_factory=dict)
    encoding: str = "utf8"
    quoting: bool = True
    header_rename: Callable[[str], str] | None = None


def _options(fmt: TextFormat, names: list[str] | None, block_size: int
             ) -> tuple[pacsv.ReadOptions, pacsv.ParseOptions, pacsv.ConvertOptions]:
    ro = pacsv.ReadOptions(use_threads=False, block_size=block_size, encoding=fmt.encoding,
                           column_names=names, skip_rows=1 if (fmt.header and names) else 0)
    po = pacsv.ParseOptions(delimiter=fmt.delimiter, quote_char='"' if fmt.quoting else False)
    types = {k: v for k, v in fmt.types.items() if names is None or k in names}
    co = pacsv.ConvertOptions(column_types=types, strings_can_be_null=False)
    return ro, po, co


def _header_names(path: str | Path, fmt: TextFormat, source: pa.NativeFile | None) -> list[str]:
    if source is not None:
        data = source.read(1 << 16)
        source.seek(0)
    else:
        with open_binary(path) as f:
            data = f.read(1 << 16)
    first = data.split(b"\n", 1)[0].rstrip(b"\r").decode(
        "latin-1" if fmt.encoding.lower() in ("latin1", "latin-1") else "utf-8", "replace")
    names = [n.strip().strip('"') for n in first.split(fmt.delimiter)]
    if fmt.header_rename:
        names = [fmt.header_rename(n) for n in names]
    return names


def _check_columns(path: str | Path, have: list[str], want: list[str] | None) -> None:
    if not want:
        return
    missing = [c for c in want if c not in have]
    if missing:
        raise PrepareError(f"{path}: missing column(s) {missing}; the header has {have}")


def read_text_table(path: str | Path, fmt: TextFormat, data: bytes | None = None) -> pa.Table:
    """Read a whole delimited file (plain or gzip) into a table; errors name file, line, column.

    ``data`` may hold the already-read (e.g. transcoded) bytes of ``path``.
    """
    source = pa.BufferReader(data) if data is not None else None
    names = fmt.names
    if fmt.header:
        have = _header_names(path, fmt, source)
        _check_columns(path, have, fmt.names)
        names = have
    ro, po, co = _options(fmt, names, 1 << 24)
    try:
        src = source if source is not None else open_binary(path)
        with src:
            table = pacsv.read_csv(src, read_options=ro, parse_options=po, convert_options=co)
    except pa.ArrowInvalid as e:
        raise _csv_error(path, e, names) from None
    return table


def stream_text_table(path: str | Path, fmt: TextFormat, block_size: int = 1 << 26
                      ) -> Iterator[tuple[pa.RecordBatch, int]]:
    """Yield ``(batch, first_line_number)`` of a delimited file without holding it in memory.

    The file is read ``block_size`` bytes at a time, cut at the last line break and each piece
    parsed on its own, so memory stays ~ a few blocks whatever the file size (pyarrow's own
    streaming reader reads ahead without bound when parsing is slower than the disk). Values
    must not contain line breaks (quoted multi-line fields are not supported here).
    """
    names = fmt.names
    if fmt.header:
        have = _header_names(path, fmt, None)
        _check_columns(path, have, fmt.names)
        names = have
    ro, po, co = _options(fmt, names, block_size)
    ro.skip_rows = 0
    line = 1
    with open_binary(path) as src:
        rest = b""
        if fmt.header:
            while b"\n" not in rest:
                more = src.read(block_size)
                if not more:
                    break
                rest += more
            rest = rest.split(b"\n", 1)[1] if b"\n" in rest else b""
            line = 2
        while True:
            buf = src.read(block_size)
            data = rest + buf if rest else buf
            if not data:
                return
            if buf:
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # one line longer than a block: keep reading
                    rest = data
                    continue
                chunk, rest = data[:cut], data[cut:]
            else:
                chunk, rest = data, b""
            try:
                table = pacsv.read_csv(pa.BufferReader(chunk), read_options=ro,
                                       parse_options=po, convert_options=co)
            except pa.ArrowInvalid as e:
                raise _csv_error(path, e, names, line_offset=line - 1) from None
            del chunk
            for batch in table.to_batches():
                yield batch, line
                line += batch.num_rows


# ----------------------------------------------------------------------------- JSON lines


def _parse_line(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return ast.literal_eval(text)  # the 2014 Amazon meta files are Python literals


def read_json_lines(path: str | Path, fields: dict[str, pa.DataType],
                    extract: Callable[[dict[str, Any]], tuple[Any, ...]] | None = None,
                    required: tuple[str, ...] = (), progress: bool = False) -> pa.Table:
    """Read one JSON (or Python-literal) object per line, keeping ``fields``.

    Strict JSON files take pyarrow's vectorised reader; anything else falls back to a line
    parser (``json.loads``, then ``ast.literal_eval``) whose errors name the line. ``extract``
    maps a parsed object to the values of ``fields`` (default: ``obj.get(name)``) in the
    fallback; the fast path reads the fields named exactly like the keys, so ``extract`` must
    agree with that.
    """
    import pyarrow.json as pajson

    names = list(fields)
    try:
        with open_binary(path) as src:
            t = pajson.read_json(src, parse_options=pajson.ParseOptions(
                explicit_schema=pa.schema(fields), unexpected_field_behavior="ignore"),
                read_options=pajson.ReadOptions(use_threads=False, block_size=1 << 24))
        _require(path, t, required)
        return t
    except pa.ArrowInvalid:
        pass  # not strict JSON (or types differ): parse line by line below

    def get(obj: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(obj.get(n) for n in names)

    pick = extract or get
    cols: list[list[Any]] = [[] for _ in names]
    prog = Progress(f"{Path(path).name} (line parser)", enabled=progress, unit="lines")
    with open_text(path) as f:
        for lineno, text in enumerate(f, 1):
            if not lineno % 100_000:
                prog.update(lineno)
            text = text.strip()
            if not text:
                continue
            try:
                obj = _parse_line(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
                raise PrepareError(f"{path}: line {lineno}: malformed line, neither JSON nor a "
                                   f"Python literal ({type(e).__name__}: {e}): "
                                   f"{text[:80]!r}") from None
            if not isinstance(obj, dict):
                raise PrepareError(f"{path}: line {lineno}: expected one object per line, got "
                                   f"{type(obj).__name__}")
            for c, v in zip(cols, pick(obj), strict=True):
                c.append(v)
    try:
        t = pa.table({n: pa.array(c, type=fields[n]) for n, c in zip(names, cols, strict=True)})
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise PrepareError(f"{path}: a field has values of an unexpected type ({e})") from None
    _require(path, t, required)
    return t


def _require(path: str | Path, t: pa.Table, required: tuple[str, ...]) -> None:
    for name in required:
        col = t.column(name)
        if t.num_rows and col.null_count == t.num_rows:
            raise PrepareError(f"{path}: missing field {name!r} on every line (is this the "
                               "right file?)")
        if col.null_count:
            idx = int(np.argmax(col.is_null().to_numpy(zero_copy_only=False)))
            raise PrepareError(f"{path}: line {idx + 1}: missing field {name!r} "
                               f"({col.null_count:,} line(s) lack it)")


# ----------------------------------------------------------------------------- encoding


def codes(values: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Dense integer codes for raw IDs (in order of first appearance) and the raw values.

    >>> c, raw = codes(pa.array(["b", "a", "b"]))
    >>> c.tolist(), raw.to_pylist()
    ([0, 1, 0], ['b', 'a'])
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    enc = pc.dictionary_encode(values)
    return enc.indices.to_numpy(zero_copy_only=False).astype(np.int64), enc.dictionary


def user_time_order(user: np.ndarray, ts: np.ndarray | None) -> np.ndarray:
    """Row order grouping users, by time within a user; ties keep the file order (stable)."""
    if ts is None:
        return np.argsort(user, kind="stable")
    return np.lexsort((np.arange(len(user)), ts, user))


def group_starts(user_sorted: np.ndarray) -> np.ndarray:
    """For each row of a user-grouped array, the index of its group's first row."""
    n = len(user_sorted)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    new = np.empty(n, dtype=bool)
    new[0] = True
    np.not_equal(user_sorted[1:], user_sorted[:-1], out=new[1:])
    return np.maximum.accumulate(np.where(new, np.arange(n), 0))


def rank_in_group(user_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position of each row within its user group and the group's size."""
    start = group_starts(user_sorted)
    pos = np.arange(len(user_sorted)) - start
    new = pos == 0
    sizes_per_group = np.diff(np.r_[np.flatnonzero(new), len(user_sorted)])
    size = np.repeat(sizes_per_group, sizes_per_group)
    return pos, size


def history_index(user_sorted: np.ndarray, include: np.ndarray, max_len: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Histories of earlier rows: for each row, the last ``max_len`` earlier rows of the same
    user with ``include`` set (e.g. earlier clicks), oldest first.

    Rows must be grouped by user and time-ordered within a user. Returns ``offsets`` (n+1)
    and ``flat`` row indices, so row r's history is ``flat[offsets[r]:offsets[r+1]]``.
    """
    n = len(user_sorted)
    include = np.asarray(include, dtype=bool)
    inc_idx = np.flatnonzero(include)
    before = np.cumsum(include, dtype=np.int64) - include  # included rows strictly before r
    start = before[group_starts(user_sorted)] if n else before
    lo = np.maximum(start, before - max_len)
    lens = before - lo
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    total = int(offsets[-1])
    flat = inc_idx[np.repeat(lo, lens) + np.arange(total) - np.repeat(offsets[:-1], lens)]
    return offsets, flat


def list_column(offsets: np.ndarray, values: pa.Array) -> pa.Array:
    """A list column from offsets and flat values (large offsets are refused: split the data)."""
    if len(offsets) and offsets[-1] >= 2**31:
        raise PrepareError("histories hold more than 2^31 IDs in one split: lower max_len")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


def sample_negatives(rng: np.random.Generator, users: np.ndarray, positives: np.ndarray,
                     n_items: int, candidates: np.ndarray | None = None,
                     max_rounds: int = 200) -> np.ndarray:
    """Draw one item per entry of ``users`` that the user has no interaction with.

    ``positives``: sorted unique keys ``user * n_items + item`` of every (user, item) the
    user interacted with. Items are drawn uniformly from ``candidates`` (item codes; default
    all ``n_items``); collisions are redrawn, vectorised, until none remain.
    Returns item codes, or -1 where no free item was found in ``max_rounds`` draws.

    >>> rng = np.random.default_rng(0)
    >>> neg = sample_negatives(rng, np.array([0, 0]), np.array([0, 1]), 3)
    >>> neg.tolist()      # user 0 interacted with items 0 and 1, so only item 2 is free
    [2, 2]
    """
    cand = np.arange(n_items) if candidates is None else np.asarray(candidates)
    users = np.asarray(users, dtype=np.int64)
    out = np.full(len(users), -1, dtype=np.int64)
    todo = np.arange(len(users))
    for _ in range(max_rounds):
        if not len(todo):
            break
        draw = cand[rng.integers(0, len(cand), len(todo))].astype(np.int64)
        keys = users[todo] * n_items + draw
        hit = np.searchsorted(positives, keys)
        hit = np.minimum(hit, max(len(positives) - 1, 0))
        taken = (positives[hit] == keys) if len(positives) else np.zeros(len(todo), bool)
        out[todo[~taken]] = draw[~taken]
        todo = todo[taken]
    return out


def pair_keys(users: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    """Sorted unique ``user * n_items + item`` keys (for :func:`sample_negatives`)."""
    return np.unique(users.astype(np.int64) * n_items + items.astype(np.int64))


# ----------------------------------------------------------------------------- summary + output


class Progress:
    """Throttled progress lines on stderr (silent when ``enabled`` is False); ``unit`` "rows"
    adds the throughput."""

    def __init__(self, what: str, total: int = 0, enabled: bool = True, unit: str = "rows",
                 every_s: float = 5.0) -> None:
        self.what, self.total, self.enabled, self.unit = what, total, enabled, unit
        self.every_s = every_s
        self.t0 = self.last = time.monotonic()

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < self.every_s):
            return
        self.last = now
        msg = f"  {self.what}: {done:,}"
        if self.total:
            msg += f"/{self.total:,} ({100 * done / self.total:.0f}%)"
        msg += f" {self.unit}, {now - self.t0:.0f} s"
        if self.unit == "rows":
            msg += f", {done / max(now - self.t0, 1e-9) / 1e6:.2f}M rows/s"
        print(msg, file=sys.stderr, flush=True)


@dataclass
class Summary:
    """What a preparer read, dropped (and why) and wrote; saved as ``prepare.json`` /
    ``prepare.md`` beside the data, with the per-field statistics of the train split."""

    name: str
    sources: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    rows_read: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    positive_rate: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    reference: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def drop(self, reason: str, n: int) -> None:
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + int(n)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "name", "sources", "options", "rows_read", "dropped", "samples", "positive_rate",
            "notes", "reference", "extra", "seconds")}

    def markdown(self, stats_md: str) -> str:
        out = [f"# {self.name}: prepared data set", ""]
        out += ["## Sources", *[f"- {k}: `{v}`" for k, v in self.sources.items()], ""]
        out += ["## Options", *[f"- {k}: {v}" for k, v in self.options.items()], ""]
        out += ["## Rows read", *[f"- {k}: {v:,}" for k, v in self.rows_read.items()], ""]
        out += ["## Rows dropped", *([f"- {k}: {v:,}" for k, v in self.dropped.items()]
                                     or ["- none"]), ""]
        out += ["## Samples written", *[
            f"- {k}: {v:,} (positive rate {self.positive_rate.get(k, float('nan')):.4f})"
            for k, v in self.samples.items()], ""]
        if self.notes:
            out += ["## Notes", *[f"- {n}" for n in self.notes], ""]
        out += ["## Per-field statistics (train split)", "", stats_md, ""]
        if self.reference:
            out += ["## Reference", "", self.reference, ""]
        out.append(f"prepared in {self.seconds:.1f} s")
        return "\n".join(out) + "\n"


def ctr_split_stats(tables: dict[str, pa.Table], label: str, summary: Summary) -> None:
    for s, t in tables.items():
        summary.samples[s] = t.num_rows
        lab = t.column(label)
        summary.positive_rate[s] = float(pc.mean(lab).as_py() or 0.0) if t.num_rows else 0.0


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling folder renamed to ``out`` when the block succeeds.

    A killed or failed run leaves no half-written data set; ``overwrite`` replaces an
    existing ``out``, otherwise an existing non-empty ``out`` is an error.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise PrepareError(f"{out}: already exists and is not empty (pass --overwrite to "
                           "replace it)")
    with _atomic_dir(out) as tmp:
        yield tmp


def write_ctr(directory: Path, tables: dict[str, pa.Table], schema: Schema) -> None:
    """Write one Parquet file per split and ``schema.yaml``."""
    for split, t in tables.items():
        pq.write_table(t, directory / f"{split}.parquet", row_group_size=1 << 20)
    schema.splits = {s: [f"{s}.parquet"] for s in tables}
    schema.save(directory)


def finish(directory: Path, summary: Summary, t0: float) -> dict[str, Any]:
    """Load the written CTR data set back (validating it and caching its frequency-ordered
    vocabularies and encoded arrays in ``.oneepoch-cache/``, ready for training), write
    per-field statistics to ``stats/`` and the summary to ``prepare.json`` / ``prepare.md``;
    return the summary."""
    from oneepoch.data.dataset import load_ctr
    from oneepoch.data.stats import field_stats, format_stats, write_stats

    # also writes the vocabularies + encoded cache for training; a tiny one-class split warns
    data = load_ctr(directory, single_class="warn")
    rows = field_stats(data, "train")
    stats_md = format_stats(rows, len(data.splits["train"]))
    write_stats(data, directory / "stats", "train")
    summary.extra["fields"] = rows
    summary.seconds = round(time.monotonic() - t0, 2)
    (directory / "prepare.json").write_text(json.dumps(summary.to_dict(), indent=1,
                                                       default=str) + "\n")
    (directory / "prepare.md").write_text(summary.markdown(stats_md))
    return summary.to_dict()


ENGAGEMENTS_DIR = "engagements"


def write_engagements(directory: Path, table: pa.Table, name: str,
                      surface: str = "", engagement_type: str = "") -> Schema:
    """Write an ``engagements`` data set (columns user_id, item_id[, surface, timestamp,
    engagement_type]; the same raw IDs as the CTR set) to ``directory`` as
    ``engagements.parquet`` + ``schema.yaml``."""
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, directory / "engagements.parquet", row_group_size=1 << 20)
    schema = Schema(format="engagements", name=name, user="user_id", item="item_id",
                    surface=surface, engagement_type=engagement_type,
                    timestamp="timestamp" if "timestamp" in table.column_names else "",
                    splits={"train": ["engagements.parquet"]})
    schema.save(directory)
    return schema


def make_options(cls: type[T], values: Mapping[str, Any], name: str) -> T:
    """Build a preparer's options dataclass from ``key: value`` settings through
    :func:`oneepoch.config.from_dict` (the one settings mechanism): unknown keys (with a
    did-you-mean), wrong types and values outside the fields' declared choices or ranges are a
    :class:`PrepareError` naming the preparer and the option."""
    try:
        return from_dict(cls, values)
    except ConfigError as e:
        raise PrepareError(f"prepare {name}: {e}") from None
