"""Train paper A's base CTR model for one epoch with a peer library and print its throughput.

Run inside .venv-bench (made by ``benchmarks/peers/setup_venv.sh``)::

    .venv-bench/bin/python benchmarks/peers/run_peer.py --system deepctr --data DIR --threads 1
    .venv-bench/bin/python benchmarks/peers/run_peer.py --system fuxictr --data DIR --threads 2
    .venv-bench/bin/python benchmarks/peers/run_peer.py --make-fake DIR [--rows 200000]

The model is the same for every peer: fields user_age, user_gender, item_ID, item_cate, scene_ID
(one ID each) and his_item_ID, his_item_cate (ID sequences of at most 20, mean-pooled, sharing the
embedding table of item_ID / item_cate), embedding dim 8, concatenated into an MLP 200-80-1 with
Dice, sigmoid output, BCE loss, Adam lr 1e-3, batch 1024, one epoch over DIR/train.parquet.

Exactly one JSON line goes to stdout (everything the peers print is sent to stderr)::

    {"system": ..., "threads": ..., "rows": ..., "seconds": ..., "samples_per_s": ...,
     "activation": "dice", "notes": "...", ...}
    {"system": ..., "error": "exact reason"}

Only the training epoch is timed; what the timed region covers for each peer is in ``notes`` and
in README.md beside this file. ``--threads N`` sets OMP/MKL threads and ``torch.set_num_threads``
and (unless ``--no-pin``) pins the process, and so every process it starts, to N CPUs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

SINGLE_FIELDS = ["user_age", "user_gender", "item_ID", "item_cate", "scene_ID"]
SEQUENCE_FIELDS = {"his_item_ID": "item_ID", "his_item_cate": "item_cate"}  # field -> shared table
LABEL = "label"
MAX_LEN = 20
EMB_DIM = 8
HIDDEN = (200, 80)
LR = 1e-3
ACTIVATION = "dice"  # both peers ship Dice, so PReLU is never needed

REPO = Path(__file__).resolve().parents[2]
STATUS_DIR = REPO / ".venv-bench" / "peer-status"
PIP_NAMES = {"deepctr": "deepctr-torch", "fuxictr": "fuxictr"}


class PeerError(RuntimeError):
    """A reason, meant for the JSON "error" field, why a peer cannot be benchmarked."""


@dataclass
class Result:
    system: str
    threads: int
    rows: int
    seconds: float
    samples_per_s: float
    activation: str
    notes: str
    batch: int
    loader: str
    train_logloss: float
    parameters: int
    first_batch_wait_s: float = 0.0  # timed region start -> first batch reaches the model
    samples_per_s_after_first_batch: float = 0.0
    # CPU time of the benchmark process itself (all its threads, not its child processes) over
    # the timed region: a check on how much of `seconds` it actually got the CPU for.
    process_cpu_s: float = 0.0
    embedding_rows: dict[str, int] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- helpers


def _stdout_to_stderr() -> TextIO:
    """Send fd 1 (Python, C code and child processes alike) to stderr; return the real stdout."""
    sys.stdout.flush()
    real = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return real


def _limit_threads(threads: int, pin: bool) -> str:
    """Thread env vars (before torch is imported) and CPU affinity; returns a note."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    if not pin:
        return "not pinned to CPUs"
    cpus = sorted(os.sched_getaffinity(0))
    chosen = cpus[:threads]
    os.sched_setaffinity(0, chosen)
    note = f"process and its children pinned to CPU(s) {chosen}"
    if threads > len(cpus):
        note += f" (only {len(cpus)} available)"
    return note


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _check_installed(system: str) -> None:
    status = STATUS_DIR / f"{system}.txt"
    if status.exists():
        text = status.read_text().strip()
        if text != "ok":
            raise PeerError(
                f"{PIP_NAMES[system]} is unusable in .venv-bench "
                f"(from benchmarks/peers/setup_venv.sh): {text}"
            )
    if _version(PIP_NAMES[system]) == "not installed":
        raise PeerError(
            f"{PIP_NAMES[system]} is not installed in {sys.prefix}; run "
            "benchmarks/peers/setup_venv.sh and use .venv-bench/bin/python"
        )


def _stop_ray() -> None:
    """Stop the Ray runtime FuxiCTR may have started (raylet, workers)."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def read_train(data_dir: Path, max_rows: int | None) -> pa.Table:
    import pyarrow.parquet as pq

    path = data_dir / "train.parquet"
    if not path.exists():
        raise PeerError(f"{path} does not exist")
    cols = [*SINGLE_FIELDS, *SEQUENCE_FIELDS, LABEL]
    table = pq.read_table(path, columns=cols)
    if max_rows is not None:
        table = table.slice(0, max_rows)
    return table.combine_chunks()


def _padded(col: pa.ChunkedArray | pa.Array, encode: Any) -> np.ndarray:
    """List column -> [rows, MAX_LEN] int64, items first, 0-padded, keeping the last MAX_LEN."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    lens = np.asarray(pc.fill_null(pc.list_value_length(col), 0), dtype=np.int64)
    flat = encode(np.asarray(pc.list_flatten(col), dtype=np.int64))
    n = len(lens)
    starts = np.repeat(np.cumsum(lens) - lens, lens)
    skip = np.repeat(np.maximum(lens - MAX_LEN, 0), lens)
    pos = np.arange(len(flat)) - starts - skip
    keep = pos >= 0
    out = np.zeros((n, MAX_LEN), dtype=np.int64)
    out[np.repeat(np.arange(n), lens)[keep], pos[keep]] = flat[keep]
    return out


def encode_ids(table: pa.Table) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, int]]:
    """IDs -> rows of a vocabulary of the IDs seen in train (shared fields pooled), 0 = padding.

    Returns the inputs by field, the labels and each table's number of rows.
    """
    import numpy as np
    import pyarrow.compute as pc

    groups: dict[str, list[str]] = {f: [f] for f in SINGLE_FIELDS}
    for seq, base in SEQUENCE_FIELDS.items():
        groups[base].append(seq)
    x: dict[str, np.ndarray] = {}
    sizes: dict[str, int] = {}
    for base, fields in groups.items():
        raw = [np.asarray(table.column(base), dtype=np.int64)]
        raw += [np.asarray(pc.list_flatten(table.column(f)), dtype=np.int64) for f in fields[1:]]
        uniq = np.unique(np.concatenate(raw))

        def encode(v: np.ndarray, uniq: np.ndarray = uniq) -> np.ndarray:
            return np.searchsorted(uniq, v) + 1

        x[base] = encode(raw[0])
        for f in fields[1:]:
            x[f] = _padded(table.column(f), encode)
        sizes[base] = len(uniq) + 1
    y = np.asarray(table.column(LABEL), dtype=np.float32)
    return {f: x[f] for f in [*SINGLE_FIELDS, *SEQUENCE_FIELDS]}, y, sizes


# ------------------------------------------------------------------------------- DeepCTR-Torch


def run_deepctr(table: pa.Table, batch: int, seed: int) -> Result:
    import numpy as np
    import torch
    from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat, combined_dnn_input
    from deepctr_torch.layers import DNN
    from deepctr_torch.models.basemodel import BaseModel
    from torch import nn

    x, y, sizes = encode_ids(table)
    columns: list[Any] = [SparseFeat(f, sizes[f], EMB_DIM) for f in SINGLE_FIELDS]
    columns += [
        VarLenSparseFeat(
            SparseFeat(f, sizes[base], EMB_DIM, embedding_name=base), MAX_LEN, combiner="mean"
        )
        for f, base in SEQUENCE_FIELDS.items()
    ]

    class BaseDNN(BaseModel):  # type: ignore[misc]
        """Embeddings -> concat -> DNN(200, 80, Dice) -> Linear(80, 1) -> bias + sigmoid."""

        def __init__(self, feature_columns: list[Any]) -> None:
            super().__init__(
                [],
                feature_columns,
                l2_reg_linear=0.0,
                l2_reg_embedding=0.0,
                seed=seed,
                task="binary",
                device="cpu",
            )
            self.dnn = DNN(
                self.compute_input_dim(feature_columns),
                HIDDEN,
                activation=ACTIVATION,
                dice_dim=2,
                device="cpu",
            )
            self.dnn_linear = nn.Linear(HIDDEN[-1], 1, bias=False)

        def forward(self, X: torch.Tensor) -> torch.Tensor:
            sparse, dense = self.input_from_feature_columns(
                X, self.dnn_feature_columns, self.embedding_dict
            )
            return self.out(self.dnn_linear(self.dnn(combined_dnn_input(sparse, dense))))

    model = BaseDNN(columns)
    model.compile(torch.optim.Adam(model.parameters(), lr=LR), "binary_crossentropy")
    t0 = time.perf_counter()
    np.concatenate([v.reshape(len(y), -1) for v in x.values()], axis=-1)
    stack_s = time.perf_counter() - t0

    first: list[float] = []
    hook = model.register_forward_pre_hook(lambda *_: first.append(time.perf_counter()))
    c0, t0 = time.process_time(), time.perf_counter()
    history = model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=True)
    seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    hook.remove()

    n_cols = len(SINGLE_FIELDS) + MAX_LEN * len(SEQUENCE_FIELDS)
    notes = (
        "model: deepctr_torch.models.basemodel.BaseModel subclass (WDL without its linear part): "
        "embedding_dict lookups via input_from_feature_columns, SparseFeat for single IDs and "
        "VarLenSparseFeat(combiner='mean') for sequences (mask = ID != 0), his_* fields share "
        "item_ID/item_cate tables through embedding_name, combined_dnn_input concat, "
        "layers.DNN(200, 80, activation='dice', dice_dim=2, no BN, no dropout), "
        "Linear(80, 1, bias=False) + PredictionLayer (bias + sigmoid); l2_reg_embedding=0 and "
        "l2_reg_linear=0 (their 1e-5 defaults would add a full-table L2 term every step); "
        "Dice = BatchNorm1d(affine) + sigmoid gate + alpha; DNN weights init N(0, 1e-4) "
        "(DeepCTR default). Loss F.binary_cross_entropy with reduction='sum' (DeepCTR's fit; "
        "speed-neutral), torch.optim.Adam(lr=1e-3) over dense gradients. "
        "Timed: the whole model.fit(x, y, batch_size, epochs=1, verbose=0, shuffle=True) call: "
        f"it stacks the {n_cols} input columns into one int64 tensor (~{stack_s:.2f} s measured "
        "separately), builds a TensorDataset + shuffling DataLoader (per-sample indexing and "
        "default_collate, no workers), then per batch casts X to float32 and slices it back "
        "into long IDs, forward, loss, backward, Adam step and loss.item(). "
        "Not timed: reading parquet and ID encoding (vocabulary of train IDs, 0 = padding)."
    )
    n = len(y)
    return Result(
        system="deepctr",
        threads=0,
        rows=n,
        seconds=seconds,
        samples_per_s=n / seconds,
        activation=ACTIVATION,
        notes=notes,
        batch=batch,
        loader="DeepCTR fit(): TensorDataset + DataLoader(shuffle=True)",
        train_logloss=float(history.history["loss"][0]),
        parameters=sum(p.numel() for p in model.parameters()),
        first_batch_wait_s=first[0] - t0,
        process_cpu_s=cpu_s,
        embedding_rows={k: sizes[k] for k in ("item_ID", "item_cate")},
        versions={"deepctr-torch": _version("deepctr-torch")},
    )


# ------------------------------------------------------------------------------------- FuxiCTR


def _fuxictr_feature_cols() -> list[dict[str, Any]]:
    seq = [
        {
            "name": f,
            "active": True,
            "dtype": "str",
            "type": "sequence",
            "splitter": "^",
            "max_len": MAX_LEN,
            "padding": "post",
            "share_embedding": base,
            "feature_encoder": "layers.MaskedAveragePooling()",
        }
        for f, base in SEQUENCE_FIELDS.items()
    ]
    return [{"name": SINGLE_FIELDS, "active": True, "dtype": "str", "type": "categorical"}, *seq]


def _write_fuxictr_raw(table: pa.Table, path: Path) -> None:
    """FuxiCTR's input convention: IDs as strings, sequences as '^'-joined strings.

    Strings on both sides make a sequence token and the single ID it shares a table with the
    same vocabulary entry (int and str tokens would not match). Sequences go in pre-joined
    because FuxiCTR 2.3.10's preprocess() fails on list columns with polars 2.1
    (fill_null("") on a list column: "cannot cast List type (inner: 'Int64', to: 'String')").
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    for f in [*SINGLE_FIELDS, *SEQUENCE_FIELDS]:
        col = table.column(f)
        if f in SEQUENCE_FIELDS:
            col = pc.binary_join(col.cast(pa.list_(pa.string())), "^")
        else:
            col = col.cast(pa.string())
        table = table.set_column(table.schema.get_field_index(f), f, col)
    pq.write_table(table, path)


def run_fuxictr(table: pa.Table, batch: int, seed: int, loader: str, tmp: Path) -> Result:
    import numpy as np
    import torch
    from fuxictr.features import FeatureMap
    from fuxictr.preprocess import FeatureProcessor, build_dataset
    from fuxictr.pytorch.dataloaders import RankDataLoader
    from fuxictr.pytorch.layers import FeatureEmbedding, MLP_Block
    from fuxictr.pytorch.models import BaseModel
    from fuxictr.pytorch.torch_utils import seed_everything

    seed_everything(seed)
    raw = tmp / "raw" / "train.parquet"
    raw.parent.mkdir(parents=True)
    _write_fuxictr_raw(table, raw)
    dataset_id = "bench"
    processor = FeatureProcessor(
        feature_cols=_fuxictr_feature_cols(),
        label_col={"name": LABEL, "dtype": "float"},
        dataset_id=dataset_id,
        data_root=str(tmp),
    )
    if loader == "ray":
        # FuxiCTR 2.3's own flow: polars statistics, Ray Data transform, parquet out.
        train_path, _, _ = build_dataset(processor, train_data=str(raw), data_format="parquet")
        data_format = "parquet"
    else:
        # Same FeatureProcessor (fit + transform) without Ray; the result saved as FuxiCTR's
        # npz format, read by its in-memory NpzDataLoader.
        ddf = processor.preprocess(processor.read_data(str(raw), data_format="parquet"))
        processor.fit(ddf, rebuild_dataset=True)
        df = ddf.collect()
        encoded = processor.transform({c: df[c].to_numpy() for c in df.columns})
        train_path = str(Path(processor.data_dir) / "train.npz")
        np.savez(train_path, **{k: np.asarray(v) for k, v in encoded.items()})
        data_format = "npz"
    feature_map = FeatureMap(dataset_id, processor.data_dir)
    feature_map.load(
        os.path.join(processor.data_dir, "feature_map.json"), params={"embedding_dim": EMB_DIM}
    )

    class BaseDNN(BaseModel):  # type: ignore[misc]
        """model_zoo DNN: FeatureEmbedding (flattened) -> MLP_Block(200, 80, Dice) -> sigmoid."""

        def __init__(self) -> None:
            super().__init__(
                feature_map,
                model_id="BaseDNN",
                gpu=-1,
                verbose=0,
                model_root=str(tmp / "checkpoints"),
                metrics=["logloss"],
                reduce_lr_on_plateau=False,
            )
            self.embedding_layer = FeatureEmbedding(feature_map, EMB_DIM)
            self.mlp = MLP_Block(
                input_dim=feature_map.sum_emb_out_dim(),
                output_dim=1,
                hidden_units=list(HIDDEN),
                hidden_activations=ACTIVATION,
                output_activation=self.output_activation,
                dropout_rates=0.0,
                batch_norm=False,
            )
            self.compile("Adam", "binary_crossentropy", LR)
            self.reset_parameters()
            self.model_to_device()
            self.seen = 0
            self.loss_sum = 0.0
            self.first_batch_at = 0.0

        def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            emb = self.embedding_layer(self.get_inputs(inputs), flatten_emb=True)
            return {"y_pred": self.mlp(emb)}

        def train_step(self, batch_data: dict[str, torch.Tensor]) -> torch.Tensor:
            if self.first_batch_at == 0.0:
                self.first_batch_at = time.perf_counter()
            loss = super().train_step(batch_data)
            n = len(batch_data[LABEL])
            self.seen += n
            self.loss_sum += loss.item() * n
            return loss

    model = BaseDNN()
    train_gen, _ = RankDataLoader(
        feature_map,
        stage="train",
        train_data=train_path,
        batch_size=batch,
        shuffle=True,
        data_format=data_format,
    )
    # The state BaseModel.fit() sets up before its epoch loop; fit() itself is not used because
    # it ends with a validation pass and a checkpoint reload. Evaluation is kept out of the epoch.
    model._max_gradient_norm = 10.0
    model._best_metric = -math.inf
    model._stopping_steps = 0
    model._stop_training = False
    model._steps_per_epoch = len(train_gen)
    model._total_steps = 0
    model._batch_index = 0
    model._epoch_index = 0
    model._eval_steps = len(train_gen) + 1

    c0, t0 = time.process_time(), time.perf_counter()
    model.train_epoch(train_gen)
    seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0

    specs = feature_map.features
    if loader == "ray":
        loader_desc = (
            "build_dataset (Ray Data transform -> parquet), ParquetDataLoader "
            "(ray.data.read_parquet, shuffle=True: materialize().random_shuffle(), "
            "iter_torch_batches with prefetch_batches=1)"
        )
        timed_loader = (
            "iterating ParquetDataLoader, which runs Ray Data's global random "
            "shuffle and batching to torch tensors in Ray worker processes"
        )
    else:
        loader_desc = (
            "FeatureProcessor fit/transform without Ray, npz file, NpzDataLoader "
            "(in-memory, DataLoader(shuffle=True, num_workers=1), per-row "
            "default_collate)"
        )
        timed_loader = (
            "iterating NpzDataLoader (one DataLoader worker process collating per-row numpy slices)"
        )
    notes = (
        "model: fuxictr.pytorch.models.BaseModel subclass written like model_zoo DNN: "
        "FeatureEmbedding(flatten_emb=True) over 5 categorical + 2 sequence features "
        "(sequence feature_encoder layers.MaskedAveragePooling(), padding = zero rows), his_* "
        "share item_ID/item_cate tables via share_embedding, MLP_Block(hidden [200, 80], "
        "hidden_activations='dice', output_dim=1, sigmoid, batch_norm=False, no dropout); "
        "FuxiCTR's Dice = BatchNorm1d(affine=False) + sigmoid gate + alpha; xavier_normal "
        "Linear init, embeddings N(0, 1e-4). Adam lr 1e-3 (dense gradients), "
        "F.binary_cross_entropy (mean). FuxiCTR's train_step always applies "
        "clip_grad_norm_(max_norm=10) over all parameters (its default; the base model has no "
        "clipping). IDs tokenized by FuxiCTR (observed train IDs, 0 = padding, last = OOV). "
        f"Data pipeline: {loader_desc}. "
        f"Timed: model.train_epoch(train_gen) (the epoch loop of BaseModel.fit without its "
        f"final evaluation): {timed_loader}, then per batch get_inputs, forward, loss, "
        "backward, gradient clipping, Adam step and loss.item(). Not timed: raw parquet -> "
        "FuxiCTR features (FeatureProcessor + transform), feature map, model build, "
        "data-loader construction (incl. Ray start-up and row count)."
    )
    if model.seen != table.num_rows:
        raise PeerError(f"FuxiCTR trained on {model.seen} rows, expected {table.num_rows}")
    return Result(
        system="fuxictr",
        threads=0,
        rows=model.seen,
        seconds=seconds,
        samples_per_s=model.seen / seconds,
        activation=ACTIVATION,
        notes=notes,
        batch=batch,
        loader=f"fuxictr-{loader}",
        train_logloss=model.loss_sum / max(model.seen, 1),
        parameters=sum(p.numel() for p in model.parameters()),
        first_batch_wait_s=model.first_batch_at - t0,
        process_cpu_s=cpu_s,
        embedding_rows={k: int(specs[k]["vocab_size"]) for k in ("item_ID", "item_cate")},
        versions={
            "fuxictr": _version("fuxictr"),
            "ray": _version("ray"),
            "polars": _version("polars"),
        },
    )


# ----------------------------------------------------------------------------------- fake data


def make_fake(out: Path, rows: int, test_rows: int, seed: int) -> None:
    """Random data set with the benchmark's columns (Zipf-ish item popularity)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    n_items, n_cates, n_users = 500_000, 200, 100_000
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.9
    popularity /= popularity.sum()
    item_ids = rng.permutation(n_items)  # rank -> item ID
    item_cate = rng.integers(0, n_cates, size=n_items)

    def items(k: int) -> np.ndarray:
        return item_ids[rng.choice(n_items, size=k, p=popularity)]

    def split(n: int) -> pa.Table:
        item = items(n)
        lens = rng.integers(0, MAX_LEN + 1, size=n)
        his = items(int(lens.sum()))
        offsets = pa.array(np.concatenate([[0], np.cumsum(lens)]), type=pa.int32())
        logit = -1.5 + 0.8 * np.sin(item % 97) + 0.3 * (lens > 10)
        label = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
        return pa.table(
            {
                "user_age": rng.integers(0, 10, size=n),
                "user_gender": rng.integers(0, 3, size=n),
                "item_ID": item,
                "item_cate": item_cate[item],
                "scene_ID": rng.integers(0, 19, size=n),
                "his_item_ID": pa.ListArray.from_arrays(offsets, pa.array(his, type=pa.int64())),
                "his_item_cate": pa.ListArray.from_arrays(
                    offsets, pa.array(item_cate[his], type=pa.int64())
                ),
                LABEL: label,
                "user_id": rng.integers(0, n_users, size=n),
            }
        )

    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(split(rows), out / "train.parquet")
    pq.write_table(split(test_rows), out / "test.parquet")
    seq = ", ".join(
        f"{f}: {{type: sequence, max_len: {MAX_LEN}, vocab: {b}}}"
        for f, b in SEQUENCE_FIELDS.items()
    )
    (out / "schema.yaml").write_text(
        "format: ctr\nlabel: label\nuser_key: user_id\n"
        f"features: {{{', '.join(f'{f}: id' for f in SINGLE_FIELDS)}, {seq}}}\n"
        "splits: {train: train.parquet, test: test.parquet}\n"
    )


# ---------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--system", choices=sorted(PIP_NAMES))
    p.add_argument("--data", type=Path, help="data-set folder holding train.parquet")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-rows", type=int, default=None, help="train on the first R rows only")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--fuxictr-loader",
        choices=["ray", "npz"],
        default="ray",
        help="ray: FuxiCTR 2.3's parquet flow (Ray Data); npz: its in-memory loader",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin to --threads CPUs")
    p.add_argument("--make-fake", type=Path, metavar="DIR", help="write a random data set")
    p.add_argument("--rows", type=int, default=200_000, help="--make-fake: train rows")
    p.add_argument("--test-rows", type=int, default=20_000, help="--make-fake: test rows")
    args = p.parse_args(argv)
    if args.make_fake is None and (args.system is None or args.data is None):
        p.error("--system and --data are required (or --make-fake DIR)")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.make_fake is not None:
        make_fake(args.make_fake, args.rows, args.test_rows, args.seed)
        print(
            json.dumps(
                {"fake_data": str(args.make_fake), "rows": args.rows, "test_rows": args.test_rows}
            )
        )
        return 0

    pin_note = _limit_threads(args.threads, pin=not args.no_pin)
    real_stdout = _stdout_to_stderr()
    out: dict[str, Any]
    try:
        _check_installed(args.system)
        import torch

        torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        table = read_train(args.data, args.max_rows)
        with tempfile.TemporaryDirectory(prefix="oneepoch-peer-") as tmp:
            if args.system == "deepctr":
                result = run_deepctr(table, args.batch, args.seed)
            else:
                try:
                    result = run_fuxictr(
                        table, args.batch, args.seed, args.fuxictr_loader, Path(tmp)
                    )
                finally:
                    _stop_ray()
        result.threads = args.threads
        result.samples_per_s_after_first_batch = round(
            result.rows / (result.seconds - result.first_batch_wait_s), 1
        )
        result.first_batch_wait_s = round(result.first_batch_wait_s, 3)
        result.seconds = round(result.seconds, 3)
        result.process_cpu_s = round(result.process_cpu_s, 3)
        result.samples_per_s = round(result.samples_per_s, 1)
        result.train_logloss = round(result.train_logloss, 5)
        result.notes += (
            f" Threads: OMP/MKL_NUM_THREADS={args.threads}, "
            f"torch.set_num_threads({args.threads}); {pin_note}."
        )
        result.versions.update(
            torch=torch.__version__,
            numpy=_version("numpy"),
            pandas=_version("pandas"),
            pyarrow=_version("pyarrow"),
        )
        out = asdict(result)
    except PeerError as e:
        out = {"system": args.system, "threads": args.threads, "error": str(e)}
    except Exception as e:  # noqa: BLE001 - every failure becomes the JSON "error"
        traceback.print_exc()
        frame = traceback.extract_tb(e.__traceback__)[-1]
        out = {
            "system": args.system,
            "threads": args.threads,
            "error": f"{type(e).__name__}: {e} (at {frame.filename}:{frame.lineno})",
        }
    real_stdout.write(json.dumps(out) + "\n")
    real_stdout.flush()
    return 0 if "error" not in out else 1


if __name__ == "__main__":
    sys.exit(main())
