"""Export and load pre-trained ID embeddings; initialise any ``torch.nn.Embedding`` from them.

An export is a folder (``RUN/embeddings/``)::

    user.safetensors   {"weight": [n_users + 1, dim]}   row 0 = out of vocabulary
    item.safetensors   {"weight": [n_items + 1, dim]}
    user_vocab.parquet raw, row, count                  raw ID -> row
    item_vocab.parquet
    meta.json          dim, temperature, loss, epochs, data sources, eval metrics, ...

Initialising your own model's table by raw-ID alignment (IDs the pre-training never saw keep
the table's fresh initialisation; their count is reported)::

    >>> from oneepoch.embeddings import load_embeddings
    >>> emb = load_embeddings("runs/pretrain/embeddings")                    # doctest: +SKIP
    >>> report = emb.item.init(model.item_emb, my_item_ids)  # raw ID of each row  # doctest: +SKIP
    >>> print(report)   # AlignReport(matched=9812, unseen=188)                # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file

from oneepoch.data.dataset import Vocab
from oneepoch.data.schema import DataError
from oneepoch.io import atomic_dir, write_safetensors

KINDS = ("user", "item")
FORMAT_VERSION = 1


@dataclass
class AlignReport:
    """How many target rows got a pre-trained vector (``matched``) and how many kept their
    fresh initialisation because their raw ID was not in the export (``unseen``)."""

    matched: int
    unseen: int
    skipped: int = 0  # null raw IDs (no alignment attempted)

    @property
    def total(self) -> int:
        return self.matched + self.unseen + self.skipped


@dataclass
class EmbeddingTable:
    """One exported table: vectors by row and the vocabulary mapping raw IDs to rows."""

    name: str
    weight: torch.Tensor  # [rows, dim]; row 0 = out of vocabulary
    vocab: Vocab

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def rows_of(self, raw_ids: Sequence[Any] | np.ndarray | pa.Array) -> np.ndarray:
        """Export rows of raw IDs (0 = not in the export)."""
        arr = raw_ids if isinstance(raw_ids, (pa.Array, pa.ChunkedArray)) else pa.array(raw_ids)
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        return self.vocab.encode(arr)

    def lookup(self, raw_ids: Sequence[Any] | np.ndarray | pa.Array) -> tuple[torch.Tensor,
                                                                              np.ndarray]:
        """Vectors of raw IDs ``[n, dim]`` (zeros where unseen) and the found-mask ``[n]``."""
        rows = self.rows_of(raw_ids)
        found = rows > 0
        return self.weight[torch.from_numpy(rows)] * torch.from_numpy(found)[:, None], found

    @torch.no_grad()
    def init(self, target: torch.nn.Embedding | torch.Tensor,
             raw_ids: Sequence[Any] | np.ndarray | pa.Array, offset: int = 0,
             scale: float = 1.0) -> AlignReport:
        """Copy pre-trained vectors into ``target`` rows ``offset .. offset + len(raw_ids)``.

        Args:
            target: an ``nn.Embedding`` or a weight tensor ``[rows, dim]`` (changed in place).
            raw_ids: the raw ID of each target row from ``offset`` on (None = no ID).
            offset: first target row to align (e.g. 1 to skip an out-of-vocabulary row).
            scale: multiply the copied vectors (e.g. to match the model's init scale).

        Rows whose ID is unseen in the export keep their current (fresh) values.
        """
        w = target.weight if isinstance(target, torch.nn.Embedding) else target
        if w.shape[1] != self.dim:
            raise ValueError(f"embeddings {self.name!r}: export has dim {self.dim}, the target "
                             f"table has dim {w.shape[1]}: build the table with dim {self.dim}")
        arr = raw_ids if isinstance(raw_ids, (pa.Array, pa.ChunkedArray)) else pa.array(raw_ids)
        n = len(arr)
        if offset < 0 or offset + n > w.shape[0]:
            raise ValueError(f"embeddings {self.name!r}: {n} raw IDs from row {offset} do not fit "
                             f"a table of {w.shape[0]} rows")
        nulls = np.asarray(pc.is_null(arr).to_numpy(zero_copy_only=False), dtype=bool) \
            if arr.null_count else np.zeros(n, dtype=bool)
        rows = self.rows_of(arr)
        found = rows > 0
        tgt = torch.from_numpy(np.flatnonzero(found) + offset)
        w[tgt] = (self.weight[torch.from_numpy(rows[found])] * scale).to(w.dtype)
        return AlignReport(int(found.sum()), int((~found & ~nulls).sum()), int(nulls.sum()))


@dataclass
class Embeddings:
    """A loaded export: ``.user``, ``.item`` and ``.meta``."""

    user: EmbeddingTable
    item: EmbeddingTable
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def table(self, kind: str) -> EmbeddingTable:
        if kind not in KINDS:
            raise ValueError(f"embeddings: unknown table {kind!r} (choose {KINDS})")
        return self.user if kind == "user" else self.item


def export_embeddings(path: str | Path, user_weight: torch.Tensor, item_weight: torch.Tensor,
                      user_vocab: Vocab, item_vocab: Vocab, meta: dict[str, Any]) -> Path:
    """Write an export folder atomically (temporary sibling, then rename); see the module doc.

    ``user_weight`` / ``item_weight`` have one row per vocabulary row (row 0 = OOV).
    """
    path = Path(path)
    if user_weight.dim() != 2 or item_weight.dim() != 2 or \
            user_weight.shape[1] != item_weight.shape[1]:
        raise ValueError(f"export_embeddings: tables must be [rows, dim] with one dim, got user "
                         f"{tuple(user_weight.shape)} and item {tuple(item_weight.shape)}")
    for kind, w, v in (("user", user_weight, user_vocab), ("item", item_weight, item_vocab)):
        if w.shape[0] != v.size:
            raise ValueError(f"export_embeddings: {kind} table has {w.shape[0]} rows but the "
                             f"vocabulary needs {v.size} (IDs + OOV row)")
    with atomic_dir(path) as tmp:
        for kind, w, v in (("user", user_weight, user_vocab), ("item", item_weight, item_vocab)):
            write_safetensors(tmp / f"{kind}.safetensors",
                              {"weight": w.detach().float().cpu().contiguous().clone()})
            pq.write_table(v.to_table(), tmp / f"{kind}_vocab.parquet")
        full = {"format_version": FORMAT_VERSION, "users": user_vocab.size - 1,
                "items": item_vocab.size - 1, **meta}
        (tmp / "meta.json").write_text(json.dumps(full, indent=1, default=_json_default))
    return path


_REWRITE = "write the export again (oneepoch pretrain)"


def _read_weight(f: Path) -> torch.Tensor:
    """The ``weight`` of one exported table, checked to be a 2-D float matrix."""
    if not f.exists():
        hint = ""
        if any(f.parent.glob(f".{f.name}*")) or any(f.parent.glob(".tmp*")):
            hint = " (an unfinished write left a temporary beside it)"
        raise FileNotFoundError(f"{f}: missing{hint}; {_REWRITE}")
    if not os.access(f, os.R_OK):
        raise DataError(f"{f}: not readable by this user (mode {oct(f.stat().st_mode & 0o777)}); "
                        "ask its owner to make it readable, e.g. chmod a+r")
    try:
        tensors = load_file(str(f))
    except Exception as e:  # noqa: BLE001 - SafetensorError has no importable base here
        if type(e).__name__ != "SafetensorError" and not isinstance(e, OSError):
            raise
        raise DataError(f"{f}: not a readable safetensors file ({e}); {_REWRITE}") from e
    if "weight" not in tensors:
        raise DataError(f"{f}: no tensor named 'weight' (has {sorted(tensors)}); {_REWRITE}")
    w = tensors["weight"]
    if w.dim() != 2 or w.shape[0] < 1 or not w.is_floating_point():
        raise DataError(f"{f}: 'weight' must be a float matrix [rows, dim] with row 0 = out of "
                        f"vocabulary, got {w.dtype} of shape {tuple(w.shape)}; {_REWRITE}")
    return w


def _read_vocab(vf: Path, kind: str, w: torch.Tensor, f: Path) -> Vocab:
    if not vf.exists():
        raise FileNotFoundError(f"{vf}: missing; {_REWRITE}")
    try:
        t = pq.read_table(vf)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types here
        raise DataError(f"{vf}: not a readable Parquet file ({e}); {_REWRITE}") from e
    missing = [c for c in ("raw", "row", "count") if c not in t.column_names]
    if missing:
        raise DataError(f"{vf}: missing column(s) {missing} (has {t.column_names})")
    rows = t.column("row").to_numpy()
    if len(rows) != w.shape[0] - 1 or (len(rows) and not np.array_equal(
            rows, np.arange(1, w.shape[0]))):
        raise DataError(f"{vf}: rows must be 1..{w.shape[0] - 1} in order to match "
                        f"{f.name} ({w.shape[0]} rows)")
    raw = t.column("raw").combine_chunks()
    if pa.types.is_dictionary(raw.type):
        raw = raw.cast(raw.type.value_type)
    if raw.null_count:
        raise DataError(f"{vf}: column 'raw': {raw.null_count} null ID(s)")
    if len(raw) and len(pc.unique(raw)) != len(raw):
        vc = pc.value_counts(raw)
        dup = vc.field("values").filter(pc.greater(vc.field("counts"), 1))
        raise DataError(f"{vf}: column 'raw': {len(dup)} raw ID(s) listed more than once "
                        f"(e.g. {dup[0].as_py()!r}), so they would map to two rows; "
                        f"{_REWRITE}")
    return Vocab(kind, raw, t.column("count").to_numpy())


def load_embeddings(path: str | Path) -> Embeddings:
    """Read an export folder written by :func:`export_embeddings` (or ``oneepoch pretrain``).

    Checks, naming the file: each table is a readable 2-D float ``weight`` with one row per
    vocabulary row; the two tables (and ``meta.json``'s ``dim``, when given) agree on the
    dimension; no raw ID is listed twice in a vocabulary.
    """
    path = Path(path)
    mf = path / "meta.json"
    if not mf.exists():
        raise FileNotFoundError(f"{path}: not an embeddings export (no meta.json; exports are "
                                "written to RUN/embeddings/ by oneepoch pretrain)")
    try:
        meta = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{mf}: not valid JSON ({e}); {_REWRITE}") from e
    if not isinstance(meta, dict):
        raise DataError(f"{mf}: expected a JSON object, got {type(meta).__name__}")
    tables = {}
    for kind in KINDS:
        f = path / f"{kind}.safetensors"
        w = _read_weight(f)
        tables[kind] = EmbeddingTable(kind, w, _read_vocab(path / f"{kind}_vocab.parquet", kind,
                                                           w, f))
    dims = {k: t.dim for k, t in tables.items()}
    if dims["user"] != dims["item"]:
        raise DataError(f"{path}: user.safetensors has dim {dims['user']} but item.safetensors "
                        f"has dim {dims['item']}; the two tables of an export share one dim")
    if "dim" in meta and meta["dim"] != dims["user"]:
        raise DataError(f"{mf}: says dim {meta['dim']!r} but the tables have dim "
                        f"{dims['user']}; {_REWRITE}")
    return Embeddings(tables["user"], tables["item"], meta, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o))
