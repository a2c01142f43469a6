"""optim.row_decay_alpha: AdamAR's per-row decay (Li & Lyu 2025), applied lazily when a row is
next touched, against an eager per-step reference; its closed form; resume; the fused step;
and alpha = 0 leaving today's numbers bitwise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import kernel_path, kernel_paths
from oneepoch import kernels
from oneepoch.config import OptimConfig, TrainConfig, load_config
from oneepoch.data.batcher import Batch, Batcher
from oneepoch.models.embedding import FieldEmbedding
from oneepoch.training.optim import DenseAdamCatchUp, RowWiseOptimizer, row_decay

R, D = 40, 6
B1, B2, EPS = 0.9, 0.999, 1e-8
PATHS = kernel_paths()
pytestmark = pytest.mark.usefixtures("one_thread")


def _schedule(steps: int, seed: int = 1) -> list[torch.Tensor]:
    """Distinct rows per step at irregular rates: rows 0-2 rarely (gaps of several hundred
    steps, beyond 1 / alpha), others every step to every few dozen."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(R, generator=g) ** 3
    p[:3] = 0.003
    sched = [torch.nonzero(torch.rand(R, generator=g) < p).squeeze(1) for _ in range(steps)]
    for s, rows in ((10, [0, 1]), (150, [0, 2]), (260, [1])):
        if s < steps:
            sched[s] = torch.unique(torch.cat([sched[s], torch.tensor(rows)]))
    return [s if len(s) else torch.tensor([5]) for s in sched]


def _init():
    torch.manual_seed(0)
    return torch.randn(R, D) * 0.3, torch.randn(R, D)


def _grad(e: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    return 2e-2 * (e - tgt)  # of sum((e - tgt)^2) * 1e-2


class _Mine:
    """oneepoch's side: a FieldEmbedding (one field) and its row-wise optimizer."""

    def __init__(self, w0: torch.Tensor, lr: float, alpha: float, mode: str,
                 row_lr: torch.Tensor | None = None) -> None:
        self.emb = FieldEmbedding({"id": R}, ["id"], n_single=1, dim=D)
        self.emb.weight.data.copy_(w0)
        cfg = OptimConfig(name="adam", lr=lr, embedding_update=mode, row_decay_alpha=alpha)
        self.opt = RowWiseOptimizer(self.emb.weight, cfg, lr, self.emb)
        self.opt.row_lr = row_lr

    def step(self, rows: torch.Tensor, tgt: torch.Tensor) -> None:
        b = Batch(rows.view(-1, 1), [], [], torch.zeros(len(rows)))
        e = self.emb(b)[:, 0]
        (((e - tgt[rows]) ** 2).sum() * 1e-2).backward()
        self.opt.step()
        self.emb.weight.grad = None


def _eager(w0, tgt, sched, lr, alpha, mode, row_lr=None):
    """The rule step by step, in float64 over the whole table: at step t the batch's rows get
    Adam's update (their gap closes: u = t); every other row r gets (dense) Adam's
    zero-gradient move, then the decay w *= 1 - lr_r min(1, alpha (t - u_r)). Returns the
    table after every step."""
    w, tg = w0.double().clone(), tgt.double()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    u = torch.zeros(R, dtype=torch.float64)
    lr_r = torch.full((R,), lr, dtype=torch.float64)
    if row_lr is not None:
        lr_r = lr_r * row_lr.double()
    out = []
    for t, rows in enumerate(sched, 1):
        g = torch.zeros_like(w)
        g[rows] = _grad(w[rows], tg[rows])
        moving = torch.ones(R, dtype=torch.bool) if mode == "dense" else \
            torch.zeros(R, dtype=torch.bool)
        moving[rows] = True
        m[moving] = B1 * m[moving] + (1 - B1) * g[moving]
        v[moving] = B2 * v[moving] + (1 - B2) * g[moving] ** 2
        step = (m / (1 - B1 ** t)) / ((v / (1 - B2 ** t)).sqrt() + EPS)
        w[moving] -= lr_r[moving, None] * step[moving]
        absent = torch.ones(R, dtype=torch.bool)
        absent[rows] = False
        gap = t - u[absent]
        w[absent] *= (1 - lr_r[absent] * torch.clamp(alpha * gap, max=1.0))[:, None]
        u[rows] = t
        out.append(w.clone())
    return out


def test_closed_form_decay_matches_the_product():
    """row_decay (and the native kernel) against prod_j (1 - lr min(1, alpha j)) summed in
    float64, for gaps within and far beyond 1 / alpha, started part-way (g0 > 0) or not."""
    cases = []
    for alpha in (1e-3, 0.02, 0.3, 1e-5):
        for lr in (1e-4, 1e-2, 0.3, 0.9):
            for g0 in (0, 3, 40, 2000):
                for k in (1, 2, 15, 17, 49, 50, 51, 900, 1001, 4000):
                    cases.append((alpha, lr, g0, k))
    want = [math.exp(sum(math.log1p(-lr * min(1.0, alpha * j))
                         for j in range(g0 + 1, g0 + k + 1))) for alpha, lr, g0, k in cases]
    by_alpha: dict[float, list[int]] = {}
    for i, c in enumerate(cases):
        by_alpha.setdefault(c[0], []).append(i)
    for alpha, idx in by_alpha.items():
        lr = torch.tensor([cases[i][1] for i in idx], dtype=torch.float64)
        g0 = torch.tensor([cases[i][2] for i in idx])
        k = torch.tensor([cases[i][3] for i in idx])
        ref = torch.tensor([want[i] for i in idx], dtype=torch.float64)
        got = row_decay(alpha, lr, k, g0)
        ok = ref > 1e-30  # (below: both underflow alike; relative error meaningless)
        torch.testing.assert_close(got[ok], ref[ok], rtol=1e-9, atol=0)
        assert bool((got[~ok] < 1e-25).all())
        if kernels.available():  # the native catch-up (decay only) on rows with these gaps
            cu = DenseAdamCatchUp(B1, B2, EPS, alpha, moves=False)
            t = 10_000
            touch = t - k - g0
            st = kernels.catch_up_with_touch(cu.struct, touch, torch.tensor(t))
            w = torch.ones(len(idx), 1)
            z = torch.zeros_like(w)
            last = (t - k).clone()
            scale = (lr / lr.max()).float()
            kernels.adam_catch_up_all(w, z.clone(), z.clone(), last, t, float(lr.max()), scale,
                                      st)
            # (the kernel takes lr as float32: the reference with that lr)
            lr32 = torch.tensor(float(lr.max())).float().double() * scale.double()
            ref32 = row_decay(alpha, lr32, k, g0)
            torch.testing.assert_close(w[ok, 0], ref32[ok].float(), rtol=1e-6, atol=0)
            assert bool((last == t).all())


@pytest.mark.parametrize("path", PATHS)
def test_lazy_adamar_equals_the_eager_reference(path):
    """Lazy Adam + AdamAR: each row's decay applied in one go when it is next touched (and at
    sync) equals the per-step rule; per-row learning rates included; syncs mid-run do not
    change the result (the gap keeps counting from the row's last batch)."""
    lr, alpha, steps = 1e-2, 0.02, 320  # 1 / alpha = 50: gaps of 100+ steps go beyond it
    w0, tgt = _init()
    sched = _schedule(steps)
    row_lr = torch.rand(R, generator=torch.Generator().manual_seed(3)) + 0.2
    ref = _eager(w0, tgt, sched, lr, alpha, "lazy", row_lr)
    mine = _Mine(w0, lr, alpha, "lazy", row_lr)
    gaps = []
    with kernel_path(path):
        for t, rows in enumerate(sched):
            mine.step(rows, tgt)
            if t in (40, 199, steps - 1):
                assert mine.opt.sync() > 0
                gaps.append(int(t + 1 - mine.opt.state["last_touch"].min()))
                torch.testing.assert_close(mine.emb.weight.detach().double(), ref[t],
                                           atol=1e-5, rtol=0)  # (float32 Adam vs float64)
    assert max(gaps) > 2 / alpha  # gaps well beyond the ramp were exercised
    plain = _eager(w0, tgt, sched, lr, 0.0, "lazy", row_lr)[-1]
    assert (plain - ref[-1]).abs().max() > 1e-2  # the decay matters at this tolerance


@pytest.mark.parametrize("path", PATHS)
def test_dense_adamar_is_within_its_bound_of_the_eager_reference(path):
    """Dense Adam + AdamAR: a catch-up applies the moves of the steps a row missed, then their
    decay (each move decayed by the whole window's factor, not by the steps after it only):
    per catch-up at most lr^2 alpha r (1 + r) / (2 (1 - r)^3) max|m / sqrt(v)|, r = beta1 /
    sqrt(beta2) (docs/training.md): 2.7e-5 here (|m / sqrt(v)| <= 3.2)."""
    lr, alpha, steps = 1e-3, 0.01, 320
    w0, tgt = _init()
    sched = _schedule(steps)
    ref = _eager(w0, tgt, sched, lr, alpha, "dense")
    mine = _Mine(w0, lr, alpha, "dense")
    with kernel_path(path):
        for t, rows in enumerate(sched):
            mine.step(rows, tgt)
            if t in (99, steps - 1):
                mine.opt.sync()
                torch.testing.assert_close(mine.emb.weight.detach().double(), ref[t],
                                           atol=5e-5, rtol=0)
    plain = _eager(w0, tgt, sched, lr, 0.0, "dense")[-1]
    assert (plain - ref[-1]).abs().max() > 1e-2


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", ["dense", "lazy"])
def test_state_dict_round_trip_continues_bitwise(path, mode):
    w0, tgt = _init()
    sched = _schedule(200)
    with kernel_path(path):
        straight = _Mine(w0, 1e-2, 0.02, mode)
        for t, rows in enumerate(sched):
            straight.step(rows, tgt)
            if t == 50:
                straight.opt.sync()  # (an evaluation: gaps then span a sync)
        first = _Mine(w0, 1e-2, 0.02, mode)
        for t, rows in enumerate(sched[:97]):
            first.step(rows, tgt)
            if t == 50:
                first.opt.sync()
        sd = {k: v.clone() if torch.is_tensor(v) else v for k, v in
              first.opt.state_dict().items()}
        assert {"last_touch", "last_sync", "last_step"} <= set(sd)
        resumed = _Mine(first.emb.weight.detach().clone(), 1e-2, 0.02, mode)
        resumed.opt.load_state_dict(sd)
        for rows in sched[97:]:
            resumed.step(rows, tgt)
        straight.opt.sync(), resumed.opt.sync()
    assert torch.equal(resumed.emb.weight, straight.emb.weight)
    for k in straight.opt.state:
        assert torch.equal(resumed.opt.state[k], straight.opt.state[k]), k


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", ["dense", "lazy"])
def test_alpha_zero_changes_nothing(path, mode):
    """alpha = 0 keeps today's state (no last_touch; lazy: no last_step) and numbers: the
    same as a decay factor of exactly 1 (alpha = 1e-30), which multiplies by 1.0f."""
    w0, tgt = _init()
    sched = _schedule(150)
    runs = []
    with kernel_path(path):
        for alpha in (0.0, 1e-30):
            mine = _Mine(w0, 1e-2, alpha, mode)
            for rows in sched:
                mine.step(rows, tgt)
            mine.opt.sync()
            runs.append(mine)
    keys = {"exp_avg", "exp_avg_sq"} | ({"last_step"} if mode == "dense" else set())
    assert set(runs[0].opt.state) == keys
    assert "last_touch" in runs[1].opt.state
    assert torch.equal(runs[0].emb.weight, runs[1].emb.weight)
    for k in keys:
        assert torch.equal(runs[0].opt.state[k], runs[1].opt.state[k])


def test_bad_settings_are_refused():
    w = torch.nn.Parameter(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="row_decay_alpha.*adam"):
        RowWiseOptimizer(w, OptimConfig(name="sgd", row_decay_alpha=0.1), 0.1)
    with pytest.raises(ValueError, match="row_decay_alpha.*below 1"):
        RowWiseOptimizer(w, OptimConfig(name="adam", row_decay_alpha=0.1), 1.5)


@pytest.mark.skipif(not kernels.available(), reason="no C compiler here")
@pytest.mark.parametrize("mode", ["dense", "lazy"])
def test_fused_step_matches_autograd(tiny_synth, mode):
    from oneepoch.training.fused import FusedStep, sgemm_address
    from oneepoch.training.trainer import build, epoch_order, prepare_data

    if sgemm_address() is None:
        pytest.skip("no sgemm_ in this PyTorch")
    cfg = load_config(TrainConfig, "ctr", [f"data.path={tiny_synth}", "batch_size=200",
                                           "optim.row_decay_alpha=0.05",
                                           f"optim.embedding_update={mode}"])
    data = prepare_data(cfg)
    tr = data.splits["train"]
    (m1, o1), (m2, o2) = build(cfg, data), build(cfg, data)
    m1.train(), m2.train()
    batcher = Batcher(tr, cfg.batch_size)
    fast = FusedStep.build(m2, o2, batcher)
    assert fast is not None, FusedStep.why_not(m2, o2, batcher)
    order = epoch_order(len(tr), 0, "every", 0)
    w0 = m1.embedding.weight.detach().clone()
    for rows in list(batcher.epoch_rows(order))[:40]:
        b = batcher.get(rows)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(m1(b), b.label)
        o1.zero_grad()
        loss.backward()
        o1.step()
        fast(rows)
    r1, r2 = o1.sparse["embedding.weight"], o2.sparse["embedding.weight"]
    o1.sync(), o2.sync()
    assert torch.equal(r1.state["last_touch"], r2.state["last_touch"])
    assert int((r1.state["last_touch"] < 15).sum()) > 100  # rows with long gaps
    torch.testing.assert_close(m1.embedding.weight, m2.embedding.weight, rtol=1e-4, atol=2e-5)
    # rows never looked up decayed by the product over the steps of (1 - lr min(1, 0.05 j))
    never = (r1.state["last_touch"] == 0).nonzero().squeeze(1)
    assert len(never) > 0 and r1.step_count == r2.step_count >= 25
    lr = r1.lr
    P = float(np.prod([1 - lr * min(1.0, 0.05 * j) for j in range(1, r1.step_count + 1)]))
    torch.testing.assert_close(m2.embedding.weight.detach()[never], w0[never] * P,
                               rtol=1e-5, atol=1e-9)
