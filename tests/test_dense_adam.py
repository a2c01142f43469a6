"""optim.embedding_update: dense Adam on ID tables (torch.optim.Adam / TF1 semantics at
row-wise cost) against an eager reference, sync(), resume, the fused step, and lazy mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import kernel_path, kernel_paths
from oneepoch import kernels
from oneepoch.config import OptimConfig, TrainConfig, load_config
from oneepoch.data.batcher import Batch, Batcher
from oneepoch.models.embedding import FieldEmbedding
from oneepoch.training.optim import DenseAdamCatchUp, RowWiseOptimizer

R, D, STEPS, LR = 40, 6, 200, 1e-2
PATHS = kernel_paths()
pytestmark = pytest.mark.usefixtures("one_thread")


def _schedule(steps: int = STEPS, seed: int = 1) -> list[torch.Tensor]:
    """Distinct rows per step, each row at its own rate: rows 0-2 about every 250 steps (gaps
    beyond 100), others every step to every few dozen."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(R, generator=g) ** 3
    p[:3] = 0.004
    sched = [torch.nonzero(torch.rand(R, generator=g) < p).squeeze(1) for _ in range(steps)]
    for s, rows in ((10, [0, 1]), (150, [0, 2])):  # rows 0-2 surely seen, with gaps > 100
        if s < steps:
            sched[s] = torch.unique(torch.cat([sched[s], torch.tensor(rows)]))
    return [s if len(s) else torch.tensor([5]) for s in sched]


def _init():
    torch.manual_seed(0)
    return torch.randn(R, D) * 0.1, torch.randn(R, D)


def _loss(e: torch.Tensor, tgt: torch.Tensor, wd: float = 0.0) -> torch.Tensor:
    return ((e - tgt) ** 2).sum() * 1e-2 + 0.5 * wd * (e ** 2).sum()


class _Mine:
    """oneepoch's side: a FieldEmbedding (one field) and its row-wise optimizer."""

    def __init__(self, w0: torch.Tensor, mode: str = "dense", wd: float = 0.0,
                 name: str = "adam") -> None:
        self.emb = FieldEmbedding({"id": R}, ["id"], n_single=1, dim=D)
        self.emb.weight.data.copy_(w0)
        cfg = OptimConfig(name=name, lr=LR, embedding_update=mode, weight_decay=wd)
        self.opt = RowWiseOptimizer(self.emb.weight, cfg, LR, self.emb)

    def step(self, rows: torch.Tensor, tgt: torch.Tensor, wd: float = 0.0) -> None:
        b = Batch(rows.view(-1, 1), [], [], torch.zeros(len(rows)))
        _loss(self.emb(b)[:, 0], tgt[rows]).backward()  # (the optimizer adds the L2 term)
        self.opt.step()
        self.emb.weight.grad = None


def _reference(w0, tgt, sched, wd=0.0):
    """torch.optim.Adam on a dense table, weights after every step; L2 on the batch's rows."""
    ref = torch.nn.Embedding(R, D)
    ref.weight.data.copy_(w0)
    opt = torch.optim.Adam(ref.parameters(), lr=LR)
    out = []
    for rows in sched:
        opt.zero_grad()
        _loss(ref.weight[rows], tgt[rows], wd).backward()
        opt.step()
        out.append((ref.weight.detach().clone(), opt.state[ref.weight]["exp_avg"].clone(),
                    opt.state[ref.weight]["exp_avg_sq"].clone()))
    return out


# The two implementations differ in float32 rounding only (the native kernel also writes
# Adam's update as m / bc1 / (sqrt(v / bc2) + eps)): over 200 steps at lr 1e-2, up to 6e-6 on
# weights of size ~1 without weight decay, and up to 3e-5 with it (an element whose gradient
# and L2 term nearly cancel amplifies rounding); lazy Adam is ~1e-2 away. The catch-up's own
# precision is tested alone below (3e-6 relative).
W_TOL = dict(atol=1e-4, rtol=0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_dense_matches_torch_adam_on_a_dense_table(path, wd):
    w0, tgt = _init()
    sched = _schedule()
    ref = _reference(w0, tgt, sched, wd)
    mine, lazy = _Mine(w0, wd=wd), _Mine(w0, "lazy", wd=wd)
    with kernel_path(path):
        for t, rows in enumerate(sched):
            mine.step(rows, tgt)
            lazy.step(rows, tgt)
            if t in (9, 120, 149, STEPS - 1):  # sync: every row at this step, as torch has it
                moved = mine.opt.sync()
                assert moved > 0
                w, m, v = ref[t]
                torch.testing.assert_close(mine.emb.weight.detach(), w, **W_TOL)
                torch.testing.assert_close(mine.opt.state["exp_avg"], m, atol=1e-6, rtol=0)
                torch.testing.assert_close(mine.opt.state["exp_avg_sq"], v, atol=1e-8,
                                           rtol=1e-3)
                assert bool((mine.opt.state["last_step"] == t + 1).all())
    assert (lazy.emb.weight.detach() - ref[-1][0]).abs().max() > 1e-3  # lazy is another rule


@pytest.mark.parametrize("path", PATHS)
def test_rows_untouched_lag_until_sync_then_match(path):
    w0, tgt = _init()
    sched = _schedule(120)
    ref = _reference(w0, tgt, sched)
    mine = _Mine(w0)
    with kernel_path(path):
        for rows in sched:
            mine.step(rows, tgt)
        last = mine.opt.state["last_step"]
        stale = (last < len(sched)) & (last > 0)  # seen, but not at the last step
        assert int(stale.sum()) >= 3
        before = mine.emb.weight.detach().clone()
        mine.opt.sync()
    after = mine.emb.weight.detach()
    assert bool((after[stale] != before[stale]).any(1).all())  # sync moved each stale row
    assert torch.equal(after[~stale], before[~stale])
    torch.testing.assert_close(after, ref[-1][0], **W_TOL)


@pytest.mark.parametrize("path", PATHS)
def test_state_dict_round_trip_continues_bitwise(path):
    w0, tgt = _init()
    sched = _schedule()
    with kernel_path(path):
        straight = _Mine(w0)
        for rows in sched:
            straight.step(rows, tgt)
        first = _Mine(w0)
        for rows in sched[:97]:
            first.step(rows, tgt)
        sd = {k: v.clone() if torch.is_tensor(v) else v for k, v in
              first.opt.state_dict().items()}
        assert "last_step" in sd and int(sd["last_step"].min()) < 96  # saved without a sync
        resumed = _Mine(first.emb.weight.detach().clone())
        resumed.opt.load_state_dict(sd)
        for rows in sched[97:]:
            resumed.step(rows, tgt)
    assert torch.equal(resumed.emb.weight, straight.emb.weight)
    for k in straight.opt.state:
        assert torch.equal(resumed.opt.state[k], straight.opt.state[k]), k


def test_lazy_mode_leaves_absent_rows_untouched_and_dense_moves_them():
    w0, tgt = _init()
    sched = _schedule(60)
    for mode in ("lazy", "dense"):
        mine = _Mine(w0, mode)
        for rows in sched[:59]:
            mine.step(rows, tgt)
        absent = torch.ones(R, dtype=torch.bool)
        absent[sched[59]] = False
        before = [x.clone() for x in (mine.emb.weight.detach(), *mine.opt.state.values())]
        mine.step(sched[59], tgt)
        mine.opt.sync()
        after = [mine.emb.weight.detach(), *mine.opt.state.values()]
        if mode == "lazy":
            assert "last_step" not in mine.opt.state
            assert all(torch.equal(a[absent], b[absent])
                       for a, b in zip(after, before, strict=True))
        else:
            assert not torch.equal(after[0][absent], before[0][absent])


def test_other_optimizers_stay_lazy_and_bad_mode_is_refused():
    w0, tgt = _init()
    mine = _Mine(w0, "dense", name="rmsprop")
    assert not mine.opt.dense_adam and "last_step" not in mine.opt.state
    assert mine.opt.sync() == 0
    with pytest.raises(ValueError, match="optim.embedding_update"):
        _Mine(w0, "eager")
    with pytest.raises(ValueError, match="beta1 < beta2"):
        DenseAdamCatchUp(0.999, 0.99, 1e-8)


def test_lazy_checkpoint_loads_into_dense_as_up_to_date():
    w0, tgt = _init()
    lazy = _Mine(w0, "lazy")
    for rows in _schedule(20):
        lazy.step(rows, tgt)
    dense = _Mine(lazy.emb.weight.detach().clone())
    dense.opt.load_state_dict(lazy.opt.state_dict())
    assert bool((dense.opt.state["last_step"] == 20).all())
    assert dense.opt.sync() == 0


def test_catch_up_closed_form_matches_step_by_step_zero_gradient_adam():
    """Many rows, long and short gaps, early and late steps, tiny and large moments: the
    closed form (and its exact fallback) against torch.optim.Adam stepping with zero
    gradients in float64. The weights start at 0, so the float32 result is the movement itself
    (not a small difference of two weights): only the catch-up's own error is measured."""
    g = torch.Generator().manual_seed(0)
    cu = DenseAdamCatchUp(0.9, 0.999, 1e-8)
    for t0, k in ((0, 1), (1, 3), (5, 40), (120, 150), (3000, 7), (60_000, 300), (10, 5000)):
        n = 64
        p0 = torch.zeros(n, 4, dtype=torch.float64)
        scale = 10.0 ** torch.randint(-9, -1, (n, 1), generator=g).double()
        m0 = torch.randn(n, 4, dtype=torch.float64, generator=g) * scale
        v0 = m0 ** 2 * (1 + torch.rand(n, 4, dtype=torch.float64, generator=g)) * 3
        ref = p0.clone().requires_grad_()
        opt = torch.optim.Adam([ref], lr=LR)
        opt.state[ref] = {"step": torch.tensor(float(t0), dtype=torch.float64),
                          "exp_avg": m0.clone(), "exp_avg_sq": v0.clone()}
        for _ in range(k):
            ref.grad = torch.zeros_like(ref)
            opt.step()
        w, m, v = p0.float(), m0.float(), v0.float()
        cu.apply(w, m, v, torch.full((n,), t0), torch.full((n,), k),
                 torch.full((n,), LR, dtype=torch.float64))
        moved = ref.detach().float()
        torch.testing.assert_close(w, moved, rtol=3e-6, atol=0)
        torch.testing.assert_close(m, opt.state[ref]["exp_avg"].float(), rtol=1e-5, atol=0)
        if kernels.available():  # the native kernel on the same rows
            w2, m2, v2 = p0.float(), m0.float(), v0.float()
            last = torch.full((n,), t0, dtype=torch.int64)
            kernels.adam_catch_up_all(w2, m2, v2, last, t0 + k, LR, None, cu.struct)
            torch.testing.assert_close(w2, moved, rtol=3e-6, atol=0)
            assert bool((last == t0 + k).all())


@pytest.mark.skipif(not kernels.available(), reason="no C compiler here")
def test_fused_step_matches_autograd_in_dense_mode(tiny_synth):
    from oneepoch.training.fused import FusedStep, sgemm_address
    from oneepoch.training.trainer import build, epoch_order, prepare_data

    if sgemm_address() is None:
        pytest.skip("no sgemm_ in this PyTorch")
    cfg = load_config(TrainConfig, "ctr", [f"data.path={tiny_synth}", "batch_size=200"])
    assert cfg.optim.embedding_update == "dense"  # the default
    data = prepare_data(cfg)
    tr = data.splits["train"]
    (m1, o1), (m2, o2) = build(cfg, data), build(cfg, data)
    m1.train(), m2.train()
    batcher = Batcher(tr, cfg.batch_size)
    fast = FusedStep.build(m2, o2, batcher)
    assert fast is not None
    order = epoch_order(len(tr), 0, "every", 0)
    for rows in list(batcher.epoch_rows(order))[:25]:
        b = batcher.get(rows)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(m1(b), b.label)
        o1.zero_grad()
        loss.backward()
        o1.step()
        fast(rows)
    r1, r2 = o1.sparse["embedding.weight"], o2.sparse["embedding.weight"]
    assert torch.equal(r1.state["last_step"], r2.state["last_step"])
    assert int((r1.state["last_step"] < 25).sum()) > 100  # rows lagging behind
    o1.sync(), o2.sync()
    for k in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(r1.state[k], r2.state[k], rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(m1.embedding.weight, m2.embedding.weight, rtol=1e-4, atol=2e-5)
    np.testing.assert_array_equal(r1.state["last_step"].numpy(), 25)


def test_the_lookup_hook_keeps_neither_table_nor_optimizer_alive():
    import gc
    import weakref

    mine = _Mine(_init()[0])
    refs = weakref.ref(mine.emb), weakref.ref(mine.opt)
    del mine
    gc.collect()
    assert refs[0]() is None and refs[1]() is None
