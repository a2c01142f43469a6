"""Transforms of an encoded data set: drop fields, paper A's ID filter / hash, label noise.

All work on vocabulary rows (frequency-ordered, 0 = out of vocabulary), so they are cheap
array operations and need no re-encoding:

* ``filter``: keep the top ``ceil(m * n)`` IDs of a vocabulary of ``n`` IDs, map the rest to
  the default row 0;
* ``hash``: map every ID into ``ceil(m * n)`` buckets with a seeded multiplicative hash.

Vocabularies are frequency-ordered over the train split, so "top by frequency" is "row <= k".

    >>> import numpy as np
    >>> filter_rows(np.array([0, 1, 2, 3, 9]), 3)
    array([0, 1, 2, 3, 0])
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from oneepoch.config import DataConfig
from oneepoch.data.dataset import CTRData, EncodedSplit, Vocab
from oneepoch.data.schema import DataError

_HASH_MUL = 0x9E3779B1  # Knuth's multiplicative constant (odd, < 2**32)


def filter_rows(rows: np.ndarray, keep: int) -> np.ndarray:
    """Rows above ``keep`` go to the default row 0."""
    return np.where(rows <= keep, rows, 0).astype(rows.dtype, copy=False)


def hash_rows(rows: np.ndarray, buckets: int, salt: int = 0) -> np.ndarray:
    """IDs (rows >= 1) into ``1..buckets`` by a seeded multiplicative hash; row 0 stays 0."""
    r = rows.astype(np.uint64)
    h = ((r + np.uint64(salt)) * np.uint64(_HASH_MUL)) & np.uint64(0xFFFFFFFF)
    out = (h % np.uint64(buckets)).astype(np.int64) + 1
    return np.where(rows == 0, 0, out).astype(rows.dtype, copy=False)


def _map_split(s: EncodedSplit, fn_single: list, fn_seq: list) -> EncodedSplit:
    ids = s.ids.copy()
    for j, fn in enumerate(fn_single):
        if fn is not None:
            ids[:, j] = fn(np.asarray(s.ids[:, j]))
    seqs = [fn(np.asarray(q)) if fn is not None else q for q, fn in zip(s.seqs, fn_seq,
                                                                          strict=True)]
    return replace(s, ids=ids, seqs=seqs)


def exclude_fields(data: CTRData, names: list[str]) -> CTRData:
    """Drop features (and vocabularies no remaining field uses)."""
    unknown = [n for n in names if n not in data.fields]
    if unknown:
        raise DataError(f"data.exclude_fields: unknown field(s) {unknown} (fields: {data.fields})")
    keep_single = [j for j, f in enumerate(data.single_fields) if f not in names]
    keep_seq = [k for k, f in enumerate(data.seq_fields) if f not in names]
    if not keep_single and not keep_seq:
        raise DataError("data.exclude_fields: would leave no feature")
    splits = {
        n: replace(s, ids=np.ascontiguousarray(s.ids[:, keep_single]),
                   seqs=[s.seqs[k] for k in keep_seq], lens=[s.lens[k] for k in keep_seq])
        for n, s in data.splits.items()
    }
    singles = [data.single_fields[j] for j in keep_single]
    seqs = [data.seq_fields[k] for k in keep_seq]
    used = {data.field_vocab(f) for f in singles + seqs}
    vocabs = {k: v for k, v in data.vocabs.items() if k in used}
    return replace(data, splits=splits, single_fields=singles, seq_fields=seqs, vocabs=vocabs)


def sparsify(data: CTRData, mode: str, m: float, fields: list[str] | None = None,
             seed: int = 0) -> CTRData:
    """Paper A's feature-sparsity transforms with ratio ``m`` on the vocabularies of ``fields``.

    The reduced vocabulary has ``ceil(m * n)`` rows besides row 0 (at least 1). Fields that
    share a vocabulary (``item_ID`` and ``his_item_ID``) are reduced together. Each
    vocabulary's row mapping is computed once as a lookup table and applied with one gather
    per column, so the transform costs a fraction of a second even on large sets. ``seed``
    salts the hash (the trainer uses 0: one fixed hash per data set and ``m``).
    """
    if mode == "none":
        return data
    if mode not in ("filter", "hash"):
        raise DataError(f"data.sparsity: unknown mode {mode!r} (choose none, filter, hash)")
    if not 0 < m <= 1:
        raise DataError(f"data.sparsity_m: must be in (0, 1], got {m}")
    names = fields or data.fields
    unknown = [n for n in names if n not in data.fields]
    if unknown:
        raise DataError(f"data.sparsity_fields: unknown field(s) {unknown}")
    targets = {data.field_vocab(f) for f in names}
    new_vocabs: dict[str, Vocab] = {}
    fns = {}
    for vname, v in data.vocabs.items():
        if vname not in targets:
            new_vocabs[vname] = v
            continue
        k = max(1, math.ceil(m * (v.size - 1)))
        all_rows = np.arange(v.size, dtype=np.int64)
        if mode == "filter":
            lut = filter_rows(all_rows, k)
            new_vocabs[vname] = Vocab(vname, v.raw.slice(0, k), v.counts[:k])
        else:
            lut = hash_rows(all_rows, k, seed * 7919 + len(vname))
            counts = np.bincount(lut[1:] - 1, weights=v.counts, minlength=k).astype(np.int64)
            new_vocabs[vname] = Vocab(vname, v.raw.slice(0, 0), counts, n_ids=k)
        # one lookup table per vocabulary, applied by a gather (no per-element hashing)
        fns[vname] = lambda r, lut=lut: lut[r].astype(r.dtype, copy=False)
    fn_single = [fns.get(data.field_vocab(f)) for f in data.single_fields]
    fn_seq = [fns.get(data.field_vocab(f)) for f in data.seq_fields]
    splits = {n: _map_split(s, fn_single, fn_seq) for n, s in data.splits.items()}
    return replace(data, splits=splits, vocabs=new_vocabs)


def corrupt_labels(label: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Replace a ``fraction`` of labels by fair coin flips (paper A's reference code option)."""
    if fraction <= 0:
        return label
    rng = np.random.default_rng([seed, 17])
    out = np.array(label, dtype=np.float32, copy=True)
    pick = rng.random(len(out)) < fraction
    out[pick] = rng.integers(0, 2, int(pick.sum())).astype(np.float32)
    return out


CARVED = "carved-valid"  # the split name of a validation share carved out of train


def take_rows(split: EncodedSplit, rows: np.ndarray) -> EncodedSplit:
    """The rows ``rows`` of a split (a copy)."""
    return EncodedSplit(np.ascontiguousarray(split.ids[rows]),
                        [np.ascontiguousarray(q[rows]) for q in split.seqs],
                        [np.ascontiguousarray(n[rows]) for n in split.lens],
                        np.ascontiguousarray(split.label[rows]),
                        None if split.user is None else np.ascontiguousarray(split.user[rows]))


def carve_validation(data: CTRData, train: str, share: float, by: str = "random"
                     ) -> CTRData:
    """Move ``share`` of the ``train`` split to a new split :data:`CARVED`: a random subset
    (one fixed draw per data set, whatever the training seed, so every run of a comparison
    has the same splits) or, with ``by="order"``, the last rows in file order (the latest,
    when the rows are in time order as the preparers write them). The vocabulary is not
    rebuilt: carved rows still count as seen in training."""
    if not 0 < share < 1:
        raise ValueError(f"data.valid_share: must be in (0, 1), got {share}")
    tr = data.splits[train]
    n = len(tr)
    k = int(round(share * n))
    if k < 1 or k >= n:
        raise ValueError(f"data.valid_share={share}: carves {k} of {n} train rows")
    if by == "order":
        keep, carved = np.arange(n - k), np.arange(n - k, n)
    elif by == "random":
        pick = np.zeros(n, dtype=bool)
        pick[np.random.default_rng([20221, n]).choice(n, k, replace=False)] = True
        keep, carved = np.flatnonzero(~pick), np.flatnonzero(pick)
    else:
        raise ValueError(f"data.valid_by: unknown value {by!r} (choose random, order)")
    return replace(data, splits={**data.splits, train: take_rows(tr, keep),
                                 CARVED: take_rows(tr, carved)})


def apply_transforms(data: CTRData, cfg: DataConfig, seed: int = 0) -> CTRData:
    """Apply the transforms a :class:`DataConfig` asks for, in a fixed order: drop fields,
    filter / hash, carve validation out of train, label noise (train only)."""
    if cfg.exclude_fields:
        data = exclude_fields(data, cfg.exclude_fields)
    # one fixed hash per (data set, m), whatever the training seed
    data = sparsify(data, cfg.sparsity, cfg.sparsity_m, cfg.sparsity_fields or None, 0)
    if cfg.valid_share > 0:
        if cfg.valid_split:
            raise ValueError("data.valid_split and data.valid_share: set one of them")
        data = carve_validation(data, cfg.train_split, cfg.valid_share, cfg.valid_by)
    if cfg.label_noise > 0:
        tr = data.splits[cfg.train_split]
        noisy = replace(tr, label=corrupt_labels(tr.label, cfg.label_noise, seed))
        data = replace(data, splits={**data.splits, cfg.train_split: noisy})  # caller's untouched
    return data
