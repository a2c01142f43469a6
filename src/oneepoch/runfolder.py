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
import tempfile
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
    run_dir = Path(run_dir)
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".metrics.parquet.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, run_dir / "metrics.parquet")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
