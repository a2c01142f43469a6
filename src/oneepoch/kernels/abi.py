"""The one place oneepoch talks to ``native.c`` through :mod:`ctypes`.

Everything the C side and the Python side must agree on lives here: every exported
function's signature, the mirror of the ``CtrStep`` struct (passed by pointer to the fused
step), the limits ``MAX_LAYERS`` / ``MAX_SEQS``, and the ABI version. When the library is
loaded, :func:`bind` asks it (``oneepoch_abi``) for its version, ``sizeof(CtrStep)``, the
limits and every ``CtrStep`` field's offset, and refuses a library that disagrees with this
file (:class:`NativeABIError`): a library built from another ``native.c`` would otherwise be
read out of step, silently. The rest of the package calls the Python functions below
(tensors in, numbers out); no other module imports :mod:`ctypes`.

Bump :data:`ABI_VERSION` here and ``ONEEPOCH_ABI`` in native.c together whenever a signature,
the struct or a limit changes.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import torch

ABI_VERSION = 3
MAX_LAYERS = 64  # linear layers of the fused step's MLP, at most
MAX_SEQS = 64  # sequence fields of the fused step, at most

_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float
_D = ctypes.c_double
_C = ctypes.c_int


class NativeABIError(RuntimeError):
    """The compiled library does not match this Python package's mirror of its ABI."""


class CtrStep(ctypes.Structure):
    """Mirror of native.c's ``CtrStep`` (field for field; checked at load)."""

    _fields_ = [
        ("ids", _P), ("sel", _P), ("seqs", _P), ("L", _P), ("lens", _P), ("label", _P),
        ("B", _I), ("S", _I), ("K", _I),
        ("W", _P), ("Wm", _P), ("Wv", _P), ("off", _P), ("lim", _P), ("slot", _P), ("R", _I),
        ("D", _I),
        ("emb_lr", _F), ("emb_bc1", _F), ("emb_bc2", _F), ("emb_row_lr", _P),
        ("emb_last", _P), ("emb_t", _I), ("emb_catch", _P),
        ("n_layers", _I), ("width", _P),
        ("p", _P), ("g", _P), ("m", _P), ("v", _P), ("step", _P),
        ("run_mean", _P), ("run_var", _P), ("dice_eps", _F), ("dice_momentum", _F),
        ("lr", _F), ("beta1", _F), ("beta2", _F), ("eps", _F), ("wd", _F),
        ("scratch", _P), ("cap", _I), ("threads", _I),
        ("status", _I), ("unique_rows", _I), ("prof", _P),
    ]


class AdamCatchUp(ctypes.Structure):
    """Mirror of native.c's ``AdamCatchUp`` (dense Adam's catch-up tables; checked at load)."""

    _fields_ = [
        ("beta1", _D), ("beta2", _D), ("eps", _D), ("tol", _D), ("T", _I),
        ("H0", _P), ("H1", _P), ("H2", _P), ("s", _P), ("P", _I), ("pw", _P),
        ("log_q", _D * 5), ("alpha", _D), ("moves", _I), ("touch", _P),
        ("synced", _P),
    ]


_STEP_P = ctypes.POINTER(CtrStep)
SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "oneepoch_abi": (_I, [_P, _I]),
    "dice_forward": (None, [_P, _P, _I, _I, _C, _F, _P, _P, _P, _P, _P]),
    "dice_backward": (None, [_P, _P, _P, _P, _P, _P, _I, _I, _C, _P, _P, _P]),
    "emb_pool_forward": (_I, [_P, _I, _I, _P, _P, _I, _P, _P, _P, _P, _I, _I, _P, _P, _P, _P]),
    "emb_pool_backward": (None, [_P, _I, _I, _I, _P, _P, _I, _I, _P]),
    "rowwise_adam": (_F, [_P, _P, _P, _P, _P, _I, _I, _F, _P, _F, _F, _F, _F, _F, _F, _P, _I,
                          _P]),
    "adam_catch_up_all": (_I, [_P, _P, _P, _P, _I, _I, _I, _F, _P, _P]),
    "adam_catch_up_batch": (_I, [_P, _I, _I, _P, _P, _I, _P, _P, _P, _P, _P, _P, _P, _I, _I,
                                 _I, _F, _P, _P]),
    "softmax_xent_rows": (_D, [_P, _I, _I, _I, _C]),
    "rank_rows": (None, [_P, _I, _I, _I, _P, _P, _P, _F, _P, _P]),
    "topk_rows": (_C, [_P, _I, _I, _I, _P]),
    "set_sgemm": (None, [_P]),
    "contrastive_scratch": (_I, [_I, _I, _I, _I]),
    "contrastive_blocks": (_D, [_P, _P, _I, _I, _I, _F, _P, _P, _P, _P, _C, _I, _C, _P, _P,
                                _P, _I]),
    "accidental_hits": (_I, [_P, _I, _P, _I, _C, _P, _P, _I]),
    "coalesce_rows": (_I, [_P, _P, _I, _I, _P, _P]),
    "ctr_step_scratch": (_I, [_I, _I, _P, _I, _I, _I]),
    "ctr_steps": (_I, [_STEP_P, _P, _I, _I, _D, _D, _I, _P]),
    "ctr_forward_scratch": (_I, [_I, _P, _I, _I, _I]),
    "ctr_forward": (None, [_STEP_P, _P]),
}

_h: ctypes.CDLL | None = None  # the bound library (set by bind)


def expected_abi() -> dict[str, Any]:
    """What this package expects the library to report (see :func:`library_abi`)."""
    return {"version": ABI_VERSION, "sizeof(CtrStep)": ctypes.sizeof(CtrStep),
            "MAX_LAYERS": MAX_LAYERS, "MAX_SEQS": MAX_SEQS,
            "sizeof(AdamCatchUp)": ctypes.sizeof(AdamCatchUp),
            "CtrStep offsets": [getattr(CtrStep, name).offset for name, _ in CtrStep._fields_],
            "AdamCatchUp offsets": [getattr(AdamCatchUp, name).offset
                                    for name, _ in AdamCatchUp._fields_]}


def library_abi(handle: ctypes.CDLL) -> dict[str, Any]:
    """What a loaded library reports about itself (``oneepoch_abi`` in native.c)."""
    fn = handle.oneepoch_abi
    fn.restype, fn.argtypes = SIGNATURES["oneepoch_abi"]
    n = fn(None, 0)
    out = (ctypes.c_int64 * n)()
    fn(out, n)
    v = list(out)
    f, g = v[5], v[6]
    return {"version": v[0], "sizeof(CtrStep)": v[1], "MAX_LAYERS": v[2], "MAX_SEQS": v[3],
            "sizeof(AdamCatchUp)": v[4], "CtrStep offsets": v[7:7 + f],
            "AdamCatchUp offsets": v[7 + f:7 + f + g]}


def check(handle: ctypes.CDLL, path: str) -> None:
    """Raise :class:`NativeABIError` naming every disagreement between the library at
    ``path`` and :func:`expected_abi`."""
    try:
        got = library_abi(handle)
    except AttributeError:
        raise NativeABIError(f"{path} exports no oneepoch_abi (built from an older native.c)"
                             ) from None
    want = expected_abi()
    bad = [f"{k}: library {got[k]}, Python {want[k]}" for k in want if got[k] != want[k]]
    if bad:
        raise NativeABIError(f"native kernels at {path} do not match this oneepoch's ABI ("
                             + "; ".join(bad) + ")")


def bind(path: str, sgemm: int | None) -> ctypes.CDLL:
    """Load the library at ``path``, check its ABI (:class:`NativeABIError` if it differs),
    declare every signature, hand it PyTorch's ``sgemm_`` (if any) and make it the library the
    functions below call."""
    global _h
    handle = ctypes.CDLL(path)
    check(handle, path)
    for name, (res, args) in SIGNATURES.items():
        fn = getattr(handle, name)
        fn.restype, fn.argtypes = res, args
    if sgemm is not None:
        handle.set_sgemm(sgemm)
    _h = handle
    return handle


def sgemm_address(torch_lib: str) -> int | None:
    """Address of ``sgemm_`` in PyTorch's CPU library at this path, or ``None``."""
    try:
        return ctypes.cast(ctypes.CDLL(torch_lib).sgemm_, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


# ------------------------------------------------------------------------------------------
# pointers


def ptr(t: torch.Tensor | None) -> int | None:
    """The data pointer of a tensor (``None`` for a missing optional array)."""
    return None if t is None else t.data_ptr()


def ptr_array(ts: list[torch.Tensor]) -> ctypes.Array:
    """A C array of data pointers (for lists of per-field arrays)."""
    return (ctypes.c_void_p * max(1, len(ts)))(*[t.data_ptr() for t in ts])


def int64_array(values: list[int]) -> ctypes.Array:
    """A C array of int64 values."""
    return (ctypes.c_int64 * max(1, len(values)))(*values)


def address(a: ctypes.Array | ctypes.Structure | np.ndarray | None) -> int | None:
    """The address of a C array or struct made here, or of a numpy array's data (``None``
    stays)."""
    if a is None:
        return None
    if isinstance(a, np.ndarray):
        return a.ctypes.data
    return ctypes.addressof(a)


def _lib() -> ctypes.CDLL:
    if _h is None:
        raise RuntimeError("oneepoch: native kernels not loaded (check kernels.usable first)")
    return _h


# ------------------------------------------------------------------------------------------
# the kernels (callers check kernels.usable first; arrays contiguous, as native.c says)


def dice_forward(x: torch.Tensor, alpha: torch.Tensor, stats: bool, eps: float,
                 mean: torch.Tensor, var: torch.Tensor, rstd: torch.Tensor, p: torch.Tensor,
                 y: torch.Tensor) -> None:
    """Dice forward of x [B, H] (batch statistics into mean / var when ``stats``)."""
    _lib().dice_forward(x.data_ptr(), alpha.data_ptr(), x.shape[0], x.shape[1], int(stats),
                        eps, mean.data_ptr(), var.data_ptr(), rstd.data_ptr(), p.data_ptr(),
                        y.data_ptr())


def dice_backward(x: torch.Tensor, p: torch.Tensor, dy: torch.Tensor, alpha: torch.Tensor,
                  mean: torch.Tensor, rstd: torch.Tensor, stats: bool, dx: torch.Tensor,
                  dalpha: torch.Tensor, acc: torch.Tensor) -> None:
    """Dice backward into dx and dalpha (acc: 2H floats of scratch)."""
    _lib().dice_backward(x.data_ptr(), p.data_ptr(), dy.data_ptr(), alpha.data_ptr(),
                         mean.data_ptr(), rstd.data_ptr(), x.shape[0], x.shape[1], int(stats),
                         dx.data_ptr(), dalpha.data_ptr(), acc.data_ptr())


def emb_pool_forward(ids: torch.Tensor, offsets: torch.Tensor, rows_per_field: torch.Tensor,
                     seqs: list[torch.Tensor], lens: list[torch.Tensor], W: torch.Tensor,
                     out: torch.Tensor, slot: torch.Tensor | None, rows: torch.Tensor | None,
                     inv: torch.Tensor | None) -> int:
    """Pools ids [B, S] (int32) and the sequences into out [B, S + K, D]; with ``slot`` also
    de-duplicates the rows (into rows / inv). Returns the distinct rows, or < 0: a lookup
    outside its field."""
    return _lib().emb_pool_forward(
        ids.data_ptr(), ids.shape[0], ids.shape[1], offsets.data_ptr(),
        rows_per_field.data_ptr(), len(seqs), ptr_array(seqs),
        int64_array([q.shape[1] for q in seqs]), ptr_array(lens), W.data_ptr(), W.shape[0],
        W.shape[1], out.data_ptr(), ptr(slot), ptr(rows), ptr(inv))


def emb_pool_backward(g: torch.Tensor, n_single: int, lens: list[torch.Tensor],
                      inv: torch.Tensor, grad: torch.Tensor) -> None:
    """Scatters the pooled gradient g [B, S + K, D] to the distinct rows' grad [U, D]."""
    _lib().emb_pool_backward(g.data_ptr(), g.shape[0], n_single, len(lens), ptr_array(lens),
                             inv.data_ptr(), grad.shape[0], grad.shape[1], grad.data_ptr())


def rowwise_adam(W: torch.Tensor, m: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                 grad: torch.Tensor, lr: float, row_lr: torch.Tensor | None, beta1: float,
                 beta2: float, eps: float, bc1: float, bc2: float, wd: float,
                 last: torch.Tensor | None = None, t: int = 0,
                 catch_up: AdamCatchUp | None = None) -> float:
    """Adam on these distinct rows of W at step ``t``; returns the largest |update|. Lazy
    without ``last``; dense with ``last`` (int64 [R], each row's last step) and the catch-up
    tables: each row first gets the zero-gradient steps it missed."""
    return _lib().rowwise_adam(W.data_ptr(), m.data_ptr(), v.data_ptr(), rows.data_ptr(),
                               grad.data_ptr(), rows.shape[0], W.shape[1], lr, ptr(row_lr),
                               beta1, beta2, eps, bc1, bc2, wd, ptr(last), t,
                               None if catch_up is None else ctypes.byref(catch_up))


def adam_catch_up_batch(ids: torch.Tensor, offsets: torch.Tensor,
                        rows_per_field: torch.Tensor, seqs: list[torch.Tensor],
                        lens: list[torch.Tensor], W: torch.Tensor, m: torch.Tensor,
                        v: torch.Tensor, last: torch.Tensor, t: int, lr: float,
                        row_lr: torch.Tensor | None, catch_up: AdamCatchUp) -> int:
    """Dense Adam: brings every row this batch (int32 ids [B, S], sequences, lengths) looks
    up to step ``t``; returns -1 (nothing changed) if a lookup is outside its field (pooling
    then reports it), else 0."""
    return _lib().adam_catch_up_batch(
        ids.data_ptr(), ids.shape[0], ids.shape[1], offsets.data_ptr(),
        rows_per_field.data_ptr(), len(seqs), ptr_array(seqs),
        int64_array([q.shape[1] for q in seqs]), ptr_array(lens), W.data_ptr(), m.data_ptr(),
        v.data_ptr(), last.data_ptr(), W.shape[0], W.shape[1], t, lr, ptr(row_lr),
        ctypes.byref(catch_up))


def catch_up_struct(beta1: float, beta2: float, eps: float, tol: float, H0: np.ndarray,
                    H1: np.ndarray, H2: np.ndarray, s: np.ndarray, pw: np.ndarray,
                    log_q: list[float], alpha: float = 0.0, moves: bool = True) -> AdamCatchUp:
    """The ``AdamCatchUp`` struct over these float64 tables (kept alive by the struct):
    H0, H1, H2, s [T + 2]; pw [5, P]. ``alpha``: AdamAR's row decay (0 = off); ``moves``:
    False for lazy Adam (a row's gap brings the decay only)."""
    arrays = [np.ascontiguousarray(a, dtype=np.float64) for a in (H0, H1, H2, s, pw)]
    st = AdamCatchUp(beta1, beta2, eps, tol, len(arrays[0]) - 2, *(a.ctypes.data
                     for a in arrays[:4]), arrays[4].shape[1], arrays[4].ctypes.data,
                     (_D * 5)(*log_q), alpha, int(moves))
    st._keep = arrays  # type: ignore[attr-defined]
    return st


def catch_up_with_touch(st: AdamCatchUp, touch: torch.Tensor,
                        synced: torch.Tensor) -> AdamCatchUp:
    """A copy of ``st`` (sharing its tables) pointing at a table's AdamAR state: ``touch``
    (int64 [R], the step each row was last in a batch, as of the last sync; the sync kernel
    refreshes it) and ``synced`` (int64 0-dim, the step of the last sync; set by the caller)."""
    out = AdamCatchUp.from_buffer_copy(st)
    out.touch, out.synced = ptr(touch), ptr(synced)
    out._keep = (st._keep, touch, synced)  # type: ignore[attr-defined]
    return out


def adam_catch_up_all(W: torch.Tensor, m: torch.Tensor, v: torch.Tensor, last: torch.Tensor,
                      t: int, lr: float, row_lr: torch.Tensor | None,
                      catch_up: AdamCatchUp) -> int:
    """Brings every row with ``last < t`` up to step ``t`` (dense Adam); returns how many."""
    return _lib().adam_catch_up_all(W.data_ptr(), m.data_ptr(), v.data_ptr(), last.data_ptr(),
                                    W.shape[0], W.shape[1], t, lr, ptr(row_lr),
                                    ctypes.byref(catch_up))


def coalesce_rows(idx: torch.Tensor, vals: torch.Tensor, rows: torch.Tensor,
                  summed: torch.Tensor) -> int:
    """Distinct rows of idx (first-appearance order) and their summed vals; returns their
    count, or < 0 (no memory: use the torch path)."""
    return _lib().coalesce_rows(idx.data_ptr(), vals.data_ptr(), idx.shape[0], vals.shape[1],
                                rows.data_ptr(), summed.data_ptr())


def softmax_xent_rows(z: torch.Tensor, rows: int, col0: int, grad: bool) -> float:
    """Softmax cross-entropy of z's first ``rows`` rows (positive of row i at column
    col0 + i); with ``grad``, z becomes its gradient."""
    return float(_lib().softmax_xent_rows(z.data_ptr(), rows, z.shape[1], col0, int(grad)))


def rank_rows(s: torch.Tensor, n: int, row: torch.Tensor, item: torch.Tensor,
              s_pos: torch.Tensor, inv_tau: float, lse: torch.Tensor,
              rank: torch.Tensor) -> None:
    """Per pair: log-sum-exp of s[row] / tau and the held-out item's rank."""
    _lib().rank_rows(s.data_ptr(), n, s.shape[1], 0, row.data_ptr(), item.data_ptr(),
                     s_pos.data_ptr(), inv_tau, lse.data_ptr(), rank.data_ptr())


def topk_rows(s: torch.Tensor, k: int, idx: torch.Tensor) -> int:
    """Each row's top-k column indices into idx; nonzero: no memory."""
    return _lib().topk_rows(s.data_ptr(), s.shape[0], s.shape[1], k, idx.data_ptr())


def accidental_hits(pos: torch.Tensor, cand: torch.Tensor, in_batch: bool, hr: torch.Tensor,
                    hc: torch.Tensor) -> int:
    """(row, column) pairs where a candidate equals a row's positive (hash join); returns
    their count (> capacity: call again with that much room; < 0: no memory)."""
    return _lib().accidental_hits(pos.data_ptr(), pos.shape[0], cand.data_ptr(), cand.shape[0],
                                  int(in_batch), hr.data_ptr(), hc.data_ptr(), hr.shape[0])


def contrastive_scratch(blk: int, C: int, d: int, threads: int) -> int:
    """Floats of scratch :func:`contrastive_blocks` needs."""
    return _lib().contrastive_scratch(blk, C, d, threads)


def contrastive_blocks(u: torch.Tensor, c: torch.Tensor, inv_tau: float,
                       logq: torch.Tensor | None, hr: torch.Tensor, hc: torch.Tensor,
                       hit_start: torch.Tensor, in_batch: bool, chunk: int,
                       gu: torch.Tensor | None, gc: torch.Tensor | None, buf: torch.Tensor,
                       threads: int) -> float:
    """Stage 1's blocked sampled softmax (native.c ``contrastive_blocks``); returns the
    summed loss."""
    (n, d), C = u.shape, c.shape[0]
    return float(_lib().contrastive_blocks(
        u.data_ptr(), c.data_ptr(), n, C, d, inv_tau, ptr(logq), hr.data_ptr(), hc.data_ptr(),
        hit_start.data_ptr(), int(in_batch), chunk, int(gu is not None), ptr(gu), ptr(gc),
        buf.data_ptr(), threads))


def ctr_step_scratch(batch: int, n_layers: int, width: ctypes.Array, cap: int, dim: int,
                     threads: int) -> int:
    """Floats of scratch one fused step needs."""
    return _lib().ctr_step_scratch(batch, n_layers, width, cap, dim, threads)


def ctr_steps(c: CtrStep, sel: int | None, n_rows: int, batch: int, beta1: float,
              beta2: float, t0: int, losses: np.ndarray) -> int:
    """Consecutive fused steps (native.c ``ctr_steps``); returns the steps done."""
    return _lib().ctr_steps(ctypes.byref(c), sel, n_rows, batch, beta1, beta2, t0,
                            losses.ctypes.data)


def ctr_forward_scratch(n_layers: int, width: ctypes.Array, lps: int, K: int,
                        threads: int) -> int:
    """Floats of scratch one fused forward needs."""
    return _lib().ctr_forward_scratch(n_layers, width, lps, K, threads)


def ctr_forward(c: CtrStep, out: np.ndarray) -> None:
    """Click probabilities (native.c ``ctr_forward``) into out [B] float32."""
    _lib().ctr_forward(ctypes.byref(c), out.ctypes.data)
