"""Checkpoints: tensors in safetensors, everything else in a small JSON file. Never pickles.

A checkpoint is a folder ``checkpoints/epoch-NNN/`` holding ``tensors.safetensors`` and
``state.json``; it is written to a temporary folder and renamed, so a kill never leaves a
half-written checkpoint. A damaged one (truncated, empty or garbage tensors, a ``state.json`` of
the wrong structure, tensors whose shapes do not fit the model) is a :class:`CheckpointError`
naming the file and what to do.

Sharded tables (``pretrain --shard-tables``, ``train --shard-tables``) are not in
``tensors.safetensors``: every rank writes its shards of them, and of the optimizer state fused
with them, with ``torch.distributed.checkpoint`` (DCP) into ``tables.dcp/`` inside the
checkpoint folder (:func:`save_checkpoint`'s ``tables``). Its tensors are named by their place
in the state, ``/``-joined (``model/user_weight``, ``optim/sparse/user_weight/square_avg``;
``train``'s one table ``model/embedding.weight``), and ``state.json`` lists them, so a process
that holds whole tables reads them back whole into their places (:func:`read_dcp`,
:func:`put_tensors`; no process group needed), and a sharded one reads its shards (DCP
reshards to any number of processes).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from oneepoch.io import atomic_dir, write_safetensors

_TENSOR = "__tensor__"
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
TABLES_DIR = "tables.dcp"  # sharded tables, written by torch.distributed.checkpoint


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit: the message names the file and says
    what to do (the command line reports it in one line, exit code 2)."""


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
            return tensors[obj[_TENSOR]]  # KeyError: see load_checkpoint
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_checkpoint(path: str | Path, state: dict[str, Any],
                    tables: str | Path | None = None) -> Path:
    """Write a nested state (tensors anywhere inside) to the folder ``path`` atomically.

    ``tables``: a finished DCP folder (every rank's shards written) that becomes the
    checkpoint's ``tables.dcp/``; the entries of ``state`` it holds are left out of
    ``tensors.safetensors``, and ``state.json`` names them (``tables_dcp``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tables is not None:
        shapes = dcp_shapes(tables)
        state = {**drop_tensors(state, list(shapes)),
                 "tables_dcp": {"dir": TABLES_DIR, "tensors": sorted(shapes)}}
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "", tensors)
    with atomic_dir(path) as tmp:
        # shared storage (e.g. views) is not allowed by safetensors: store independent copies
        write_safetensors(tmp / TENSORS_FILE,
                          {k: v.clone() if v.storage_offset() or not v.is_contiguous() else v
                           for k, v in tensors.items()})
        (tmp / STATE_FILE).write_text(json.dumps(skeleton, indent=1))
        if tables is not None:
            os.replace(tables, tmp / TABLES_DIR)
    return path


def dcp_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The tensors of a DCP folder and their whole shapes (reads its ``.metadata`` only)."""
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(path)).read_metadata()
    return {k: tuple(m.size) for k, m in md.state_dict_metadata.items() if hasattr(m, "size")}


def read_dcp(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP folder, whole, in this process (whatever number of processes
    wrote it; no process group needed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        md = FileSystemReader(str(path)).read_metadata()
        sd = {k: torch.zeros(tuple(m.size), dtype=m.properties.dtype)
              for k, m in md.state_dict_metadata.items() if hasattr(m, "size")}
        with warnings.catch_warnings():  # "assuming ... a single process": that is the intent
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            warnings.simplefilter("ignore", FutureWarning)
            dcp.load(sd, checkpoint_id=str(path), no_dist=True)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - a truncated shard file
        raise dcp_damaged(path, e) from e
    return sd


def dcp_damaged(path: str | Path, e: BaseException) -> CheckpointError:
    """The error for a DCP folder that cannot be read (a truncated or missing shard file)."""
    cause = e.failures if hasattr(e, "failures") else {}  # DCP: {rank: the error}
    inner = next(iter(cause.values()), None) if isinstance(cause, dict) else None
    if isinstance(inner, tuple) and inner:  # (exception, traceback summary)
        inner = inner[0]
    if isinstance(inner, BaseException):
        e = inner
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return CheckpointError(f"{path}: its sharded tables (torch.distributed.checkpoint) cannot "
                           f"be read ({type(e).__name__}{': ' + first if first else ''}); "
                           f"{_DAMAGED}")


def drop_tensors(state: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """``state`` without the entries at ``keys`` (``/``-joined paths; a missing one is
    skipped); the dicts along the paths are copied, ``state`` is unchanged."""
    out = dict(state)
    for key in keys:
        node, parts = out, key.split("/")
        for p in parts[:-1]:
            if not isinstance(node.get(p), Mapping):
                break
            node[p] = dict(node[p])
            node = node[p]
        else:
            node.pop(parts[-1], None)
    return out


def put_tensors(state: dict[str, Any], tensors: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with ``tensors`` (``{"/"-joined path: value}``) put in their places (the dicts
    along the paths are copied or created; ``state`` is unchanged)."""
    out = dict(state)
    for key, v in tensors.items():
        node, parts = out, key.split("/")
        for p in parts[:-1]:
            node[p] = dict(node.get(p) or {})
            node = node[p]
        node[parts[-1]] = v
    return out


_DAMAGED = ("the checkpoint is damaged: use another one (for --resume, delete this folder "
            "to resume from the epoch before) or start afresh")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    required: Sequence[str] = ()) -> dict[str, Any]:
    """Read a checkpoint folder written by :func:`save_checkpoint`.

    Args:
        path: the checkpoint folder (``RUN/checkpoints/epoch-NNN``).
        device: where to put the tensors.
        required: entries the caller needs, dotted for nested ones (``"optim.sparse"``);
            a missing one is a :class:`CheckpointError`.

    Raises:
        FileNotFoundError: ``path`` is not a checkpoint folder.
        CheckpointError: a damaged ``tensors.safetensors`` or ``state.json``, a missing entry.
    """
    path = Path(path)
    state_file, tensor_file = path / STATE_FILE, path / TENSORS_FILE
    if not state_file.exists():
        hint = ""
        if (path / "checkpoints").is_dir():
            found = list_checkpoints(path)
            hint = (f"; this is a run folder: use one of its checkpoints, e.g. {found[-1]}"
                    if found else "; this run folder has no checkpoint yet")
        raise FileNotFoundError(f"{path}: not a checkpoint (no {STATE_FILE}){hint}")
    if not tensor_file.exists():
        raise CheckpointError(f"{tensor_file}: missing; {_DAMAGED}")
    try:
        tensors = load_file(str(tensor_file), device=str(device))
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, RuntimeError (device)
        if type(e).__name__ != "SafetensorError" and not isinstance(e, OSError):
            raise
        raise CheckpointError(f"{tensor_file}: not a readable safetensors file ({e}); "
                              f"{_DAMAGED}") from e
    try:
        skeleton = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{state_file}: not valid JSON ({e}); {_DAMAGED}") from e
    if not isinstance(skeleton, dict):
        raise CheckpointError(f"{state_file}: expected a JSON object at the top level, got "
                              f"{type(skeleton).__name__}; {_DAMAGED}")
    try:
        state = _join(skeleton, tensors)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{state_file}: refers to tensor {e} that {TENSORS_FILE} does not "
                              f"hold; {_DAMAGED}") from e
    held = state.get("tables_dcp")
    if held is not None:  # sharded tables: checked here, read by the caller (whole or shards)
        folder = path / str(held.get("dir", TABLES_DIR)) if isinstance(held, dict) else path
        if not (folder / ".metadata").is_file():
            raise CheckpointError(f"{folder}: missing or incomplete (no .metadata): this "
                                  "checkpoint's sharded tables (torch.distributed.checkpoint) "
                                  f"are not there; {_DAMAGED}")
        state["tables_dcp"] = {"path": str(folder), "shapes": dcp_shapes(folder)}
    for key in required:
        node: Any = state
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise CheckpointError(f"{state_file}: no entry {key!r} (has "
                                      f"{sorted(state)}); not a checkpoint of this kind of run, "
                                      f"or {_DAMAGED}")
            node = node[part]
    return state


def check_state_shapes(expected: Mapping[str, torch.Tensor], loaded: Any, path: str | Path,
                       what: str = "the model") -> None:
    """Check that ``loaded`` (a checkpoint's ``"model"`` entry) holds exactly the tensors of
    ``expected`` (``model.state_dict()``) with the same shapes, before ``load_state_dict``.

    Raises :class:`CheckpointError` naming the checkpoint's tensor file and the first few
    missing, unexpected or differently shaped tensors.
    """
    where = Path(path)
    if where.is_dir():
        where = where / TENSORS_FILE
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor)
                                                  for v in loaded.values()):
        raise CheckpointError(f"{where}: the model entry is not a set of named tensors; "
                              f"{_DAMAGED}")
    problems = []
    missing = [k for k in expected if k not in loaded]
    extra = [k for k in loaded if k not in expected]
    if missing:
        problems.append(f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    if extra:
        problems.append(f"unexpected {extra[:4]}{' ...' if len(extra) > 4 else ''}")
    for k, v in expected.items():
        if k in loaded and tuple(loaded[k].shape) != tuple(v.shape):
            problems.append(f"{k!r} has shape {tuple(loaded[k].shape)}, {what} needs "
                            f"{tuple(v.shape)}")
            if len(problems) >= 4:
                break
    if problems:
        raise CheckpointError(
            f"{where}: does not fit {what}: {'; '.join(problems)} (a checkpoint of other "
            "data, vocabulary or model settings: use the settings it was trained with, or "
            "another checkpoint)")


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
