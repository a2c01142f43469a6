"""Engagement logs (positive user-item pairs) encoded for pre-training.

    >>> data = load_engagements("runs/hsu2024/data/engagements")       # doctest: +SKIP
    >>> data.n_users, data.n_items, len(data.train_user)                # doctest: +SKIP

Vocabularies are built from the train split exactly like CTR vocabularies (frequency-ordered,
row 0 = out of vocabulary, see :func:`oneepoch.data.dataset.vocab_from_values`). Held-out
pairs whose user or item never occurs in the train split cannot be ranked; they are counted
(``heldout_unknown``) and left out of the metrics.

``subsample`` < 1 trains on a share of the train engagements only (a sparser log of the same
world): the draw is fixed (:data:`SUBSAMPLE_SEED`, whatever the run's seed) and nested (the
10% sample lies inside the 30% one). Vocabularies, the catalogue ranked against and the
held-out pairs stay those of the full log, so metrics at different shares are comparable; IDs
absent from the sample keep their initial vectors and a count of 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from oneepoch.data.dataset import Vocab, read_split, vocab_from_values
from oneepoch.data.schema import DataError, Schema, load_schema

SUBSAMPLE_SEED = 20_240_920  # the fixed draw of `subsample` (independent of the run's seed)


def subsample_mask(n: int, share: float) -> np.ndarray:
    """Rows of an ``n``-row log kept at ``share``: exactly ``round(share * n)`` (at least 1)
    rows, the same for every run and nested across shares (a row kept at 0.1 is kept at 0.3).

        >>> m1, m3 = subsample_mask(1000, 0.1), subsample_mask(1000, 0.3)
        >>> int(m1.sum()), int(m3.sum()), bool((m1 <= m3).all())
        (100, 300, True)
    """
    if not 0 < share <= 1:
        raise DataError(f"data.subsample: expected a share in (0, 1], got {share}")
    keep = np.ones(n, dtype=bool)
    if share < 1:
        key = np.random.default_rng(SUBSAMPLE_SEED).random(n)
        k = max(1, round(share * n))
        keep[:] = False
        keep[np.argsort(key, kind="stable")[:k]] = True
    return keep


@dataclass
class EngagementData:
    """Encoded engagement pairs: vocabulary rows (>= 1 for known IDs)."""

    users: Vocab
    items: Vocab
    train_user: np.ndarray  # [N] int64
    train_item: np.ndarray  # [N] int64
    test_user: np.ndarray  # [M] int64, known pairs only
    test_item: np.ndarray  # [M] int64
    heldout_unknown: int = 0  # held-out pairs dropped (user or item unseen in train)
    path: Path | None = None
    sources: tuple[str, ...] = ()

    @property
    def n_users(self) -> int:
        """User rows including the OOV row 0."""
        return self.users.size

    @property
    def n_items(self) -> int:
        """Item rows including the OOV row 0."""
        return self.items.size

    def item_freq(self) -> np.ndarray:
        """Share of training engagements per item row ``[n_items]`` (row 0 = 0)."""
        c = np.zeros(self.n_items, dtype=np.float64)
        c[1:] = self.items.counts
        return c / max(c.sum(), 1.0)


def _filter_surfaces(t: pa.Table, schema: Schema, surfaces: list[str], where: str) -> pa.Table:
    if not surfaces:
        return t
    if not schema.surface:
        raise DataError(f"{where}: data.surfaces={surfaces} but schema.yaml names no 'surface' "
                        "column")
    col = t.column(schema.surface).cast(pa.string())
    have = set(pc.unique(col).to_pylist())
    missing = [s for s in surfaces if s not in have]
    if missing:
        raise DataError(f"{where}: data.surfaces: no engagements on {missing} "
                        f"(column {schema.surface!r} has {sorted(map(str, have))})")
    return t.filter(pc.is_in(col, value_set=pa.array(surfaces, pa.string())))


def load_engagements(directory: str | Path, train_split: str = "train", test_split: str = "test",
                     holdout: float = 0.02, surfaces: list[str] | None = None,
                     seed: int = 0, subsample: float = 1.0) -> EngagementData:
    """Load an ``format: engagements`` data set and encode its pairs.

    Args:
        directory: folder with ``schema.yaml`` and Parquet files.
        train_split: split the vocabularies and training pairs come from.
        test_split: held-out split; ``""`` holds out a random ``holdout`` share of train
            (seeded by ``seed``).
        surfaces: keep only engagements on these surfaces (needs a ``surface`` column).
        subsample: train on this share of the train engagements (see the module doc); the
            vocabularies and held-out pairs do not change.
    """
    directory = Path(directory)
    schema = load_schema(directory)
    where = str(directory / "schema.yaml")
    if schema.format != "engagements":
        raise DataError(f"{where}: format is {schema.format!r}; pre-training needs "
                        "format: engagements (user and item columns)")
    train = _filter_surfaces(read_split(directory, schema, train_split), schema,
                             surfaces or [], where)
    if train.num_rows == 0:
        raise DataError(f"{where}: split {train_split!r} has no engagements")
    tu = train.column(schema.user).combine_chunks()
    ti = train.column(schema.item).combine_chunks()
    if test_split:
        test = _filter_surfaces(read_split(directory, schema, test_split), schema,
                                surfaces or [], where)
        hu = test.column(schema.user).combine_chunks()
        hi = test.column(schema.item).combine_chunks()
    else:
        if not 0 < holdout < 1:
            raise DataError(f"data.holdout: expected a fraction in (0, 1), got {holdout}")
        mask = np.random.default_rng([seed, 7]).random(train.num_rows) < holdout
        hu, hi = tu.filter(pa.array(mask)), ti.filter(pa.array(mask))
        tu, ti = tu.filter(pa.array(~mask)), ti.filter(pa.array(~mask))
    users = vocab_from_values("user", tu)
    items = vocab_from_values("item", ti)
    test_user, test_item = users.encode(hu), items.encode(hi)
    known = (test_user > 0) & (test_item > 0)
    train_user, train_item = users.encode(tu), items.encode(ti)
    if subsample < 1:
        keep = subsample_mask(len(train_user), subsample)
        train_user, train_item = train_user[keep], train_item[keep]
        users = Vocab(users.name, users.raw,
                      np.bincount(train_user, minlength=users.size)[1:].astype(np.int64))
        items = Vocab(items.name, items.raw,
                      np.bincount(train_item, minlength=items.size)[1:].astype(np.int64))
    return EngagementData(users, items, train_user, train_item, test_user[known],
                          test_item[known], int((~known).sum()), directory,
                          (str(directory),))
