"""Shared fixtures: small data sets the tests make themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from oneepoch.data.synthetic import SynthConfig, write_synthetic

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# A small world that still shows the one-epoch drop (see tests/test_end_to_end.py).
SMALL_WORLD = dict(n_users=20_000, n_items=100_000, n_train=100_000, n_test=20_000)


def kernel_paths() -> list:
    """``path`` parameters for a test run through the PyTorch twins and the native kernels."""
    from oneepoch import kernels

    return ["torch", pytest.param("native", marks=pytest.mark.skipif(
        not kernels.available(), reason="no C compiler here"))]


def kernel_path(name: str):
    """A context in which ``name`` (``torch`` or ``native``) computes the kernels."""
    import contextlib

    from oneepoch import kernels

    return kernels.disabled() if name == "torch" else contextlib.nullcontext()


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread (a busy machine's thread pool costs more than the work)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A very small synthetic data set (seconds to train) for mechanics tests."""
    out = tmp_path_factory.mktemp("synth") / "tiny"
    write_synthetic(out, SynthConfig(n_users=2_000, n_items=5_000, n_train=6_000, n_test=2_000,
                                     seed=3))
    return out


@pytest.fixture(scope="session")
def small_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "small"
    write_synthetic(out, SynthConfig(**SMALL_WORLD, seed=0))
    return out


def train_metrics(data: Path, out_dir: Path, name: str, epochs: int = 1) -> list[dict]:
    """Metrics rows of a short single-thread training run on ``data`` (batch 256, two
    evaluations per epoch): for comparing two paths of the same step."""
    from oneepoch.config import TrainConfig, load_config
    from oneepoch.training.trainer import train

    cfg = load_config(TrainConfig, None, [
        f"data.path={data}", f"out_dir={out_dir}", f"name={name}", "progress=false",
        "threads=1", "batch_size=256", "eval.per_epoch=2", f"epochs={epochs}"])
    return train(cfg).metrics


def write_ctr(directory: Path, tables: dict[str, pa.Table], schema_yaml: str) -> Path:
    """A hand-made CTR data set: one Parquet file per split + the given schema."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, t in tables.items():
        pq.write_table(t, directory / f"{split}.parquet")
    (directory / "schema.yaml").write_text(schema_yaml)
    return directory


HAND_SCHEMA = """\
format: ctr
label: y
user_key: uid
features:
  item: id
  cate: id
  hist: {type: sequence, max_len: 3, vocab: item}
splits:
  train: train.parquet
  test: test.parquet
"""


def hand_table(n: int = 8, seed: int = 0, **override: pa.Array) -> pa.Table:
    rng = np.random.default_rng(seed)
    cols = {
        "uid": pa.array(rng.integers(0, 3, n)),
        "item": pa.array([f"i{v}" for v in rng.integers(0, 4, n)]),
        "cate": pa.array(rng.integers(10, 12, n)),
        "hist": pa.array([[f"i{v}" for v in rng.integers(0, 5, rng.integers(0, 4))]
                          for _ in range(n)], type=pa.list_(pa.string())),
        "y": pa.array(rng.integers(0, 2, n)),
    }
    cols.update(override)
    return pa.table(cols)
