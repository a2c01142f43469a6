"""Checkpoints: tensors in safetensors, everything else in a small JSON file. Never pickles.

A checkpoint is a folder ``checkpoints/epoch-NNN/`` holding ``tensors.safetensors`` and
``state.json``; it is written to a temporary folder and renamed, so a kill never leaves a
half-written checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from oneepoch.io import atomic_dir

_TENSOR = "__tensor__"


def _split(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors in a nested structure by references; collect them in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = prefix.rstrip(".")
        tensors[key] = obj.detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        return {str(k): _split(v, f"{prefix}{k}.", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{prefix}{i}.", tensors) for i, v in enumerate(obj)]
    return obj


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write a nested state (tensors anywhere inside) to the folder ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "", tensors)
    with atomic_dir(path) as tmp:
        # shared storage (e.g. views) is not allowed by safetensors: store independent copies
        save_file({k: v.clone() if v.storage_offset() or not v.is_contiguous() else v
                   for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
        (tmp / "state.json").write_text(json.dumps(skeleton, indent=1))
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint folder written by :func:`save_checkpoint`."""
    path = Path(path)
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"{path}: not a checkpoint (no state.json)")
    tensors = load_file(str(path / "tensors.safetensors"), device=str(device))
    return _join(json.loads((path / "state.json").read_text()), tensors)


def restore_optim_keys(sd: dict[str, Any]) -> dict[str, Any]:
    """Turn the string keys of a reloaded torch.optim ``state`` back into ints."""
    if "state" in sd and isinstance(sd["state"], dict):
        sd = dict(sd)
        sd["state"] = {int(k): v for k, v in sd["state"].items()}
    return sd


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    d = Path(run_dir) / "checkpoints"
    return sorted(p for p in d.glob("epoch-*") if (p / "state.json").exists())


def clear_run_state(run_dir: str | Path) -> None:
    """Forget an earlier run in ``run_dir`` (its checkpoints and ``summary.json``) before a
    fresh run, so a later resume or reuse can never pick up a stale one."""
    shutil.rmtree(Path(run_dir) / "checkpoints", ignore_errors=True)
    (Path(run_dir) / "summary.json").unlink(missing_ok=True)


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Keep the ``keep`` most recent epoch checkpoints (0 = keep all)."""
    if keep <= 0:
        return
    for p in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
