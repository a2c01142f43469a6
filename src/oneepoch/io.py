"""Atomic writes: a killed run never leaves a half-written file or folder behind.

    >>> with atomic_dir("runs/x/embeddings") as tmp:      # doctest: +SKIP
    ...     (tmp / "meta.json").write_text("{}")
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; when the block succeeds it replaces ``path`` (an old
    ``path`` is removed), otherwise it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should not be
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars."""
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """:func:`atomic_write_text` of ``obj`` as indented JSON (numpy scalars allowed)."""
    return atomic_write_text(path, json.dumps(obj, indent=1, default=json_default))


def check_writable_dir(path: str | Path, setting: str = "out_dir") -> None:
    """Refuse a run folder that cannot be created or written, naming the setting."""
    p = Path(path)
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"{setting}: {path} lies under {probe}, which is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"{setting}: {probe} is not writable (for {path})")
