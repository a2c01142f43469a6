"""Issue 19, item 12: atomic writers with unique temporaries, a full disk or a refused write is
one clear error naming the file and leaves no partial file; an unusable out_dir is refused
before a run starts."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from oneepoch import io
from oneepoch.io import (
    StorageError,
    atomic_dir,
    atomic_write_json,
    atomic_write_parquet,
    atomic_write_safetensors,
    atomic_write_text,
    check_writable_dir,
)


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_concurrent_writers_of_one_file_do_not_share_a_temporary(tmp_path, monkeypatch):
    """Two writers of the same file at once (two runs, or a run and a report): with a fixed
    ``.NAME.tmp`` the second rename took the first's temporary and the first failed (ENOENT)."""
    target = tmp_path / "metrics.json"
    real = Path.write_text
    nested = []

    def write_then_race(self, text, *a, **k):
        n = real(self, text, *a, **k)
        if not nested:  # another process writes the same file between our write and rename
            nested.append(1)
            atomic_write_text(target, "other")
        return n

    monkeypatch.setattr(Path, "write_text", write_then_race)
    atomic_write_text(target, "mine")
    assert target.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_temp_names_are_unique_and_hidden(tmp_path):
    a, b = io.temp_sibling(tmp_path / "x.parquet"), io.temp_sibling(tmp_path / "x.parquet")
    assert a != b and a.name.startswith(".x.parquet.") and a.name.endswith(".tmp")
    assert str(os.getpid()) in a.name


@pytest.mark.parametrize("writer", ["text", "json", "bytes"])
def test_disk_full_is_a_clear_error_and_leaves_the_old_file(tmp_path, monkeypatch, writer):
    target = tmp_path / "summary.json"
    target.write_text("old")
    real_open = Path.open

    def partial_then_full(self, mode="r", *a, **k):
        if "w" not in mode:
            return real_open(self, mode, *a, **k)
        f = real_open(self, mode, *a, **k)
        f.write("par" if "b" not in mode else b"par")
        f.close()
        _enospc()

    monkeypatch.setattr(Path, "open", partial_then_full)
    with pytest.raises(StorageError, match=r"summary\.json: cannot write: no space left") as ei:
        if writer == "text":
            atomic_write_text(target, "new")
        elif writer == "json":
            atomic_write_json(target, {"a": 1})
        else:
            io.atomic_write_bytes(target, b"new")
    assert ei.value.errno == errno.ENOSPC
    assert isinstance(ei.value, OSError) and isinstance(ei.value, ValueError)
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_parquet_disk_full_without_errno(tmp_path, monkeypatch):
    """pyarrow reports a full disk as an OSError without errno: still named and cleaned up."""
    real = pq.write_table

    def partial(table, where, **k):
        real(table, where, **k)
        raise OSError("IOError: No space left on device. Detail: [errno 28]")

    monkeypatch.setattr(pq, "write_table", partial)
    with pytest.raises(StorageError, match=r"m\.parquet: cannot write: no space left"):
        atomic_write_parquet(tmp_path / "m.parquet", pa.table({"a": [1, 2]}))
    assert list(tmp_path.iterdir()) == []


def test_safetensors_disk_full_and_permissions(tmp_path, monkeypatch):
    old = os.umask(0o022)
    try:
        p = atomic_write_safetensors(tmp_path / "w.safetensors", {"weight": torch.zeros(2, 3)})
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644  # safetensors alone writes 0600
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    with pytest.raises(StorageError, match=r"v\.safetensors: cannot write: no space left"):
        atomic_write_safetensors(tmp_path / "v.safetensors", {"weight": torch.zeros(2)})
    assert sorted(x.name for x in tmp_path.iterdir()) == ["w.safetensors"]


def test_checkpoint_save_on_a_full_disk_leaves_nothing(tmp_path, monkeypatch):
    from oneepoch.training.checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint(tmp_path / "epoch-001", {"w": torch.ones(3)})
    monkeypatch.setattr("safetensors.torch.save_file", lambda *a, **k: _enospc())
    with pytest.raises(StorageError, match="epoch-002.*no space left"):
        save_checkpoint(tmp_path / "epoch-002", {"w": torch.ones(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-001"]
    assert torch.equal(load_checkpoint(tmp_path / "epoch-001")["w"], torch.ones(3))


def test_atomic_dir_full_disk_and_unrelated_errors(tmp_path):
    with pytest.raises(StorageError, match=r"out: cannot write: no space left"):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a").write_text("x")
            _enospc()
    assert list(tmp_path.iterdir()) == []
    # an input file that cannot be read is not a storage failure of the output
    with pytest.raises(FileNotFoundError):
        with atomic_dir(tmp_path / "out"):
            (tmp_path.parent / "no-such-input").read_text()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_under_a_regular_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError, match=r"f/run/ck: cannot create the folder"):
        with atomic_dir(tmp_path / "f" / "run" / "ck"):
            pass


def test_check_writable_dir(tmp_path, monkeypatch):
    # fine, and creates nothing: a missing folder below an existing one
    assert check_writable_dir(tmp_path / "runs" / "a") == tmp_path / "runs" / "a"
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match=r"out_dir=.*file/runs: a part of the path .* is a "
                                           r"file, not a folder"):
        check_writable_dir(tmp_path / "file" / "runs")
    with pytest.raises(StorageError, match=r"^out=.*the output folder .* is a file"):
        check_writable_dir(tmp_path / "file", setting="out")

    def refused(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))

    monkeypatch.setattr(io.tempfile, "mkstemp", refused)
    with pytest.raises(StorageError, match=r"out_dir is not writable: permission denied"):
        check_writable_dir(tmp_path / "runs")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    free = io.shutil.disk_usage(tmp_path).free
    check_writable_dir(tmp_path / "runs", min_free_bytes=1)
    with pytest.raises(StorageError, match=r"out_dir=.*runs: only \d+ MiB free on its device, the "
                                           r"run needs about \d+ MiB"):
        check_writable_dir(tmp_path / "runs", min_free_bytes=free + 2**40)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_check_writable_dir_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    with pytest.raises(StorageError, match="not writable"):
        check_writable_dir(ro / "runs")


def test_atomic_dir_replaces_a_folder_and_refuses_a_file(tmp_path):
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "b").write_text("2")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing left beside it
    (tmp_path / "f").write_text("keep")
    with pytest.raises(StorageError, match=r"f: is a file, not a folder"):
        with atomic_dir(tmp_path / "f") as tmp:
            (tmp / "a").write_text("1")
    assert (tmp_path / "f").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "out"]
