"""Issue 19: a property-based test of the data path. Random valid and invalid schemas and
Parquet files either load with exactly the encoded values a plain-Python model of the format
predicts, or fail with a DataError: never another exception type, never wrong numbers.

IDs are small integers written as int32, int64, strings of their digits or dictionary-encoded
strings, mixed freely between fields, files and splits (the loader matches ``7`` and ``"7"``);
invalid inputs are schema mistakes, missing or mistyped columns, bad labels, empty, truncated
or garbage files.
"""

from __future__ import annotations

import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oneepoch.data.dataset import load_ctr
from oneepoch.data.schema import DataError

ID_TYPES = ("int64", "int32", "str", "dict")
MUTATIONS = (
    "missing_column", "unknown_key", "bad_feature_type", "seq_without_max_len", "label_value",
    "label_nan", "label_null", "label_string", "label_missing", "empty_file", "truncated_file",
    "garbage_file", "not_a_mapping", "no_such_file", "float_ids", "seq_not_a_list",
    "vocab_of_unknown", "label_is_feature", "one_class_test", "split_not_a_file",
    "max_len_text", "schema_binary", "ids_as_lists",
)


def _id_array(vals: list[int | None], typ: str) -> pa.Array:
    if typ in ("int64", "int32"):
        return pa.array(vals, type=pa.int64() if typ == "int64" else pa.int32())
    arr = pa.array([None if v is None else str(v) for v in vals], type=pa.string())
    return arr.dictionary_encode() if typ == "dict" else arr


def _seq_array(vals: list[list[int | None] | None], typ: str) -> pa.Array:
    if typ == "str":
        return pa.array([None if s is None else [None if v is None else str(v) for v in s]
                         for s in vals], type=pa.list_(pa.string()))
    return pa.array(vals, type=pa.list_(pa.int64()))


@st.composite
def datasets(draw: st.DrawFn) -> dict:
    n_single = draw(st.integers(1, 3))
    n_seq = draw(st.integers(0, 1))
    fields = [{"name": f"f{i}", "seq": False, "vocab": ""} for i in range(n_single)]
    for i in range(n_seq):
        fields.append({"name": f"s{i}", "seq": True, "max_len": draw(st.integers(1, 3)),
                       "vocab": draw(st.sampled_from(["", "f0"]))})
    if n_single > 1 and draw(st.booleans()):
        fields[1]["vocab"] = "f0"
    user = draw(st.booleans())
    ids = st.one_of(st.none(), st.integers(0, 6)) if draw(st.booleans()) else st.integers(0, 6)
    files = {}
    for fname in [f"train{i}" for i in range(draw(st.integers(1, 2)))] + ["test"]:
        n = draw(st.integers(1, 6))
        cols: dict = {}
        types: dict = {}
        for f in fields:
            if f["seq"]:
                typ = draw(st.sampled_from(["int", "str"]))
                vals = draw(st.lists(st.one_of(st.none(), st.lists(ids, max_size=4)),
                                     min_size=n, max_size=n))
            else:
                typ = draw(st.sampled_from(ID_TYPES))
                vals = draw(st.lists(ids, min_size=n, max_size=n))
            cols[f["name"]], types[f["name"]] = vals, typ
        if user:
            cols["u"] = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
            types["u"] = draw(st.sampled_from(ID_TYPES))
        labels = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
        if fname == "test" and len(set(labels)) < 2:
            labels = [0, 1] + labels[2:] if n >= 2 else labels
            if n < 2:  # a test split needs both classes: give it a second row
                for k, v in cols.items():
                    cols[k] = v + v
                labels = [0, 1]
        cols["y"] = labels
        types["y"] = draw(st.sampled_from(["int", "float", "bool"]))
        files[fname] = {"cols": cols, "types": types}
    mutation = draw(st.sampled_from((None,) * 12 + MUTATIONS))  # ~40% valid data sets
    return {"fields": fields, "user": user, "files": files, "mutation": mutation,
            "victim": draw(st.sampled_from(sorted(files)))}


def _write(d: Path, spec: dict) -> None:
    fields, mut = spec["fields"], spec["mutation"]
    feats: dict = {}
    for f in fields:
        if f["seq"]:
            feats[f["name"]] = {"type": "sequence", "max_len": f["max_len"]}
            if f["vocab"]:
                feats[f["name"]]["vocab"] = f["vocab"]
        else:
            feats[f["name"]] = {"type": "id", "vocab": f["vocab"]} if f["vocab"] else "id"
    trains = sorted(k for k in spec["files"] if k.startswith("train"))
    schema: dict = {"format": "ctr", "label": "y", "features": feats,
                    "splits": {"train": [f"{t}.parquet" for t in trains],
                               "test": "test.parquet"}}
    if spec["user"]:
        schema["user_key"] = "u"
    if mut == "unknown_key":
        schema["lable"] = "y"
    elif mut == "bad_feature_type":
        feats["f0"] = {"type": "float"}
    elif mut == "seq_without_max_len":
        feats["f0"] = "sequence"
    elif mut == "vocab_of_unknown":
        feats["f0"] = {"type": "id", "vocab": "nope"}
    elif mut == "label_is_feature":
        feats["y"] = "id"
    elif mut == "no_such_file":
        schema["splits"]["test"] = "tset.parquet"
    elif mut == "split_not_a_file":
        schema["splits"]["test"] = 5
    elif mut == "max_len_text":
        feats["f0"] = {"type": "sequence", "max_len": "abc"}
    (d / "schema.yaml").write_text(yaml.safe_dump([schema] if mut == "not_a_mapping"
                                                  else schema))
    if mut == "schema_binary":
        (d / "schema.yaml").write_bytes(b"\xff\xfe\x00" + (d / "schema.yaml").read_bytes())
    victim = spec["victim"]
    for fname, fd in spec["files"].items():
        cols, types = dict(fd["cols"]), fd["types"]
        arrays = {}
        for f in fields:
            make = _seq_array if f["seq"] else _id_array
            arrays[f["name"]] = make(cols[f["name"]], types[f["name"]])
        if spec["user"]:
            arrays["u"] = _id_array(cols["u"], types["u"])
        y = cols["y"]
        ytyp = {"int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}[types["y"]]
        arrays["y"] = pa.array([bool(v) for v in y] if types["y"] == "bool" else y, type=ytyp)
        if fname == victim:
            if mut == "missing_column":
                del arrays["f0"]
            elif mut == "label_value":
                arrays["y"] = pa.array([2] + y[1:])
            elif mut == "label_nan":
                arrays["y"] = pa.array([float("nan")] + [float(v) for v in y[1:]])
            elif mut == "label_null":
                arrays["y"] = pa.array([None] + y[1:], type=pa.int64())
            elif mut == "label_string":
                arrays["y"] = pa.array([str(v) for v in y])
            elif mut == "label_missing":
                del arrays["y"]
            elif mut == "float_ids":
                arrays["f0"] = pa.array([0.5] * len(y))
            elif mut == "ids_as_lists":
                arrays["f0"] = pa.array([[1]] * len(y))
            elif mut == "seq_not_a_list" and any(f["seq"] for f in fields):
                arrays[fields[-1]["name"]] = pa.array(list(range(len(y))))
            elif mut == "seq_not_a_list":
                arrays["y"] = pa.array(["x"] * len(y))  # no sequence field: break the label
        if fname == "test" and mut == "one_class_test":
            arrays["y"] = pa.array([1] * len(y))
        path = d / f"{fname}.parquet"
        table = pa.table(arrays)
        if fname == victim and mut == "empty_file":
            table = table.slice(0, 0)
        pq.write_table(table, path)
        if fname == victim and mut == "truncated_file":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        elif fname == victim and mut == "garbage_file":
            path.write_bytes(b"this is not parquet" * 5)


def _expected(spec: dict) -> dict:
    """What the loader must produce, modelled in plain Python."""
    fields, files = spec["fields"], spec["files"]
    trains = sorted(k for k in files if k.startswith("train"))
    vocab_of = {f["name"]: f["vocab"] or f["name"] for f in fields}
    vocabs = {}
    for vname in dict.fromkeys(vocab_of.values()):
        members = [f for f in fields if vocab_of[f["name"]] == vname]
        counts: Counter = Counter()
        stringy = False
        for t in trains:
            for f in members:
                vals = files[t]["cols"][f["name"]]
                typ = files[t]["types"][f["name"]]
                stringy |= typ in ("str", "dict")
                flat = [v for s in vals if s is not None for v in s] if f["seq"] else vals
                counts.update(v for v in flat if v is not None)
        order = sorted(counts, key=lambda k: (-counts[k], str(k) if stringy else k))
        vocabs[vname] = {k: i + 1 for i, k in enumerate(order)}
    out = {}
    for split, names in (("train", trains), ("test", ["test"])):
        cols = {k: [v for n in names for v in files[n]["cols"][k]] for k in files[names[0]]["cols"]}
        singles = [f for f in fields if not f["seq"]]
        ids = np.array([[vocabs[vocab_of[f["name"]]].get(v, 0) if v is not None else 0
                         for f, v in zip(singles, row, strict=True)]
                        for row in zip(*(cols[f["name"]] for f in singles), strict=True)],
                       dtype=np.int32)
        ids = ids.reshape(len(cols["y"]), len(singles))
        seqs, lens = [], []
        for f in fields:
            if not f["seq"]:
                continue
            voc, m = vocabs[vocab_of[f["name"]]], f["max_len"]
            rows = [[] if s is None else [voc.get(v, 0) if v is not None else 0
                                          for v in s][-m:] for s in cols[f["name"]]]
            seqs.append(np.array([r + [0] * (m - len(r)) for r in rows], dtype=np.int32))
            lens.append(np.array([len(r) for r in rows], dtype=np.int32))
        out[split] = {"ids": ids, "seqs": seqs, "lens": lens,
                      "label": np.array(cols["y"], dtype=np.float32),
                      "user": cols.get("u")}
    out["vocab_sizes"] = {k: len(v) + 1 for k, v in vocabs.items()}
    return out


def _check(data, want: dict) -> None:
    assert data.vocab_sizes == want["vocab_sizes"]
    for split in ("train", "test"):
        got, exp = data.splits[split], want[split]
        np.testing.assert_array_equal(got.ids, exp["ids"])
        np.testing.assert_array_equal(got.label, exp["label"])
        for a, b in zip(got.seqs, exp["seqs"], strict=True):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(got.lens, exp["lens"], strict=True):
            np.testing.assert_array_equal(a, b)
    if want["train"]["user"] is not None:  # same user ID (7 or "7") <=> same user group
        raw = np.array(want["train"]["user"] + want["test"]["user"])
        grp = np.concatenate([data.splits["train"].user, data.splits["test"].user])
        assert np.array_equal(raw[:, None] == raw[None, :], grp[:, None] == grp[None, :])


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(datasets())
def test_data_path_loads_exactly_or_raises_data_error(spec):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _write(d, spec)
        for _ in range(2):  # the second load reads the encoded cache
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    data = load_ctr(d)
            except DataError:
                assert spec["mutation"] is not None, "a valid data set was refused"
                return
            assert spec["mutation"] is None, f"{spec['mutation']} was not refused"
            _check(data, _expected(spec))
