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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from oneepoch.data.dataset import Vocab
from oneepoch.data.schema import DataError
from oneepoch.io import atomic_dir

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
    for kind, w, v in (("user", user_weight, user_vocab), ("item", item_weight, item_vocab)):
        if w.shape[0] != v.size:
            raise ValueError(f"export_embeddings: {kind} table has {w.shape[0]} rows but the "
                             f"vocabulary needs {v.size} (IDs + OOV row)")
    with atomic_dir(path) as tmp:
        for kind, w, v in (("user", user_weight, user_vocab), ("item", item_weight, item_vocab)):
            save_file({"weight": w.detach().float().cpu().contiguous().clone()},
                      str(tmp / f"{kind}.safetensors"))
            pq.write_table(v.to_table(), tmp / f"{kind}_vocab.parquet")
        full = {"format_version": FORMAT_VERSION, "users": user_vocab.size - 1,
                "items": item_vocab.size - 1, **meta}
        (tmp / "meta.json").write_text(json.dumps(full, indent=1, default=_json_default))
    return path


def load_embeddings(path: str | Path) -> Embeddings:
    """Read an export folder written by :func:`export_embeddings` (or ``oneepoch pretrain``)."""
    path = Path(path)
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"{path}: not an embeddings export (no meta.json; exports are "
                                "written to RUN/embeddings/ by oneepoch pretrain)")
    meta = json.loads((path / "meta.json").read_text())
    tables = {}
    for kind in KINDS:
        f = path / f"{kind}.safetensors"
        vf = path / f"{kind}_vocab.parquet"
        if not f.exists() or not vf.exists():
            raise FileNotFoundError(f"{path}: missing {f.name} or {vf.name}")
        w = load_file(str(f))["weight"]
        t = pq.read_table(vf)
        rows = t.column("row").to_numpy()
        if len(rows) != w.shape[0] - 1 or (len(rows) and not np.array_equal(
                rows, np.arange(1, w.shape[0]))):
            raise DataError(f"{vf}: rows must be 1..{w.shape[0] - 1} in order to match "
                            f"{f.name} ({w.shape[0]} rows)")
        vocab = Vocab(kind, t.column("raw").combine_chunks(), t.column("count").to_numpy())
        tables[kind] = EmbeddingTable(kind, w, vocab)
    return Embeddings(tables["user"], tables["item"], meta, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o))
