"""Per-field ID statistics in the layout of paper A's Tables 1-2, and the Fig. 10 plot.

    >>> rows = field_stats(load_ctr("runs/demo/data"))         # doctest: +SKIP
    >>> rows[0]["field"], rows[0]["unique_ids"]                 # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from oneepoch.data.dataset import CTRData, EncodedSplit
from oneepoch.io import atomic_write_text


def field_counts(data: CTRData, split: str = "train") -> dict[str, np.ndarray]:
    """Occurrences of each vocabulary row per field (row 0 = out of vocabulary)."""
    s: EncodedSplit = data.splits[split]
    out = {}
    for j, f in enumerate(data.single_fields):
        out[f] = np.bincount(np.asarray(s.ids[:, j]), minlength=data.vocabs[
            data.field_vocab(f)].size)
    for k, f in enumerate(data.seq_fields):
        q, ln = np.asarray(s.seqs[k]), np.asarray(s.lens[k])
        mask = np.arange(q.shape[1])[None, :] < ln[:, None]
        out[f] = np.bincount(q[mask], minlength=data.vocabs[data.field_vocab(f)].size)
    return out


def field_stats(data: CTRData, split: str = "train") -> list[dict[str, Any]]:
    """One row per field: unique IDs, occurrences, mean occurrences per ID, tail share, and
    the share of IDs seen once. Counts exclude the out-of-vocabulary row."""
    rows = []
    for f, c in field_counts(data, split).items():
        c = c[1:]
        seen = c[c > 0]
        srt = np.sort(seen)
        rows.append({
            "field": f,
            "type": "sequence" if f in data.seq_fields else "id",
            "unique_ids": int(len(seen)),
            "occurrences": int(seen.sum()),
            "mean_occurrences": float(seen.mean()) if len(seen) else 0.0,
            "bottom_half_share": float(srt[: len(srt) // 2].sum() / max(srt.sum(), 1)),
            "share_seen_once": float((seen == 1).mean()) if len(seen) else 0.0,
        })
    return rows


def format_stats(rows: list[dict[str, Any]], n_samples: int) -> str:
    """A Markdown table like paper A's Table 1."""
    out = [f"samples: {n_samples:,}", "",
           "| field | type | unique IDs | occurrences | mean occurrences | bottom 50% IDs hold "
           "| IDs seen once |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['field']} | {r['type']} | {r['unique_ids']:,} | {r['occurrences']:,} | "
                   f"{r['mean_occurrences']:.2f} | {100 * r['bottom_half_share']:.1f}% | "
                   f"{100 * r['share_seen_once']:.1f}% |")
    return "\n".join(out)


def write_stats(data: CTRData, out_dir: str | Path, split: str = "train") -> dict[str, Path]:
    """Write ``stats.json``, ``stats.md`` and ``id_frequency.png`` (Fig. 10) to ``out_dir``."""
    from oneepoch.report.figures import plot_cumulative_frequency

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = field_stats(data, split)
    n = len(data.splits[split])
    paths = {"json": out / "stats.json", "md": out / "stats.md", "png": out / "id_frequency.png"}
    for key, text in (("json", json.dumps({"split": split, "samples": n, "fields": rows},
                                          indent=1)), ("md", format_stats(rows, n))):
        atomic_write_text(paths[key], text + "\n")
    plot_cumulative_frequency({f: c[1:] for f, c in field_counts(data, split).items()},
                              paths["png"])
    return paths
