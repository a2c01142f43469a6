"""A run folder on disk: reading it (metrics, summary) needs neither torch nor the kernels,
and one process at a time may write it (an exclusive lock naming the holder's PID).

    >>> rows = read_metrics("runs/demo/dnn")                 # doctest: +SKIP
    >>> with RunLock("runs/demo/dnn"):                       # doctest: +SKIP
    ...     write_metrics("runs/demo/dnn", rows)

Layout: ``config.yaml`` (the settings), ``metrics.parquet`` (one row per evaluation),
``summary.json`` (verdict, timing, step path, ``finished``), ``checkpoints/epoch-NNN/``,
``report.html`` and the figures, ``.lock`` (held while a process writes the folder).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

LOCK_NAME = ".lock"


class RunFolderBusy(RuntimeError):
    """Another process is writing this run folder."""


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The evaluation rows of a run (``[]`` when it has none yet)."""
    p = Path(run_dir) / "metrics.parquet"
    return pq.read_table(p).to_pylist() if p.exists() else []


def write_metrics(run_dir: str | Path, rows: list[dict[str, Any]]) -> None:
    """Replace ``metrics.parquet`` atomically (a unique temporary sibling, then a rename)."""
    from oneepoch.io import atomic_write_parquet

    atomic_write_parquet(Path(run_dir) / "metrics.parquet", pa.Table.from_pylist(rows))


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """``summary.json`` of a run (``{}`` when missing or unreadable)."""
    try:
        return json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def is_finished(run_dir: str | Path) -> bool:
    """True when the run's ``summary.json`` says it finished."""
    return bool(read_summary(run_dir).get("finished"))


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


class RunLock:
    """An exclusive lock on a run folder (``fcntl.flock`` on ``RUN/.lock``; released when the
    process ends, however it ends). A second writer is refused with the holder's PID."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunFolderBusy(f"{self.run_dir}: another run (PID {holder}) is writing this "
                                "folder; wait for it, or use another name= / out_dir=") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class RunConflict(ValueError):
    """A finished run in the folder was trained with other settings."""


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(run_dir: str | Path, config: dict[str, Any],
                volatile: tuple[str, ...] = ("threads", "progress", "tracking",
                                           "tracking_uri"),
                defaults: dict[str, Any] | None = None) -> list[str] | None:
    """Dotted keys whose value in ``RUN/config.yaml`` differs from ``config`` (``None`` when
    the folder has no config); ``volatile`` keys do not change results and are ignored. A key
    the old ``config.yaml`` lacks (a setting added by a later version) counts as equal when
    ``config`` holds its default there (``defaults``: the settings class's defaults)."""
    import yaml

    p = Path(run_dir) / "config.yaml"
    if not p.exists():
        return None
    try:
        old = _flat(yaml.safe_load(p.read_text()) or {})
    except (yaml.YAMLError, AttributeError):
        return ["config.yaml (unreadable)"]
    new = _flat(yaml.safe_load(yaml.safe_dump(config)))
    base = _flat(yaml.safe_load(yaml.safe_dump(defaults))) if defaults else {}
    return sorted(k for k in set(old) | set(new)
                  if k not in volatile and old.get(k, base.get(k)) != new.get(k))


def reuse(run_dir: str | Path, config: dict[str, Any],
          defaults: dict[str, Any] | None = None) -> str:
    """What a recipe does with a run folder it wants to train with ``config``: ``"skip"`` a
    finished run with these settings, ``"resume"`` an unfinished one with these settings and
    an epoch checkpoint, ``"fresh"`` otherwise. A *finished* run with other settings is never
    overwritten silently: :class:`RunConflict` names the settings that differ. Settings a
    later version added count as equal at their ``defaults``, so runs survive an upgrade.

    >>> reuse("runs/never-made", {"epochs": 3})
    'fresh'
    """
    diff = config_diff(run_dir, config, defaults=defaults)
    if is_finished(run_dir):
        if diff:
            raise RunConflict(f"{run_dir}: finished with other settings ({', '.join(diff)} "
                              "differ); use another output folder or delete it")
        return "skip"
    if diff == [] and any((Path(run_dir) / "checkpoints").glob("epoch-*/state.json")):
        return "resume"
    return "fresh"
