"""Prepare public data sets from their raw files (nothing is downloaded).

Each preparer reads raw files the user already has and writes a data-set folder in the
project's format (Parquet + ``schema.yaml``), plus ``prepare.md`` / ``prepare.json`` (rows read,
dropped and why, samples per split) and ``stats/`` (per-field statistics, paper A's Table 1/2
layout) beside the data; where the source allows, an engagement log for pre-training is
written to ``engagements/`` inside it. Output is written to a temporary sibling folder and
renamed into place, so a failed run leaves nothing half-written.

    >>> from oneepoch.data.prepare import PREPARERS, prepare
    >>> sorted(PREPARERS)
    ['amazon-books', 'interactions', 'movielens', 'taobao-userbehavior']
    >>> s = prepare("movielens", "ml-100k/", "data/ml100k", {"threshold": 4})  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from oneepoch.data.prepare.common import PrepareError


@dataclass(frozen=True)
class Preparer:
    """A registered preparer: ``module.function(raw, out, options, overwrite, progress)``."""

    name: str
    module: str
    function: str
    options: str  # name of the options dataclass in ``module``
    raw: str  # what --raw points at
    summary: str

    def load(self) -> Any:
        return getattr(importlib.import_module(f"oneepoch.data.prepare.{self.module}"),
                       self.function)

    def option_help(self) -> list[str]:
        """``name=default`` for every option, or ``name=default|other|...`` for one with
        choices (for ``--help``)."""
        cls = getattr(importlib.import_module(f"oneepoch.data.prepare.{self.module}"),
                      self.options)
        out = []
        for f in fields(cls):
            default = f.default if not callable(f.default_factory) else f.default_factory()
            others = [c for c in f.metadata.get("choices", ()) if c != default]
            out.append(f"{f.name}={default}" + "".join(f"|{c}" for c in others))
        return out


PREPARERS: dict[str, Preparer] = {p.name: p for p in (
    Preparer("amazon-books", "amazon_books", "prepare_amazon_books", "AmazonBooksOptions",
             "folder with reviews_Books_5.json[.gz] and meta_Books.json[.gz]",
             "paper A's Amazon Books (DIN preprocessing): reviews are positives, one random "
             "unreviewed item per positive, history of earlier reviews, last review -> test"),
    Preparer("taobao-userbehavior", "taobao", "prepare_taobao", "TaobaoOptions",
             "UserBehavior.csv[.gz] (or its folder)",
             "paper A's Taobao: clicks only, one sample per user (last click or a random "
             "negative, earlier clicks as history); engagements/ with each behaviour as a surface"),
    Preparer("movielens", "movielens", "prepare_movielens", "MovieLensOptions",
             "folder of ml-100k (RecBole .inter/.user/.item or u.data/u.user/u.item), ml-1m "
             "(ratings.dat, users.dat, movies.dat) or ml-latest (ratings.csv, movies.csv)",
             "rating >= threshold is a click; user features, genre as category, time split, "
             "history of earlier clicks; engagements/ = training ratings"),
    Preparer("interactions", "interactions", "prepare_interactions", "InteractionsOptions",
             "a CSV/TSV interaction table[.gz] with a header",
             "generic: user, item, optional label / split / time / features columns; sampled "
             "negatives for positive-only logs"),
)}


def prepare(name: str, raw: str | Path, out: str | Path, options: dict[str, Any] | None = None,
            overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run the preparer ``name`` on ``raw``, writing the data set to ``out``.

    ``options``: the preparer's settings (see ``oneepoch data prepare --help``). Returns the
    summary also written to ``out/prepare.json``.
    """
    if name not in PREPARERS:
        raise PrepareError(f"prepare: unknown data set {name!r}; known: {', '.join(PREPARERS)}")
    return PREPARERS[name].load()(raw, out, options or {}, overwrite=overwrite,
                                  progress=progress)


__all__ = ["PREPARERS", "Preparer", "PrepareError", "prepare"]
