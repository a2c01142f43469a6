"""Parameter-change probe of paper A (Sec. 5, Fig. 16): per step, the l-inf norm of the update
the optimizer actually applied to the embedding layer and to each FC layer.

The optimizer measures the norms itself (``Optimizer.track_updates``); this hook only buffers
one small row per step in memory and writes ``RUN/updates.parquet`` (columns ``step``,
``epoch``, ``embedding``, ``fc1``, ``fc2``, ...) at every evaluation and at the end. Each
metrics row also gets ``upd_<group>``: the mean per-step norm since the previous evaluation.

    >>> from oneepoch.training.trainer import train         # doctest: +SKIP
    >>> res = train(cfg, hooks=[UpdateNormLogger()])         # doctest: +SKIP
    >>> read_updates(res.run_dir)["fc1"][:3]                 # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch import nn

from oneepoch.io import atomic_write_parquet
from oneepoch.training.hooks import Hook, State

UPDATES_FILE = "updates.parquet"


def layer_groups(model: nn.Module) -> dict[str, list[str]]:
    """Parameter names per reported group: ``embedding`` and ``fc1``.. ``fcK`` (weight + bias of
    each linear layer of the MLP, input side first); the LR model's bias is ``bias``."""
    groups: dict[str, list[str]] = {}
    names = [n for n, _ in model.named_parameters()]
    groups["embedding"] = [n for n in names if n.startswith("embedding.")]
    mlp = getattr(model, "mlp", None)
    if mlp is not None and hasattr(mlp, "fcs"):
        for i, _ in enumerate(mlp.fcs):
            groups[f"fc{i + 1}"] = [n for n in names if n.startswith(f"mlp.fcs.{i}.")]
    elif "bias" in names:
        groups["bias"] = ["bias"]
    return {g: ns for g, ns in groups.items() if ns}


def read_updates(run_dir: str | Path) -> dict[str, np.ndarray]:
    """The per-step update norms of a run as column arrays (empty dict if none logged)."""
    p = Path(run_dir) / UPDATES_FILE
    if not p.exists():
        return {}
    t = pq.read_table(p)
    return {c: t.column(c).to_numpy() for c in t.column_names}


@dataclass
class UpdateNormSettings:
    """:class:`UpdateNormLogger` has no settings (probe spec ``updates``)."""


class UpdateNormLogger(Hook):
    """Log the l-inf norm of each step's applied update per layer group (see module doc)."""

    Settings = UpdateNormSettings  # what a probe spec may set (checked by ``make_probe``)

    def __init__(self) -> None:
        self._groups: dict[str, list[str]] = {}
        self._cols: dict[str, list[float]] = {}
        self._since_eval = 0

    def on_train_start(self, s: State) -> None:
        s.optimizer.track_updates = True
        self._groups = layer_groups(s.model)
        self._cols = {c: [] for c in ("step", "epoch", *self._groups)}
        old = read_updates(s.run_dir)
        if old and s.step > 0:  # resumed: keep what was logged up to the checkpoint
            keep = old["step"] <= s.step
            for c in self._cols:
                if c in old:
                    self._cols[c] = old[c][keep].tolist()
        self._since_eval = 0

    def after_step(self, s: State) -> None:
        lin = s.optimizer.last_update_linf
        self._cols["step"].append(s.step)
        self._cols["epoch"].append(s.epoch_float)
        for g, names in self._groups.items():
            self._cols[g].append(max((lin.get(n, 0.0) for n in names), default=0.0))
        self._since_eval += 1

    def on_eval(self, s: State, row: dict[str, Any]) -> None:
        k = self._since_eval
        for g in self._groups:
            row[f"upd_{g}"] = float(np.mean(self._cols[g][-k:])) if k else float("nan")
        self._since_eval = 0
        self.write(s.run_dir)

    def on_train_end(self, s: State) -> None:
        self.write(s.run_dir)

    def write(self, run_dir: Path) -> Path:
        """Write the buffer to ``run_dir/updates.parquet`` (atomically)."""
        path = Path(run_dir) / UPDATES_FILE
        cols = {c: pa.array(v, type=pa.int64() if c == "step" else pa.float32())
                for c, v in self._cols.items()}
        return atomic_write_parquet(path, pa.table(cols))
