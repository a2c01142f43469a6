"""The base model's whole training step as one native call (no autograd graph, no Python
between the passes).

Paper A's base setting, the Embedding & Dice-MLP model trained with BCE, row-wise Adam on the
table and Adam on the MLP, is what every multi-epoch run, sweep and benchmark trains, so its
step has a fast path: pooling + de-duplication, the MLP forward and backward (GEMMs through
PyTorch's own BLAS), Dice with batch statistics, the loss, the gradient scatter and both Adam
updates run in ``ctr_step`` of ``kernels/native.c``, on PyTorch's thread pool. It reads and
writes the very tensors of the model and the optimizers (parameters, Dice running statistics,
the row-wise and ``torch.optim.Adam`` states), so checkpoints, resume, evaluation and hooks
see no difference, and the numbers match the autograd path within float tolerance
(``tests/test_fused_step.py``).

:meth:`FusedStep.why_not` says why a setting takes the autograd path instead (another
activation, dropout, another optimizer, frozen groups, a hook that changes the loss, update
tracking, CUDA, no native kernels); ``ONEEPOCH_FUSED=0`` turns the
fast path off.

    >>> step = FusedStep.build(model, opt, batcher, hooks)   # doctest: +SKIP
    >>> loss = step(rows) if step else None                   # doctest: +SKIP
    >>> loss = step.step_batch(batch)                         # doctest: +SKIP  (a Batch)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from oneepoch import kernels
from oneepoch.data.batcher import Batch, Batcher
from oneepoch.models.ctr import EmbeddingMLP
from oneepoch.models.layers import Dice
from oneepoch.training.hooks import changes_loss
from oneepoch.training.optim import Optimizer

MAX_LAYERS, MAX_SEQS = kernels.MAX_LAYERS, kernels.MAX_SEQS  # native.c's (checked at load)
_ADAM_KEYS = ("exp_avg", "exp_avg_sq", "step")  # the order _bind_state lists them in


# native.c's PROF_N phases (thread 0's view, waits included)
PHASES = ("pool", "fwd_gemm", "dice_fwd", "loss", "bwd_gemm", "dice_bwd", "emb_bwd_adam",
          "dense_sum_adam", "emb_catch_up")


def sgemm_address() -> int | None:
    """See :func:`oneepoch.kernels._sgemm_address`."""
    return kernels._sgemm_address()


def _native_ok() -> bool:
    """Whether the fused native step and forward can run here (kernels and sgemm_)."""
    return kernels.has_blas()


class FusedStep:
    """One training step per call: ``step(rows)`` on these rows of the batcher's split, or
    ``step.step_batch(batch)`` on a :class:`~oneepoch.data.batcher.Batch`; returns the loss.

    Args:
        model, opt: the run's model and :class:`~oneepoch.training.optim.Optimizer` (see
            :meth:`why_not` for what they must be).
        batch_size: the largest batch a step will get.
        seq_lens: the padded length of each sequence field.
        batcher: where ``step(rows)`` takes its rows from.
    """

    @staticmethod
    def why_not(model: torch.nn.Module, opt: Optimizer, batcher: Batcher | None = None,
                hooks: list | tuple = ()) -> str | None:
        """``None`` if the fast path applies to this run, else the reason it does not."""
        if os.environ.get("ONEEPOCH_FUSED", "1") == "0":
            return "ONEEPOCH_FUSED=0"
        if not isinstance(model, EmbeddingMLP):
            return f"model {type(model).__name__} (only the Embedding & MLP model)"
        mlp, emb = model.mlp, model.embedding
        if not all(isinstance(a, Dice) for a in mlp.acts) or mlp.dropout or not mlp.fuse:
            return "only Dice activations without dropout"
        if len(mlp.fcs) > MAX_LAYERS or emb.n_fields - emb.n_single > MAX_SEQS:
            return f"more than {MAX_LAYERS} layers or sequence fields"
        if emb.table_rows > 2**31 - 1:  # the native lookup lists keep rows as int32
            return f"a table of {emb.table_rows} rows (at most 2^31 - 1)"
        params = list(model.parameters())
        if not all(p.requires_grad for p in params):
            return "frozen parameter groups"
        if not kernels.usable(*params, *model.buffers()) or any(
                p.dtype != torch.float32 for p in params):
            return "not contiguous float32 CPU tensors, or no native kernels"
        if not _native_ok():
            return "no native kernels, or PyTorch exports no sgemm_"
        if opt.cfg.name != "adam" or not isinstance(opt.dense, torch.optim.Adam):
            return f"optimizer {opt.cfg.name} (only adam)"
        group = opt.dense.param_groups
        if len(group) != 1 or group[0]["amsgrad"] or group[0]["maximize"] or \
                group[0].get("decoupled_weight_decay", False):
            return "Adam variant (amsgrad, maximize or decoupled weight decay)"
        if list(opt.sparse) != ["embedding.weight"] or \
                opt.sparse["embedding.weight"].module is not emb:
            return "other embedding tables"
        row_lr = opt.sparse["embedding.weight"].row_lr
        if row_lr is not None and not (kernels.usable(row_lr) and row_lr.dtype == torch.float32
                                       and row_lr.shape == (emb.table_rows,)):
            return "per-row learning rates not a float32 CPU vector of the table's rows"
        if opt.track_updates:
            return "update norms are tracked"
        if changes_loss(hooks):
            return "a hook changes the loss"
        return None

    @classmethod
    def build(cls, model: torch.nn.Module, opt: Optimizer, batcher: Batcher,
              hooks: list | tuple = ()) -> FusedStep | None:
        """The fast path for this run, or ``None`` (then train through autograd)."""
        if cls.why_not(model, opt, batcher, hooks):
            return None
        return cls(model, opt, batcher.batch_size,  # type: ignore[arg-type]
                   [q.shape[1] for q in batcher.split.seqs], batcher)

    def __init__(self, model: EmbeddingMLP, opt: Optimizer, batch_size: int,
                 seq_lens: list[int], batcher: Batcher | None = None) -> None:
        reason = self.why_not(model, opt)
        if reason:
            raise ValueError(f"FusedStep does not apply: {reason}")
        self.model, self.opt, self.batcher = model, opt, batcher
        self.batch_size = batch_size
        emb, mlp = model.embedding, model.mlp
        self.emb, self.rowopt = emb, opt.sparse["embedding.weight"]
        self.params = mlp._ordered_params()
        self._acts = list(mlp.acts)
        self.dense: torch.optim.Adam = opt.dense  # type: ignore[assignment]
        self.grads = [torch.zeros_like(p) for p in self.params]
        self.widths = [fc.in_features for fc in mlp.fcs] + [1]
        self.c = c = kernels.abi.CtrStep()
        self._keep: list[Any] = []  # objects whose memory the struct points into
        self._width = kernels.int64_array(self.widths)
        c.n_layers, c.width = len(mlp.fcs), kernels.address(self._width)
        c.S, c.K = emb.n_single, len(seq_lens)
        if c.S + c.K != emb.n_fields:
            raise ValueError(f"FusedStep: {len(seq_lens)} sequence lengths for a model with "
                             f"{emb.n_fields - emb.n_single} sequence fields")
        c.R, c.D = emb.table_rows, emb.dim
        c.off, c.lim = emb.field_offsets.data_ptr(), emb.field_rows.data_ptr()
        d0: Dice = mlp.acts[0]  # type: ignore[assignment]
        c.dice_eps, c.dice_momentum = d0.eps, d0.momentum
        self._L = kernels.int64_array(list(seq_lens))
        c.L = kernels.address(self._L)
        self.cap = batch_size * (c.S + sum(seq_lens))
        c.cap = self.cap
        self.scratch = torch.empty(0)
        self._size_scratch(1)
        if emb._slot32 is None:
            emb._slot32 = torch.full((emb.table_rows,), -1, dtype=torch.int32)
        c.slot = emb._slot32.data_ptr()
        self._state_key: tuple = ()
        self.profile: np.ndarray | None = None  # enable_profile(): seconds per PHASES entry
        self._arrays: tuple | None = None  # the batch arrays the struct points into

    def _size_scratch(self, threads: int) -> None:
        """Scratch for ``threads`` threads (the chunk lists of lookups grow with it)."""
        c = self.c
        n = kernels.ctr_step_scratch(self.batch_size, c.n_layers, self._width, self.cap,
                                     c.D, threads)
        if n > self.scratch.numel():
            self.scratch = torch.empty(n, dtype=torch.float32)
            c.scratch = self.scratch.data_ptr()
        c.threads = threads

    def _set_arrays(self, ids: torch.Tensor, seqs: list[torch.Tensor],
                    lens: list[torch.Tensor], label: torch.Tensor) -> None:
        c = self.c
        self._arrays = (ids, seqs, lens, label, kernels.ptr_array(seqs), kernels.ptr_array(lens))
        c.ids, c.label = ids.data_ptr(), label.data_ptr()
        c.seqs = kernels.address(self._arrays[4])
        c.lens = kernels.address(self._arrays[5])

    def _bind_state(self) -> None:
        """Point the struct at the current parameter and optimizer-state tensors (again after
        a ``load_state_dict`` replaced them). Runs every step, so the common case avoids
        hashing tensors (``Tensor.__hash__`` is Python code): the state is read in insertion
        order when that is the parameters' order."""
        st = self.dense.state
        items = list(st.items())
        try:
            if len(items) != len(self.params) or not all(
                    k is p for (k, _), p in zip(items, self.params, strict=True)):
                raise KeyError
            moments = [d[k] for _, d in items for k in _ADAM_KEYS]
        except KeyError:
            for p in self.params:
                if p not in st or "exp_avg" not in st[p]:  # as torch.optim.Adam's lazy init
                    st[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                             "exp_avg_sq": torch.zeros_like(p)}
            moments = [st[p][k] for p in self.params for k in _ADAM_KEYS]
        w, rs = self.emb.weight, self.rowopt.state
        run_stats = [d._buffers[k] for d in self._acts for k in ("running_mean", "running_var")]
        tensors = [w, rs["exp_avg"], rs["exp_avg_sq"], *self.params, *moments, *run_stats]
        last = rs.get("last_step")  # dense Adam on the table: each row's last step
        key = tuple(map(torch.Tensor.data_ptr, tensors)) + (kernels.ptr(last),)
        if key == self._state_key:
            return
        if not all(t.is_contiguous() and t.device.type == "cpu" and t.dtype == torch.float32
                   for t in tensors):
            raise RuntimeError("FusedStep: a parameter or optimizer state is not a contiguous "
                               "float32 CPU tensor")
        c = self.c
        if last is not None and not (last.is_contiguous() and last.device.type == "cpu"
                                     and last.dtype == torch.int64):
            raise RuntimeError("FusedStep: the table's last_step is not a contiguous int64 CPU "
                               "tensor")
        c.W, c.Wm, c.Wv = key[0], key[1], key[2]
        c.emb_last = kernels.ptr(last)
        cu = self.rowopt.cu_struct  # (AdamAR: with the table's last_touch)
        c.emb_catch = None if cu is None else kernels.address(cu)
        arrs = [kernels.ptr_array(ts) for ts in (
            self.params, self.grads, moments[0::3], moments[1::3], moments[2::3],
            run_stats[0::2], run_stats[1::2])]
        for name, a in zip(("p", "g", "m", "v", "step", "run_mean", "run_var"), arrs,
                           strict=True):
            setattr(c, name, kernels.address(a))
        self._keep = arrs
        self._state_key = key

    def enable_profile(self) -> np.ndarray:
        """Accumulate each phase's wall time (seconds, in :data:`PHASES` order) from now on
        into the returned array."""
        self.profile = np.zeros(len(PHASES), dtype=np.float64)
        self.c.prof = kernels.address(self.profile)
        return self.profile

    def __call__(self, rows: np.ndarray) -> float:
        """Train on these row indices of the batcher's split; returns the batch's mean loss."""
        if self.batcher is None:
            raise ValueError("FusedStep: no batcher given; use step_batch(batch)")
        if self.batcher._arrays is None:  # memory-mapped split: gather this batch first
            return self.step_batch(self.batcher.get(rows))
        if self._arrays is None or self._arrays[0] is not self.batcher._arrays[0]:
            self._set_arrays(*self.batcher._arrays, self.batcher._label_t)
        sel = np.ascontiguousarray(rows, dtype=np.int64)
        return self._run(len(sel), kernels.address(sel), lambda: self.batcher.get(rows))

    def step_batch(self, batch: Batch) -> float:
        """Train on one :class:`~oneepoch.data.batcher.Batch` (CPU tensors); returns its loss."""
        if any(t.dtype not in (torch.int32, torch.int64)
               for t in [batch.ids, *batch.seqs, *batch.lens]):
            raise TypeError("FusedStep: batch IDs, sequences and lengths must be int32 or int64")
        ids = kernels.ids32(batch.ids)  # what the native step reads
        seqs = [kernels.ids32(q) for q in batch.seqs]
        lens = [kernels.ids32(n) for n in batch.lens]
        label = batch.label.to(torch.float32).contiguous()
        if [q.shape[1] for q in seqs] != list(self._L):
            raise ValueError(f"FusedStep: sequence lengths {[q.shape[1] for q in seqs]}, "
                             f"built for {list(self._L)}")
        self._set_arrays(ids, seqs, lens, label)
        return self._run(len(batch), None, lambda: batch)

    def steps(self, rows: np.ndarray) -> np.ndarray:
        """Train on consecutive batches of these row indices of the batcher's split, in one
        native call: batch k is ``rows[k * batch_size:(k + 1) * batch_size]`` (the last may be
        shorter, but needs 2 rows). Returns each batch's mean loss; the same numbers as one
        call per batch. If a batch fails (an ID outside its field), the batches before it stay
        applied and ``IndexError`` names the bad lookup."""
        sel = np.ascontiguousarray(rows, dtype=np.int64)
        bs = self.batch_size
        n = -(-len(sel) // bs)
        if self.batcher is None or self.batcher._arrays is None or n <= 1:
            starts = range(0, len(sel), bs)  # (a memory-mapped split is gathered per batch)
            return np.array([self(sel[a:a + bs]) for a in starts], dtype=np.float64)
        if len(sel) - (n - 1) * bs < 2:
            raise ValueError(f"FusedStep: the last batch has {len(sel) - (n - 1) * bs} row "
                             "(needs 2)")
        if self._arrays is None or self._arrays[0] is not self.batcher._arrays[0]:
            self._set_arrays(*self.batcher._arrays, self.batcher._label_t)
        losses, done = self._native_steps(bs, kernels.address(sel), len(sel), n)
        if self.c.status:
            bad = sel[done * bs:(done + 1) * bs]
            self._raise_status(lambda: self.batcher.get(bad))  # type: ignore[union-attr]
        return losses

    def _native_steps(self, b: int, sel: int | None, n_rows: int, n: int
                      ) -> tuple[np.ndarray, int]:
        """``n`` steps of ``b`` rows (of ``sel``'s row indices, or the bound batch arrays
        themselves) in one ``ctr_steps`` call; returns the losses and the steps done."""
        ro = self.rowopt
        self._prepare(b)
        losses = np.empty(n, dtype=np.float64)
        done = kernels.ctr_steps(self.c, sel, n_rows, b, ro.cfg.beta1, ro.cfg.beta2,
                                 ro.step_count, losses)
        ro.step_count += done
        return losses, done

    def _prepare(self, b: int) -> None:
        """Checks and settings shared by every step (all but the batch and bias corrections)."""
        c, ro = self.c, self.rowopt
        if not self.model.training:
            raise RuntimeError("FusedStep: the model is in eval mode")
        if self.opt.track_updates:
            raise RuntimeError("FusedStep: update norms are tracked (optimizer.track_updates), "
                               "which only the autograd step does; set it before building")
        if b < 2 or b > self.batch_size:
            raise ValueError(f"FusedStep: batch of {b} rows (needs 2..{self.batch_size})")
        self._bind_state()
        threads = torch.get_num_threads()
        if threads != c.threads:
            self._size_scratch(threads)
        g = self.dense.param_groups[0]
        c.emb_lr, c.lr = ro.lr, g["lr"]
        c.emb_row_lr = None if ro.row_lr is None else ro.row_lr.data_ptr()
        c.beta1, c.beta2 = g["betas"]
        c.eps, c.wd = g["eps"], g["weight_decay"]

    def _raise_status(self, get_batch: Callable[[], Batch]) -> None:
        if self.c.status == -3:
            raise RuntimeError("FusedStep: layers, sequence fields or batch size outside "
                               "the native step's limits")
        raise IndexError(self.emb._bad_lookup(get_batch(), self.c.status))

    def _run(self, b: int, sel: int | None, get_batch: Callable[[], Batch]) -> float:
        losses, _ = self._native_steps(b, sel, b, 1)
        if self.c.status:
            self._raise_status(get_batch)
        return float(losses[0])


class FusedForward:
    """Click probabilities of the Embedding & Dice-MLP model in eval mode (Dice with its
    running statistics) in one native call per request: ``ctr_forward`` in native.c, each
    thread gathering, pooling and running its chunks of 256 samples through the MLP. The same
    numbers as ``torch.sigmoid(model(batch))`` in eval mode within float tolerance.

        >>> fwd = FusedForward.build(model)                 # doctest: +SKIP
        >>> p = fwd.predict(batcher, rows) if fwd else None  # doctest: +SKIP
    """

    @staticmethod
    def why_not(model: torch.nn.Module) -> str | None:
        """``None`` if the fast path applies to this model, else the reason it does not."""
        if os.environ.get("ONEEPOCH_FUSED", "1") == "0":
            return "ONEEPOCH_FUSED=0"
        if not isinstance(model, EmbeddingMLP):
            return f"model {type(model).__name__} (only the Embedding & MLP model)"
        mlp, emb = model.mlp, model.embedding
        if not all(isinstance(a, Dice) for a in mlp.acts):
            return "only Dice activations"
        if len(mlp.fcs) > MAX_LAYERS or emb.n_fields - emb.n_single > MAX_SEQS:
            return f"more than {MAX_LAYERS} layers or sequence fields"
        tensors = [*model.parameters(), *model.buffers()]
        if not kernels.usable(*tensors) or any(
                p.dtype != torch.float32 for p in model.parameters()):
            return "not contiguous float32 CPU tensors, or no native kernels"
        if not _native_ok():
            return "no native kernels, or PyTorch exports no sgemm_"
        return None

    @classmethod
    def build(cls, model: torch.nn.Module) -> FusedForward | None:
        """The fast path for this model, or ``None`` (then predict through ``model(batch)``)."""
        return None if cls.why_not(model) else cls(model)  # type: ignore[arg-type]

    def __init__(self, model: EmbeddingMLP) -> None:
        self.model = model
        emb, mlp = model.embedding, model.mlp
        self.params = mlp._ordered_params()
        c = self.c = kernels.abi.CtrStep()
        self._width = kernels.int64_array([fc.in_features for fc in mlp.fcs] + [1])
        c.n_layers, c.width = len(mlp.fcs), kernels.address(self._width)
        c.S, c.R, c.D = emb.n_single, emb.table_rows, emb.dim
        c.off, c.lim = emb.field_offsets.data_ptr(), emb.field_rows.data_ptr()
        c.dice_eps = mlp.acts[0].eps if len(mlp.acts) else 1e-8  # type: ignore[union-attr]

    @torch.no_grad()
    def predict(self, batcher: Batcher, rows: np.ndarray) -> np.ndarray:
        """Probabilities for these rows of the batcher's split."""
        out = np.empty(len(rows), dtype=np.float32)
        if batcher._arrays is not None:
            self._run(*batcher._arrays, batcher._label_t, np.ascontiguousarray(rows, np.int64),
                      out)
            return out
        bs = batcher.batch_size  # memory-mapped split: gather a batch at a time
        for a in range(0, len(rows), bs):
            b = batcher.get(rows[a:a + bs])
            self._run(b.ids, b.seqs, b.lens, b.label, None, out[a:a + bs], b)
        return out

    def _run(self, ids: torch.Tensor, seqs: list[torch.Tensor], lens: list[torch.Tensor],
             label: torch.Tensor, sel: np.ndarray | None, out: np.ndarray,
             batch: Batch | None = None) -> None:
        c, emb, mlp = self.c, self.model.embedding, self.model.mlp
        if len(seqs) != emb.n_fields - emb.n_single:
            raise ValueError(f"FusedForward: {len(seqs)} sequence fields for a model with "
                             f"{emb.n_fields - emb.n_single}")
        ids, seqs, lens = kernels.ids32(ids), [kernels.ids32(q) for q in seqs], \
            [kernels.ids32(n) for n in lens]  # (no copy for the batcher's own int32 arrays)
        seq_p, len_p = kernels.ptr_array(seqs), kernels.ptr_array(lens)
        L = kernels.int64_array([q.shape[1] for q in seqs])
        acts = list(mlp.acts)
        keep = [kernels.ptr_array(self.params), kernels.ptr_array([d.running_mean for d in acts]),
                kernels.ptr_array([d.running_var for d in acts])]
        c.p, c.run_mean, c.run_var = (kernels.address(a) for a in keep)
        c.ids, c.seqs, c.lens, c.L = (ids.data_ptr(), kernels.address(seq_p),
                                      kernels.address(len_p), kernels.address(L))
        c.K, c.W = len(seqs), emb.weight.data_ptr()
        c.B, c.sel = len(out), None if sel is None else kernels.address(sel)
        c.threads = torch.get_num_threads()
        lps = c.S + sum(q.shape[1] for q in seqs)
        buf = kernels.scratch(kernels.ctr_forward_scratch(c.n_layers, self._width, lps, c.K,
                                                          c.threads))
        c.scratch = buf.data_ptr()
        kernels.ctr_forward(c, out)
        if c.status == -3:
            raise RuntimeError("FusedForward: layers or sequence fields outside the native "
                               "forward's limits")
        if c.status:
            rows = sel if sel is not None else np.arange(len(out))
            b = batch if batch is not None else Batch(
                ids[torch.from_numpy(rows)], [q[torch.from_numpy(rows)] for q in seqs],
                [n[torch.from_numpy(rows)] for n in lens], label[torch.from_numpy(rows)])
            raise IndexError(emb._bad_lookup(b, c.status))
