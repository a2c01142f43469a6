"""Data-set schema: which Parquet column plays which role.

A data set is a folder holding Parquet files and a ``schema.yaml``::

    format: ctr                 # ctr (labelled impressions) or engagements (positive pairs)
    label: label                # ctr: 0/1 column
    user_key: user_id           # optional: groups rows per user for GAUC
    timestamp: ts               # optional
    features:
      user_age: id              # categorical ID (int or string)
      item_ID: id
      his_item_ID: {type: sequence, max_len: 20, vocab: item_ID}   # list column
    splits:
      train: train.parquet      # a file, a glob or a list of them, relative to the folder
      test: test.parquet

An ``engagements`` data set names ``user``, ``item`` and optionally ``surface``, ``timestamp``
and ``engagement_type`` columns instead of ``label``/``features``.

``vocab: OTHER`` makes a field share the vocabulary (and so the embedding rows) of another
field, as the reference code of paper A does for behaviour histories.

Sequences longer than ``max_len`` are truncated to their last ``max_len`` items (the most
recent, when histories are in time order) with a warning, unless ``on_long_sequence: error``.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from oneepoch.io import atomic_write_text

SCHEMA_FILE = "schema.yaml"


class DataError(ValueError):
    """Bad input data: the message names the file, column and problem."""


@dataclass(frozen=True)
class Feature:
    """One input field of a CTR data set."""

    name: str
    type: str = "id"  # "id" or "sequence"
    max_len: int = 0  # sequences only
    vocab: str = ""  # name of the field whose vocabulary this one shares ("" = its own)

    @property
    def is_sequence(self) -> bool:
        return self.type == "sequence"

    @property
    def vocab_name(self) -> str:
        return self.vocab or self.name


@dataclass
class Schema:
    """Parsed ``schema.yaml``. Build one with :func:`load_schema` or directly::

        >>> s = Schema(features=[Feature("item_ID")], label="y", splits={"train": ["t.parquet"]})
        >>> s.feature_names
        ['item_ID']
    """

    format: str = "ctr"
    features: list[Feature] = field(default_factory=list)
    label: str = "label"
    user_key: str = ""
    timestamp: str = ""
    splits: dict[str, list[str]] = field(default_factory=dict)
    on_long_sequence: str = "truncate"
    # engagement logs
    user: str = ""
    item: str = ""
    surface: str = ""
    engagement_type: str = ""
    name: str = ""

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    def feature(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(name)

    @property
    def vocab_names(self) -> list[str]:
        """Distinct vocabularies, in order of first use."""
        out: list[str] = []
        for f in self.features:
            if f.vocab_name not in out:
                out.append(f.vocab_name)
        return out

    def columns(self) -> list[str]:
        """Every column the schema reads."""
        if self.format == "engagements":
            cols = [self.user, self.item, self.surface, self.timestamp, self.engagement_type]
        else:
            cols = [*self.feature_names, self.label, self.user_key, self.timestamp]
        return list(dict.fromkeys(c for c in cols if c))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": self.format}
        if self.name:
            d["name"] = self.name
        if self.format == "ctr":
            d["label"] = self.label
            feats: dict[str, Any] = {}
            for f in self.features:
                if f.is_sequence:
                    spec: dict[str, Any] = {"type": "sequence", "max_len": f.max_len}
                    if f.vocab:
                        spec["vocab"] = f.vocab
                    feats[f.name] = spec
                else:
                    feats[f.name] = {"type": "id", "vocab": f.vocab} if f.vocab else "id"
            d["features"] = feats
        for key in ("user_key", "timestamp", "user", "item", "surface", "engagement_type"):
            if getattr(self, key):
                d[key] = getattr(self, key)
        if self.on_long_sequence != "truncate":
            d["on_long_sequence"] = self.on_long_sequence
        d["splits"] = {k: v[0] if len(v) == 1 else v for k, v in self.splits.items()}
        return d

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / SCHEMA_FILE
        return atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


_TOP_KEYS = {
    "format", "name", "label", "user_key", "timestamp", "features", "splits", "on_long_sequence",
    "user", "item", "surface", "engagement_type",
}
_FEATURE_KEYS = {"type", "max_len", "vocab"}


def parse_schema(raw: Any, source: str = SCHEMA_FILE) -> Schema:
    """Validate a schema mapping (as read from YAML) and return a :class:`Schema`."""
    if not isinstance(raw, dict):
        raise DataError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise DataError(f"{source}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    fmt = raw.get("format", "ctr")
    if fmt not in ("ctr", "engagements"):
        raise DataError(f"{source}: format must be 'ctr' or 'engagements', got {fmt!r}")
    splits_raw = raw.get("splits")
    if not isinstance(splits_raw, dict) or not splits_raw:
        raise DataError(f"{source}: 'splits' must map split names (train, test, ...) to files")
    splits = {}
    for k, v in splits_raw.items():
        files = [v] if isinstance(v, str) else v
        if not isinstance(files, list) or not files or not all(isinstance(x, str) for x in files):
            raise DataError(f"{source}: split {k!r}: expected a file name, a glob or a list of "
                            f"them, got {v!r}")
        splits[str(k)] = files
    on_long = raw.get("on_long_sequence", "truncate")
    if on_long not in ("truncate", "error"):
        raise DataError(f"{source}: on_long_sequence must be 'truncate' or 'error', "
                        f"got {on_long!r}")
    s = Schema(
        format=fmt, splits=splits, on_long_sequence=on_long, name=str(raw.get("name", "")),
        user_key=str(raw.get("user_key", "") or ""), timestamp=str(raw.get("timestamp", "") or ""),
    )
    if fmt == "engagements":
        for key in ("user", "item"):
            if not raw.get(key):
                raise DataError(f"{source}: an engagements data set must name its '{key}' column")
        s.user, s.item = str(raw["user"]), str(raw["item"])
        s.surface = str(raw.get("surface", "") or "")
        s.engagement_type = str(raw.get("engagement_type", "") or "")
        return s
    s.label = str(raw.get("label", "label"))
    feats = raw.get("features")
    if not isinstance(feats, dict) or not feats:
        raise DataError(f"{source}: 'features' must map column names to 'id' or a sequence spec")
    for name, spec in feats.items():
        if spec in ("id", None):
            spec = {"type": "id"}
        elif spec == "sequence":
            raise DataError(f"{source}: feature {name!r}: a sequence needs max_len, e.g. "
                            "{type: sequence, max_len: 20}")
        if not isinstance(spec, dict):
            raise DataError(f"{source}: feature {name!r}: expected 'id' or a mapping, got {spec!r}")
        bad = set(spec) - _FEATURE_KEYS
        if bad:
            raise DataError(f"{source}: feature {name!r}: unknown key(s) {sorted(bad)}")
        ftype = spec.get("type", "id")
        if ftype not in ("id", "sequence"):
            raise DataError(f"{source}: feature {name!r}: type must be 'id' or 'sequence'")
        max_len = spec.get("max_len", 0)
        if isinstance(max_len, bool) or not isinstance(max_len, int):
            raise DataError(f"{source}: feature {name!r}: max_len must be a whole number, "
                            f"got {max_len!r}")
        if ftype == "sequence" and max_len <= 0:
            raise DataError(f"{source}: feature {name!r}: a sequence needs max_len > 0")
        s.features.append(Feature(str(name), ftype, max_len, str(spec.get("vocab", "") or "")))
    names = set(s.feature_names)
    for f in s.features:
        if f.vocab and f.vocab not in names:
            raise DataError(f"{source}: feature {f.name!r} shares vocab {f.vocab!r}, "
                            "which is not a feature")
        if f.vocab and s.feature(f.vocab).vocab:
            raise DataError(f"{source}: feature {f.name!r} shares vocab {f.vocab!r}, which itself "
                            "shares another: point at the owner directly")
    if s.label in names:
        raise DataError(f"{source}: label column {s.label!r} is also listed as a feature")
    return s


def load_schema(directory: str | Path) -> Schema:
    """Read and validate ``DIR/schema.yaml``."""
    path = Path(directory) / SCHEMA_FILE
    if not Path(directory).is_dir():
        raise DataError(f"{directory}: not a directory (a data set is a folder with {SCHEMA_FILE})")
    if not path.exists():
        raise DataError(f"{path}: missing schema file (see docs/data.md for its format)")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid YAML: {e}") from e
    return parse_schema(raw, str(path))


def split_files(directory: str | Path, schema: Schema, split: str) -> list[Path]:
    """Resolve a split's file patterns to existing files, in sorted order."""
    if split not in schema.splits:
        raise DataError(f"{Path(directory) / SCHEMA_FILE}: no split {split!r} "
                        f"(has {sorted(schema.splits)})")
    out: list[Path] = []
    for pattern in schema.splits[split]:
        matches = sorted(glob.glob(str(Path(directory) / pattern)))
        if not matches:
            raise DataError(f"{Path(directory) / pattern}: split {split!r}: no such file")
        out.extend(Path(m) for m in matches)
    return out
