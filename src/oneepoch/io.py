"""Atomic writes: a killed run never leaves a half-written file or folder behind.

    >>> with atomic_dir("runs/x/embeddings") as tmp:      # doctest: +SKIP
    ...     (tmp / "meta.json").write_text("{}")
    >>> atomic_write_json("runs/x/summary.json", {"auc": 0.71})    # doctest: +SKIP

Every writer goes through a temporary sibling with a unique name (``.NAME.<pid>.<random>.tmp``,
so two processes writing the same file never trip over each other's temporary) and a rename.
When the write fails the temporary is removed, so a full disk never leaves a partial file, and
an ``OSError`` from the storage (no space left, permission denied, read-only file system, a
path component that is a file) becomes a :class:`StorageError` naming the file and what to do.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


class StorageError(OSError, ValueError):
    """A file or folder could not be written (or a folder cannot be used for output); the
    message names the path, the cause and what to do. An ``OSError`` (so ``except OSError``
    still catches it) and a ``ValueError`` (so the command line reports it in one line)."""


# errno values that mean "this place cannot take the write", as opposed to a bug
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                   errno.ENOTDIR, errno.EFBIG}
_STORAGE_WORDS = ("No space left", "Disk quota", "Permission denied", "Read-only file system",
                  "Not a directory", "StorageFull", "PermissionDenied", "File too large")


def _advice(err: int | None, text: str) -> str:
    if err in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "StorageFull" in text \
            or "quota" in text:
        return "no space left on the device: free some space or write somewhere else"
    if err in (errno.EACCES, errno.EPERM) or "Permission denied" in text \
            or "PermissionDenied" in text:
        return "permission denied: choose a folder you can write to"
    if err == errno.EROFS or "Read-only" in text:
        return "read-only file system: choose a writable folder"
    if err == errno.ENOTDIR or "Not a directory" in text:
        return "a part of the path is a file, not a folder: choose another path"
    return text


def storage_error(e: BaseException, path: str | Path, doing: str = "cannot write") -> StorageError:
    """A :class:`StorageError` for the failure ``e`` while writing ``path``."""
    err = getattr(e, "errno", None)
    out = StorageError(f"{path}: {doing}: {_advice(err, str(e))}")
    out.errno = err
    return out


def _renamed(e: StorageError, tmp: Path, path: Path) -> StorageError:
    out = StorageError(str(e).replace(str(tmp), str(path)))
    out.errno = e.errno
    return out


def _is_storage_failure(e: BaseException, near: Path) -> bool:
    """Whether ``e``, raised while writing into the folder ``near``, is the storage refusing
    the write (rather than, say, an input file that cannot be read)."""
    if isinstance(e, StorageError):
        return False  # already explained
    if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
        return e.filename is None or Path(e.filename).absolute().is_relative_to(near.absolute())
    # pyarrow and safetensors report I/O errors without an errno
    return type(e).__name__ in ("OSError", "ArrowIOError", "SafetensorError") and any(
        w in str(e) for w in _STORAGE_WORDS)


def temp_sibling(path: str | Path) -> Path:
    """A unique temporary name beside ``path``: ``.NAME.<pid>.<random>.tmp``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def follow_umask(path: str | Path, mode: int = 0o666) -> None:
    """Give ``path`` the permissions a plain ``open()`` would (``mode`` less the umask); some
    writers (safetensors, ``tempfile``) create files readable by their owner only."""
    os.chmod(path, mode & ~_umask())


@contextmanager
def _storage_errors(tmp: Path, path: Path) -> Iterator[None]:
    """A storage failure inside the block (disk full, permission denied, ...) becomes a
    :class:`StorageError` naming the final ``path``, not the temporary ``tmp``."""
    try:
        yield
    except StorageError as e:  # from a nested writer
        raise _renamed(e, tmp, path) from e
    except Exception as e:
        if _is_storage_failure(e, path.parent):
            raise storage_error(e, path) from e
        raise


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a unique temporary sibling of ``path`` to write; when the block succeeds it is
    renamed to ``path``, otherwise removed. A storage failure (disk full, permission denied,
    ...) becomes a :class:`StorageError` naming ``path``.

        >>> with atomic_path("out/table.parquet") as tmp:   # doctest: +SKIP
        ...     pq.write_table(table, tmp)
    """
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        with _storage_errors(tmp, path):
            yield tmp
            os.replace(tmp, path)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def atomic_write_with(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` to write a temporary sibling, then rename it to ``path``
    (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling and a rename."""
    return atomic_write_with(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling and a rename."""
    return atomic_write_with(path, lambda tmp: tmp.write_text(text))


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars."""
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_write_json(path: str | Path, obj: Any,
                      default: Callable[[Any], Any] = json_default) -> Path:
    """:func:`atomic_write_text` of ``obj`` as indented JSON (numpy scalars allowed)."""
    return atomic_write_text(path, json.dumps(obj, indent=1, default=default))


def atomic_write_parquet(path: str | Path, table: Any, **kwargs: Any) -> Path:
    """``pyarrow.parquet.write_table(table, ...)`` to ``path`` atomically."""
    import pyarrow.parquet as pq

    return atomic_write_with(path, lambda tmp: pq.write_table(table, tmp, **kwargs))


def write_safetensors(path: str | Path, tensors: dict[str, Any],
                      metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` with the umask's permissions (it writes 0600) and a
    :class:`StorageError` naming ``path`` when the storage fails."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as e:
        if _is_storage_failure(e, Path(path).parent) or (
                type(e).__name__ == "SafetensorError" and "I/O" in str(e)):
            raise storage_error(e, path) from e
        raise
    follow_umask(path)
    return Path(path)


def atomic_write_safetensors(path: str | Path, tensors: dict[str, Any],
                             metadata: dict[str, str] | None = None) -> Path:
    """:func:`write_safetensors` through a temporary sibling and a rename."""
    return atomic_write_with(path, lambda tmp: write_safetensors(tmp, tensors, metadata))


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; when the block succeeds it replaces ``path`` (an old
    ``path`` is removed), otherwise it is deleted. A storage failure becomes a
    :class:`StorageError` naming ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should not be
    except OSError as e:
        raise storage_error(e, path, "cannot create the folder") from e
    try:
        with _storage_errors(tmp, path):
            yield tmp
            _replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(tmp: Path, path: Path) -> None:
    """Put folder ``tmp`` at ``path``; an old folder there is moved aside first, then removed."""
    old = None
    if path.is_symlink() or path.exists():
        if not path.is_dir():
            raise StorageError(f"{path}: is a file, not a folder: remove it or choose "
                               "another path")
        # move the old folder aside first: a kill between the two renames leaves it
        # recoverable (hidden beside the new one) rather than deleted
        old = path.with_name(f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_writable_dir(path: str | Path, setting: str = "out_dir",
                       min_free_bytes: int = 0) -> Path:
    """Check before a run starts that ``path`` can be a (possibly not yet existing) output
    folder: no component is a regular file, its nearest existing ancestor takes a file, and
    (when ``min_free_bytes`` is given, e.g. an estimate of the checkpoints' size) the device
    holding it has that much free space.

    Creates nothing that stays behind (a probe file is written and removed in the nearest
    existing folder). Raises :class:`StorageError` naming ``setting`` and the path.
    """
    path = Path(path)
    where = f"{setting}={path}"
    probe_dir = path
    while not probe_dir.exists():
        if probe_dir.is_symlink():  # a dangling link
            raise StorageError(f"{where}: {probe_dir} is a broken symbolic link")
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        what = "the output folder" if probe_dir == path else "a part of the path"
        raise StorageError(f"{where}: {what} ({probe_dir}) is a file, not a folder: "
                           f"choose another {setting}")
    try:
        fd, name = tempfile.mkstemp(dir=probe_dir, prefix=".oneepoch-write-probe.")
    except OSError as e:
        raise storage_error(e, probe_dir, f"{setting} is not writable") from e
    os.close(fd)
    os.unlink(name)
    if min_free_bytes > 0:
        free = shutil.disk_usage(probe_dir).free
        if free < min_free_bytes:
            raise StorageError(f"{where}: only {free / 2**20:.0f} MiB free on its device, the run "
                               f"needs about {min_free_bytes / 2**20:.0f} MiB: free some space or "
                               f"choose another {setting}")
    return path
