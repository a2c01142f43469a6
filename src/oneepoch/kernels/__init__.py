"""Native CPU kernels for the training step's hot loops, with a pure-PyTorch fallback.

``native.c`` (plain C, no torch headers) is compiled on first use with the system C compiler
(``$CC``, else ``cc``) into ``$ONEEPOCH_CACHE/native/`` (default ``~/.cache/oneepoch``), once
per source version and CPU, in about a second, and loaded with :mod:`ctypes`. With OpenMP it
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
import ctypes
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

import torch

SOURCE = Path(__file__).with_name("native.c")
# -std=c11 (ISO mode) turns GCC's FMA contraction off; -ffp-contract=fast turns it back on
# (a * b + c as one fused multiply-add where the CPU has one: ~30% faster exp, 2-4% a step).
CFLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast", "-std=c11",
          "-fPIC", "-shared"]
# tried in order: the first set this compiler accepts is used (OpenMP and -march are optional)
EXTRA_FLAGS = (["-march=native", "-fopenmp"], ["-march=native"], ["-fopenmp"], [])

_lib: ctypes.CDLL | None = None
_tried = False
_off = 0  # > 0 inside ``disabled()``

_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float
_SIGNATURES = {
    "dice_forward": (None, [_P, _P, _I, _I, ctypes.c_int, _F, _P, _P, _P, _P, _P]),
    "dice_backward": (None, [_P, _P, _P, _P, _P, _P, _I, _I, ctypes.c_int, _P, _P, _P]),
    "emb_pool_forward": (_I, [_P, _I, _I, _P, _P, _I, _P, _P, _P, _P, _I, _I, _P, _P, _P, _P]),
    "emb_pool_backward": (None, [_P, _I, _I, _I, _P, _P, _I, _I, _P]),
    "rowwise_adam": (_F, [_P, _P, _P, _P, _P, _I, _I, _F, _P, _F, _F, _F, _F, _F, _F]),
    "softmax_xent_rows": (ctypes.c_double, [_P, _I, _I, _I, ctypes.c_int]),
    "rank_rows": (None, [_P, _I, _I, _I, _P, _P, _P, _F, _P, _P]),
    "topk_rows": (ctypes.c_int, [_P, _I, _I, _I, _P]),
    "set_sgemm": (None, [_P]),
    "contrastive_scratch": (_I, [_I, _I, _I, _I]),
    "contrastive_blocks": (ctypes.c_double, [_P, _P, _I, _I, _I, _F, _P, _P, _P, _P, ctypes.c_int,
                                             _I, ctypes.c_int, _P, _P, _P, _I]),
    "accidental_hits": (_I, [_P, _I, _P, _I, ctypes.c_int, _P, _P, _I]),
    "coalesce_rows": (_I, [_P, _P, _I, _I, _P, _P]),
}


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


def _build() -> Path:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    key = hashlib.sha256(SOURCE.read_bytes() + repr((CFLAGS, EXTRA_FLAGS)).encode() + cc.encode()
                         + _cpu_id().encode() + platform.machine().encode()).hexdigest()[:16]
    name = f"oneepoch-native-{key}.so"
    for d in (cache_dir(), Path(tempfile.gettempdir()) / f"oneepoch-native-{os.getuid()}"):
        out = d / name
        if out.exists():
            return out
        try:  # the cache may be read-only (e.g. a locked-down HOME): then a private temp dir
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            if os.access(d, os.W_OK):
                break
        except OSError:
            continue
    else:
        raise RuntimeError(f"no writable folder for the compiled kernels (tried {cache_dir()})")
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=out.parent)
    os.close(fd)
    try:
        # With OpenMP and -march=native if the compiler has them, else without.
        for extra in EXTRA_FLAGS:
            r = subprocess.run([cc, *CFLAGS, *extra, str(SOURCE), "-o", tmp, "-lm"],
                               capture_output=True, text=True)
            if r.returncode == 0:
                break
        else:
            raise RuntimeError(f"{cc} failed on {SOURCE}:\n{r.stderr.strip()}")
        os.replace(tmp, out)  # atomic: concurrent builders each publish a whole library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def lib() -> ctypes.CDLL | None:
    """The loaded kernel library, building it if needed; ``None`` if disabled or unavailable."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("ONEEPOCH_NATIVE", "1") == "0" or sys.platform == "win32":
        return None
    try:
        handle = ctypes.CDLL(str(_build()))
        for name, (res, args) in _SIGNATURES.items():
            fn = getattr(handle, name)
            fn.restype, fn.argtypes = res, args
        if _sgemm_address() is not None:
            handle.set_sgemm(_sgemm_address())
        _lib = handle
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
        try:
            handle = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / name))
            _sgemm = ctypes.cast(handle.sgemm_, ctypes.c_void_p).value
        except (OSError, AttributeError):
            _sgemm = None
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


def ptr(t: torch.Tensor | None) -> int | None:
    """The data pointer of a tensor (``None`` for a missing optional array)."""
    return None if t is None else t.data_ptr()


def ptr_array(ts: list[torch.Tensor]) -> ctypes.Array:
    """A C array of data pointers (for lists of per-field arrays)."""
    return (ctypes.c_void_p * max(1, len(ts)))(*[t.data_ptr() for t in ts])


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


def int64_array(values: list[int]) -> ctypes.Array:
    """A C array of int64 values."""
    return (ctypes.c_int64 * max(1, len(values)))(*values)


def topk_indices(s: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices of each row's ``k`` largest values, largest first (``torch.topk``'s
    indices; ties in any order), in one native pass per row on the CPU."""
    k = min(k, s.shape[1])
    if not (s.dim() == 2 and s.dtype == torch.float32 and k > 0 and usable(s)):
        return torch.topk(s, k, dim=1).indices
    idx = torch.empty(s.shape[0], k, dtype=torch.int64)
    if _lib.topk_rows(s.data_ptr(), s.shape[0], s.shape[1], k,  # type: ignore[union-attr]
                      idx.data_ptr()):
        raise MemoryError(f"topk_indices: no memory for a {k}-element heap")
    return idx
