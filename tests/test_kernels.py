"""The native CPU kernels against their PyTorch twins (same numbers within float tolerance)."""

import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import train_metrics
from oneepoch import kernels
from oneepoch.config import ModelConfig, OptimConfig
from oneepoch.data.batcher import Batch
from oneepoch.models.embedding import FieldEmbedding
from oneepoch.models.layers import Dice
from oneepoch.training.optim import build_optimizer

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler here")


@pytest.mark.parametrize("shape", [(512, 200), (7, 3), (1, 5)])
def test_dice_matches_reference(shape):
    g = torch.Generator().manual_seed(0)
    a, b = Dice(shape[1]), Dice(shape[1])
    with torch.no_grad():
        a.alpha.normal_(generator=g)
        b.alpha.copy_(a.alpha)
    x = (torch.randn(shape, generator=g) * 2 + 1).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    gy = torch.randn(shape, generator=g)
    y, y2 = a(x), b.reference(x2)
    (y * gy).sum().backward()
    (y2 * gy).sum().backward()
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y, y2, **tol)
    torch.testing.assert_close(x.grad, x2.grad, **tol)
    torch.testing.assert_close(a.alpha.grad, b.alpha.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.running_mean, b.running_mean, **tol)
    torch.testing.assert_close(a.running_var, b.running_var, **tol)
    a.eval()
    b.eval()
    torch.testing.assert_close(a(x), b.reference(x), **tol)


def _fields(bsz=64, seed=0, dim=8):
    g = torch.Generator().manual_seed(seed)
    vocab = {"user": 50, "item": 300, "cate": 20}
    emb = FieldEmbedding(vocab, ["user", "item", "cate", "item", "cate"], n_single=3, dim=dim,
                         init_std=0.1)
    ids = torch.stack([torch.randint(0, n, (bsz,), generator=g) for n in (50, 300, 20)], 1)
    seqs = [torch.randint(0, 300, (bsz, 6), generator=g),
            torch.randint(0, 20, (bsz, 4), generator=g)]
    lens = [torch.randint(0, 7, (bsz,), generator=g), torch.randint(0, 5, (bsz,), generator=g)]
    lens[0][:3] = 0  # empty sequences pool to zeros
    return emb, Batch(ids, seqs, lens, torch.zeros(bsz))


def _dense_grad(emb):
    (rows, leaf), = emb.pending
    emb.pending = []
    out = torch.zeros_like(emb.weight)
    out[rows] = leaf.grad
    return rows, out


@pytest.mark.parametrize("dim", [8, 1])
def test_embedding_pool_and_gradient_match_reference(dim):
    emb, batch = _fields(dim=dim)
    gout = torch.randn(len(batch), emb.n_fields, dim)
    emb.fused = True
    out = emb(batch)
    (out * gout).sum().backward()
    rows, grad = _dense_grad(emb)
    with kernels.disabled():
        ref = emb(batch)
        (ref * gout).sum().backward()
        ref_rows, ref_grad = _dense_grad(emb)
    torch.testing.assert_close(out, ref)
    assert sorted(rows.tolist()) == sorted(ref_rows.tolist())
    assert len(set(rows.tolist())) == len(rows)
    torch.testing.assert_close(grad, ref_grad)
    with torch.no_grad():  # evaluation path (no de-duplication)
        torch.testing.assert_close(emb(batch), ref)
    emb.fused = False  # not fused: the table's own (sparse) gradient, as before
    emb(batch).sum().backward()
    assert emb.weight.grad is not None and emb.weight.grad.is_sparse


def test_embedding_out_of_range_id_is_a_clear_error_and_leaves_no_trace():
    emb, batch = _fields()
    emb.fused = True
    good = emb(batch)
    emb.pending = []
    bad = Batch(batch.ids.clone(), [q.clone() for q in batch.seqs],
                [n.clone() for n in batch.lens], batch.label)
    bad.seqs[0][5, 0] = 10_000
    bad.lens[0][5] = 3
    with pytest.raises(IndexError, match="has ID 10000"):
        emb(bad)
    bad.seqs[0][5, 0] = 0
    bad.lens[0][5] = 99  # longer than the padding
    with pytest.raises(IndexError, match="length"):
        emb(bad)
    assert (emb._slot32 == -1).all()  # the de-duplication scratch is clean again
    torch.testing.assert_close(emb(batch), good)


@pytest.mark.parametrize("over", [dict(embedding_update="lazy"),
                                  dict(embedding_update="lazy", weight_decay=0.1),
                                  dict(), dict(weight_decay=0.1)])  # (dense: the default)
def test_rowwise_adam_matches_reference(over):
    from oneepoch.models.ctr import build_model

    def make():
        torch.manual_seed(0)
        m = build_model(ModelConfig(hidden=[16]), {"user": 50, "item": 300, "cate": 20},
                        ["user", "item", "cate", "item", "cate"], 3)
        o = build_optimizer(m, OptimConfig(**over))
        o.sparse["embedding.weight"].row_lr = torch.linspace(0.1, 1.0, m.embedding.table_rows)
        return m, o

    runs = []
    for native in (True, False):
        m, o = make()
        with kernels.disabled() if not native else contextlib.nullcontext():
            for seed in range(3):
                _, batch = _fields(seed=seed)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    m(batch), torch.rand(len(batch), generator=torch.Generator().manual_seed(seed)))
                o.zero_grad()
                loss.backward()
                o.step()
        runs.append((m.embedding.weight.detach().clone(), o.sparse["embedding.weight"].state))
    (w1, s1), (w2, s2) = runs
    # Dense: a row's catch-up amplifies the paths' step-1 difference of an element whose
    # gradient is below eps (6.7e-8 here: Adam's update is ill-conditioned there) to 1.5e-6.
    atol = 1e-6 if over.get("embedding_update") == "lazy" else 3e-6
    torch.testing.assert_close(w1, w2, rtol=1e-5, atol=atol)
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], rtol=1e-5, atol=1e-7)


def test_short_training_run_matches_pytorch_path(tiny_synth, tmp_path):
    fast = train_metrics(tiny_synth, tmp_path, "native")
    with kernels.disabled():
        ref = train_metrics(tiny_synth, tmp_path, "torch")
    for a, b in zip(fast, ref, strict=True):
        assert a["step"] == b["step"]
        for k in ("test_auc", "test_logloss", "train_auc"):
            assert abs(a[k] - b[k]) < 2e-4, (k, a[k], b[k])


def test_disabled_by_environment_and_missing_compiler_falls_back(tmp_path):
    code = ("import warnings, torch\nfrom oneepoch import kernels\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    print(kernels.available(), any('unavailable' in str(x.message) for x in w))\n"
            "from oneepoch.models.layers import Dice\n"
            "print(tuple(Dice(3)(torch.randn(4, 3)).shape))\n")
    env = {**os.environ, "ONEEPOCH_CACHE": str(tmp_path)}
    off = subprocess.run([sys.executable, "-c", code], env={**env, "ONEEPOCH_NATIVE": "0"},
                         capture_output=True, text=True, check=True).stdout.split("\n")
    assert off[:2] == ["False False", "(4, 3)"]
    nocc = subprocess.run([sys.executable, "-c", code], env={**env, "CC": "/nonexistent/cc"},
                          capture_output=True, text=True, check=True).stdout.split("\n")
    assert nocc[:2] == ["False True", "(4, 3)"]
    built = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    assert built[:2] == ["True False", "(4, 3)"]
    assert len(list((tmp_path / "native").glob("*.so"))) == 1
    assert not list((tmp_path / "native").glob("*.tmp"))


def test_kernels_are_deterministic():
    outs = []
    for _ in range(2):
        emb, batch = _fields(bsz=256)
        emb.fused = True
        (emb(batch) * torch.arange(emb.n_fields * 8.0).view(1, -1, 8)).sum().backward()
        outs.append(_dense_grad(emb))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert np.array_equal(outs[0][0].numpy(), outs[1][0].numpy())


def test_results_do_not_depend_on_thread_count():
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(0)
            emb, batch = _fields(bsz=512)
            emb.fused = True
            d = Dice(emb.n_fields * 8)
            y = d(emb(batch).reshape(len(batch), -1))
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            rows, grad = _dense_grad(emb)
            outs.append((y.detach(), rows, grad, d.alpha.grad))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("in_batch", [True, False])
@pytest.mark.parametrize("with_logq", [False, True])
def test_contrastive_loss_native_softmax_matches_reference(in_batch, with_logq):
    from oneepoch.pretrain.losses import contrastive_loss

    g = torch.Generator().manual_seed(0)
    b, n, d = 300, 200, 16
    logq = torch.rand(b + n, generator=g) if with_logq else None
    pos = torch.randint(0, 50, (b,), generator=g)  # many accidental hits
    cand = torch.cat([pos, torch.randint(0, 50, (n,), generator=g)])
    u0, c0 = torch.randn(b, d, generator=g), torch.randn(b + n, d, generator=g)
    results = []
    for ctx in (contextlib.nullcontext(), kernels.disabled()):
        u, c = u0.clone().requires_grad_(), c0.clone().requires_grad_()
        tau = torch.tensor(0.2, requires_grad=True)
        with ctx:
            loss = contrastive_loss(u, c, tau, pos, cand, logq, in_batch, chunk=64)
            loss.backward()
        results.append((loss.detach(), u.grad, c.grad, tau.grad))
    for a, b_ in zip(*results, strict=True):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-6)


def test_contrastive_loss_same_numbers_at_any_thread_count():
    from oneepoch.pretrain.losses import contrastive_loss

    g = torch.Generator().manual_seed(1)
    b, n, d = 1000, 700, 32  # 16 blocks of 64 rows, the last one short
    pos = torch.randint(0, 300, (b,), generator=g)
    cand = torch.cat([pos, torch.randint(0, 300, (n,), generator=g)])
    u0, c0 = torch.randn(b, d, generator=g), torch.randn(b + n, d, generator=g)
    before, outs = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            u, c = u0.clone().requires_grad_(), c0.clone().requires_grad_()
            loss = contrastive_loss(u, c, torch.tensor(0.1), pos, cand, chunk=64)
            loss.backward()
            outs.append((loss.detach(), u.grad, c.grad))
    finally:
        torch.set_num_threads(before)
    for a, b_ in zip(*outs, strict=True):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("in_batch", [True, False])
@pytest.mark.parametrize("n_ids", [3, 40, 10**9])  # one hot item (past the first room), few, none
def test_accidental_hits_hash_join_matches_sorted_join(in_batch, n_ids):
    from oneepoch.pretrain.losses import accidental_hits

    g = torch.Generator().manual_seed(n_ids)
    b, n = 200, 150
    pos = torch.randint(0, n_ids, (b,), generator=g)
    cand = torch.cat([pos, torch.randint(0, n_ids, (n,), generator=g)])
    r, c = accidental_hits(pos, cand, in_batch)
    with kernels.disabled():
        r0, c0 = accidental_hits(pos, cand, in_batch)
    assert torch.equal(r, torch.sort(r).values)  # rows come out sorted (the blocks rely on it)
    pairs = sorted(zip(r.tolist(), c.tolist(), strict=True))
    assert pairs == sorted(zip(r0.tolist(), c0.tolist(), strict=True))
    assert len(r) == len(r0)


def test_native_coalesce_sums_duplicate_rows():
    from oneepoch.training.optim import coalesce_rows

    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 30, (500,), generator=g)
    vals = torch.randn(500, 8, generator=g)
    rows, sums = coalesce_rows(idx, vals)
    with kernels.disabled():
        rows0, sums0 = coalesce_rows(idx, vals)
    assert len(set(rows.tolist())) == len(rows) == len(rows0)
    order = torch.argsort(rows)
    assert torch.equal(rows[order], rows0)
    torch.testing.assert_close(sums[order], sums0)


@pytest.mark.parametrize("train", [True, False])
def test_fused_mlp_matches_layer_by_layer(train):
    from oneepoch.models.layers import MLP

    torch.manual_seed(0)
    a = MLP(24, [32, 16])
    b = MLP(24, [32, 16])
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        for m in (a, b):
            for i, act in enumerate(m.acts):
                act.alpha.copy_(torch.linspace(-0.5, 0.5, act.alpha.numel()) * (i + 1))
    a.train(train)
    b.train(train)
    x = torch.randn(64, 24)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = torch.randn(64)
    ya = a(xa)
    yb = b.reference(xb)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ya, yb, **tol)
    torch.testing.assert_close(xa.grad, xb.grad, **tol)
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, **tol, msg=n)
    for k, v in a.state_dict().items():  # running statistics too
        torch.testing.assert_close(v, b.state_dict()[k], **tol)


@pytest.mark.parametrize("exclude_seen", [False, True])
def test_ranking_metrics_native_matches_reference(exclude_seen):
    from oneepoch.pretrain.evaluate import ranking_metrics

    g = torch.Generator().manual_seed(0)
    ut = torch.randn(40, 8, generator=g)
    it = torch.randn(300, 8, generator=g).round(decimals=1)  # ties among scores
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 40, 120), rng.integers(1, 300, 120)
    tu, ti = rng.integers(0, 40, 2000), rng.integers(1, 300, 2000)
    kw = dict(ks=[1, 3, 50], tau=0.3, batch_size=16, exclude_seen=exclude_seen, train_user=tu,
              train_item=ti, candidate_start=1)
    fast = ranking_metrics(ut, it, users, items, **kw)
    with kernels.disabled():
        ref = ranking_metrics(ut, it, users, items, **kw)
    assert fast.keys() == ref.keys()
    for k in ref:
        assert fast[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("shape,k", [((5, 1000), 50), ((4, 50), 50), ((3, 17), 3), ((2, 20), 1)])
def test_topk_indices_match_torch_topk(shape, k):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(shape, generator=g).round(decimals=1)  # many ties
    s[0, :5] = float("-inf")
    got = kernels.topk_indices(s, k)
    ref = torch.topk(s, k, dim=1).indices
    assert got.shape == ref.shape
    torch.testing.assert_close(s.gather(1, got), s.gather(1, ref))  # same values, in order
    assert all(len(set(r.tolist())) == k for r in got)  # distinct columns


def test_scratch_is_per_python_thread():
    # native calls release the GIL: two trainings in threads of one process must not share the
    # scratch buffer (the stage-1 blocks keep their logits there)
    import threading

    from oneepoch.pretrain.losses import contrastive_loss

    g = torch.Generator().manual_seed(3)
    cases = []
    for _ in range(2):
        pos = torch.randint(0, 500, (256,), generator=g)
        cand = torch.cat([pos, torch.randint(0, 500, (256,), generator=g)])
        cases.append((torch.randn(256, 16, generator=g), torch.randn(512, 16, generator=g),
                      pos, cand))
    tau = torch.tensor(0.1)
    want = [float(contrastive_loss(u, c, tau, p, q, chunk=64)) for u, c, p, q in cases]
    got: list[list[float]] = [[], []]

    def run(k: int) -> None:
        u, c, p, q = cases[k]
        for _ in range(30):
            got[k].append(float(contrastive_loss(u, c, tau, p, q, chunk=64)))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert kernels.scratch(8).data_ptr() == kernels.scratch(4).data_ptr()  # reused in a thread
    for k in range(2):
        assert got[k] == [want[k]] * 30


@pytest.fixture
def fresh_load(tmp_path, monkeypatch):
    """kernels.lib() loads again, from an empty cache in tmp_path; the session's library is
    restored afterwards. Returns (the new cache folder, the session's ONEEPOCH_CACHE)."""
    from oneepoch.kernels import abi
    session_cache = os.environ.get("ONEEPOCH_CACHE")
    monkeypatch.setenv("ONEEPOCH_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(abi, "_h", abi._h)
    return tmp_path / "native", session_cache


def test_library_reports_the_abi_python_mirrors():
    from oneepoch.kernels import abi
    got = abi.library_abi(kernels.lib())
    assert got == abi.expected_abi()
    assert len(got["CtrStep offsets"]) == len(abi.CtrStep._fields_) > 40


def test_struct_mirror_mismatch_is_refused(monkeypatch):
    from oneepoch.kernels import abi

    class Short(abi.ctypes.Structure):  # a mirror that lost its last field
        _fields_ = abi.CtrStep._fields_[:-1]

    monkeypatch.setattr(abi, "CtrStep", Short)
    with pytest.raises(abi.NativeABIError, match=r"sizeof\(CtrStep\): library \d+, Python"):
        abi.check(kernels.lib(), "the library")


def test_abi_mismatch_of_a_fresh_build_is_an_error_at_load(fresh_load, monkeypatch):
    from oneepoch.kernels import abi
    folder, _ = fresh_load
    monkeypatch.setattr(abi, "MAX_SEQS", abi.MAX_SEQS + 1)
    with pytest.raises(abi.NativeABIError,
                       match=f"MAX_SEQS: library {abi.MAX_SEQS - 1}, Python {abi.MAX_SEQS}.*"
                             "freshly compiled"):
        kernels.lib()
    assert not list(folder.glob("*"))  # the refused library is not published


def test_stale_cached_library_is_rebuilt(fresh_load, monkeypatch):
    from oneepoch.kernels import abi
    folder, session_cache = fresh_load
    with monkeypatch.context() as m:  # this session's library, as a cache would hold it
        if session_cache is None:
            m.delenv("ONEEPOCH_CACHE")
        else:
            m.setenv("ONEEPOCH_CACHE", session_cache)
        cached, publish = kernels._build()
    assert publish is None
    folder.mkdir(parents=True)
    stale = folder / cached.name
    stale.write_bytes(cached.read_bytes())
    real, calls = abi.library_abi, []

    def first_is_stale(handle):  # the cached file reports an older ABI version
        got = real(handle)
        calls.append(1)
        return {**got, "version": got["version"] - 1} if len(calls) == 1 else got

    monkeypatch.setattr(abi, "library_abi", first_is_stale)
    with pytest.warns(RuntimeWarning, match="rebuilding the native kernels.*version"):
        assert kernels.lib() is not None
    assert len(calls) == 2 and abi._h is kernels._lib
    assert [p.name for p in folder.iterdir()] == [stale.name]  # replaced, no temp left
    x = torch.randn(8, 3)
    torch.testing.assert_close(Dice(3)(x), Dice(3).reference(x), rtol=1e-4, atol=1e-5)
