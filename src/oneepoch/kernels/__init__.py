"""Native CPU kernels for the training step's hot loops, with a pure-PyTorch fallback.

``native.c`` (plain C, no torch headers) is compiled on first use with the system C compiler
(``$CC``, else ``cc``) into ``$ONEEPOCH_CACHE/native/`` (default ``~/.cache/oneepoch``), once
per source version and CPU, in about a second, and loaded with :mod:`ctypes` through
:mod:`oneepoch.kernels.abi` (which checks the library's ABI and wraps every kernel). With OpenMP it
runs on PyTorch's own thread pool (``torch.set_num_threads``); results do not depend on the
number of threads. Each kernel has a PyTorch twin that gives the same numbers within float
tolerance; the twin is used when

* the tensors are not contiguous float32 on the CPU (e.g. on CUDA),
* ``ONEEPOCH_NATIVE=0`` is set, or
* no C compiler is found (a warning says so once).

    >>> from oneepoch import kernels
    >>> kernels.available() in (True, False)
    True
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from oneepoch.kernels import abi
from oneepoch.kernels.abi import (  # noqa: F401  (the kernels, re-exported)
    MAX_LAYERS,
    MAX_SEQS,
    AdamCatchUp,
    NativeABIError,
    accidental_hits,
    adam_catch_up_all,
    adam_catch_up_batch,
    address,
    catch_up_struct,
    catch_up_with_touch,
    coalesce_rows,
    contrastive_blocks,
    contrastive_scratch,
    ctr_forward,
    ctr_forward_scratch,
    ctr_step_scratch,
    ctr_steps,
    dice_backward,
    dice_forward,
    emb_pool_backward,
    emb_pool_forward,
    int64_array,
    ptr,
    ptr_array,
    rank_rows,
    rowwise_adam,
    softmax_xent_rows,
)

SOURCE = Path(__file__).with_name("native.c")
# -std=c11 (ISO mode) turns GCC's FMA contraction off; -ffp-contract=fast turns it back on
# (a * b + c as one fused multiply-add where the CPU has one: ~30% faster exp, 2-4% a step).
CFLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast", "-std=c11",
          "-fPIC", "-shared"]
# tried in order: the first set this compiler accepts is used (OpenMP and -march are optional)
EXTRA_FLAGS = (["-march=native", "-fopenmp"], ["-march=native"], ["-fopenmp"], [])

_lib: Any = None  # the ctypes library (see abi.py)
_tried = False
_off = 0  # > 0 inside ``disabled()``

def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$ONEEPOCH_CACHE/native`` or ``~/.cache/oneepoch``."""
    root = os.environ.get("ONEEPOCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "oneepoch")
    return Path(root) / "native"


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor()


def _compile(cc: str, out: Path) -> Path:
    """Compile native.c into a fresh temporary file next to ``out``; returns its path."""
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=out.parent)
    os.close(fd)
    try:
        # With OpenMP and -march=native if the compiler has them, else without.
        for extra in EXTRA_FLAGS:
            r = subprocess.run([cc, *CFLAGS, *extra, str(SOURCE), "-o", tmp, "-lm"],
                               capture_output=True, text=True)
            if r.returncode == 0:
                return Path(tmp)
        raise RuntimeError(f"{cc} failed on {SOURCE}:\n{r.stderr.strip()}")
    except BaseException:
        os.unlink(tmp)
        raise


def _build(fresh: bool = False) -> tuple[Path, Path | None]:
    """``(library, None)`` for a library already in the cache, else ``(temporary file, where
    to publish it)``: the caller loads and checks the new library before publishing it (an
    atomic rename, so concurrent builders each publish a whole one). ``fresh``: compile even
    if the cache has one."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    key = hashlib.sha256(SOURCE.read_bytes() + repr((CFLAGS, EXTRA_FLAGS)).encode() + cc.encode()
                         + _cpu_id().encode() + platform.machine().encode()).hexdigest()[:16]
    name = f"oneepoch-native-{key}.so"
    for d in (cache_dir(), Path(tempfile.gettempdir()) / f"oneepoch-native-{os.getuid()}"):
        out = d / name
        if out.exists() and not fresh:
            return out, None
        try:  # the cache may be read-only (e.g. a locked-down HOME): then a private temp dir
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            if os.access(d, os.W_OK):
                break
        except OSError:
            continue
    else:
        raise RuntimeError(f"no writable folder for the compiled kernels (tried {cache_dir()})")
    return _compile(cc, out), out


def _load_checked() -> Any:
    """Load (building if needed) and ABI-check the library. A cached library that does not
    match (a stale or foreign file under the cache's name) is rebuilt, with a warning; a
    freshly compiled one that does not match is a bug in oneepoch: :class:`NativeABIError`."""
    path, publish = _build()
    if publish is None:
        try:
            return abi.bind(str(path), _sgemm_address())
        except abi.NativeABIError as e:
            warnings.warn(f"oneepoch: rebuilding the native kernels: {e}", RuntimeWarning,
                          stacklevel=3)
            path, publish = _build(fresh=True)
    try:
        handle = abi.bind(str(path), _sgemm_address())
        os.replace(path, publish)  # (the loaded library stays mapped)
    except abi.NativeABIError as e:
        raise abi.NativeABIError(f"{e}: a freshly compiled library, so oneepoch's Python "
                                 "mirror (kernels/abi.py) and native.c disagree (a bug; set "
                                 "ONEEPOCH_NATIVE=0 to use the PyTorch path meanwhile)"
                                 ) from None
    finally:
        if path.exists() and path.suffix == ".tmp":
            path.unlink()
    return handle


def lib() -> Any:
    """The loaded kernel library (a checked :class:`ctypes.CDLL`), building it if needed;
    ``None`` if disabled or unavailable (no compiler: a warning says so). A library that does
    not match this package's ABI even after a rebuild raises :class:`NativeABIError`."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("ONEEPOCH_NATIVE", "1") == "0" or sys.platform == "win32":
        return None
    try:
        _lib = _load_checked()
    except abi.NativeABIError:
        raise
    except (OSError, RuntimeError, AttributeError) as e:
        warnings.warn(f"oneepoch: native CPU kernels unavailable, using the PyTorch path "
                      f"(slower): {e}", RuntimeWarning, stacklevel=2)
    return _lib


def available() -> bool:
    """Whether the native kernels are built and enabled."""
    return lib() is not None


_sgemm: int | None | bool = False  # False: not looked up yet


def _sgemm_address() -> int | None:
    """Address of the Fortran ``sgemm_`` PyTorch's CPU library exports (MKL on x86-64 wheels;
    the kernels that run GEMMs themselves call it), or ``None`` if this build has none."""
    global _sgemm
    if _sgemm is False:
        _sgemm = None
        name = {"darwin": "libtorch_cpu.dylib"}.get(sys.platform, "libtorch_cpu.so")
        _sgemm = abi.sgemm_address(str(Path(torch.__file__).parent / "lib" / name))
    return _sgemm  # type: ignore[return-value]


def has_blas() -> bool:
    """Whether the kernels that call PyTorch's own sgemm (the fused CTR step, stage 1's
    blocked softmax) can run here."""
    return available() and _sgemm_address() is not None


_scratch = threading.local()


def scratch(n: int) -> torch.Tensor:
    """A reused float32 buffer of at least ``n`` elements (grow-only: a fresh large buffer
    per step would cost its page faults every time), one per Python thread, so trainings in
    threads of one process do not share it. A caller uses it only until it returns."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _scratch.buf = torch.empty(n, dtype=torch.float32)
    return buf


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Use the PyTorch path inside this block (for comparisons and debugging)."""
    global _off
    _off += 1
    try:
        yield
    finally:
        _off -= 1


def usable(*tensors: torch.Tensor) -> bool:
    """True if the native kernels are available and every tensor is a contiguous CPU float32
    (or integer) tensor, i.e. the native path applies."""
    if _off or lib() is None:
        return False
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous() or t.dtype in (
                torch.float16, torch.bfloat16, torch.float64):
            return False
    return True


def ids32(t: torch.Tensor) -> torch.Tensor:
    """``t`` (IDs, sequence entries or lengths) as the contiguous int32 tensor the native
    kernels read. Values outside int32 become -2^31, which every native lookup and length
    check refuses, so an error names the caller's value instead of a wrapped-around one.

        >>> ids32(torch.tensor([3, 2**40])).tolist()
        [3, -2147483648]
    """
    if t.dtype != torch.int32 and t.numel():
        lo, hi = torch.aminmax(t)
        if lo < -2**31 or hi > 2**31 - 1:
            t = torch.where((t < -2**31) | (t > 2**31 - 1), -2**31, t)
    return t.to(torch.int32).contiguous()


def topk_indices(s: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices of each row's ``k`` largest values, largest first (``torch.topk``'s
    indices; ties in any order), in one native pass per row on the CPU."""
    k = min(k, s.shape[1])
    if not (s.dim() == 2 and s.dtype == torch.float32 and k > 0 and usable(s)):
        return torch.topk(s, k, dim=1).indices
    idx = torch.empty(s.shape[0], k, dtype=torch.int64)
    if abi.topk_rows(s, k, idx):
        raise MemoryError(f"topk_indices: no memory for a {k}-element heap")
    return idx
