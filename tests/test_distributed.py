"""Training across processes (gloo, 2 ranks on this machine, tiny data).

Tolerances: with SGD and ReLU (no batch statistics), two ranks compute the one-process
numbers up to float summation order: weights within 1e-5, losses within 1e-5, AUC within
1e-4 (a near-tie between two predictions can flip at float precision; GAUC, an average over
small per-user groups, within 2e-3).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from oneepoch.config import TrainConfig, load_config
from oneepoch.data.synthetic import SynthConfig
from oneepoch.distributed import rank_bounds, rank_slice
from oneepoch.runfolder import read_metrics
from oneepoch.training.checkpoint import list_checkpoints, load_checkpoint
from oneepoch.training.trainer import epoch_order, train

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("dist_worker.py")
TIMEOUT_S = 20  # ONEEPOCH_DIST_TIMEOUT in these tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp: Path, specs: list[dict], worlds: list[int] | None = None,
           wait_s: float = 240) -> list[subprocess.CompletedProcess]:
    """Start one worker per spec as ranks 0..n-1 of one run; their results."""
    port, procs = free_port(), []
    for r, spec in enumerate(specs):
        f = tmp / f"spec{r}.json"
        f.write_text(json.dumps(spec))
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r),
               "WORLD_SIZE": str(worlds[r] if worlds else len(specs)),
               "LOCAL_WORLD_SIZE": str(len(specs)), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "ONEEPOCH_DIST_TIMEOUT": str(TIMEOUT_S),
               "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(f)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=wait_s)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append(subprocess.CompletedProcess(p.args, p.returncode, o, e))
    return out


def overrides(data: Path, out: Path, name: str, epochs: int = 2) -> list[str]:
    return [f"data.path={data}", f"out_dir={out}", f"name={name}", "progress=false",
            "threads=1", "batch_size=256", "eval.batch_size=1000", "eval.per_epoch=2",
            f"epochs={epochs}", "model.activation=relu", "optim.name=sgd", "optim.lr=0.5",
            "checkpoint_keep=0"]


def ok(res: list[subprocess.CompletedProcess]) -> None:
    for r in res:
        assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("n,world", [(256, 2), (7, 2), (1, 2), (0, 3), (10, 3), (1000, 7)])
def test_rank_slices_partition_the_global_batch(n, world):
    rows = np.random.default_rng(0).permutation(n + 5)[:n]
    parts = [rank_slice(rows, r, world) for r in range(world)]
    assert np.array_equal(np.concatenate(parts), rows)  # in rank order: the global batch
    sizes = np.diff(rank_bounds(n, world))
    assert sizes.sum() == n and sizes.max() - sizes.min() <= (1 if n else 0)


def torchrec_loads() -> bool:
    try:
        from oneepoch.distributed.plan import require_torchrec
        require_torchrec()
        return True
    except ValueError:
        return False


needs_torchrec = pytest.mark.skipif(not torchrec_loads(), reason="the distributed extra "
                                    "(torchrec + fbgemm-gpu-cpu) is not installed")


def compare_rows(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        for k in ("test_auc", "train_auc"):
            assert abs(x[k] - y[k]) < 1e-4, (k, x, y)
        for k in ("test_gauc", "train_gauc"):
            assert abs(x[k] - y[k]) < 2e-3, (k, x, y)
        for k in ("test_logloss", "train_logloss", "train_loss"):
            if x[k] is not None:
                assert abs(x[k] - y[k]) < 1e-5, (k, x, y)


def whole_checkpoint(path: Path) -> dict:
    """A checkpoint with its DCP tables (if any) read whole into their places."""
    from oneepoch.training.checkpoint import put_tensors, read_dcp

    ck = load_checkpoint(path)
    held = ck.get("tables_dcp")
    return ck if held is None else put_tensors(ck, read_dcp(held["path"]))


@pytest.fixture(scope="module")
def one_process(tiny_synth, tmp_path_factory):
    """The reference: the same settings on one process, uninterrupted."""
    out = tmp_path_factory.mktemp("ws1")
    cfg = load_config(TrainConfig, None, overrides(tiny_synth, out, "ws1"))
    return cfg, train(cfg)


def two_ranks_match(tmp_path: Path, spec: dict, name: str, res1, step_path: str
                    ) -> tuple[Path, dict]:
    """Run ``spec`` on 2 ranks as run ``name``; its metrics must be the one-process run's
    ``res1`` and its summary say 2 ranks on ``step_path``. Returns the run and its plan."""
    ok(launch(tmp_path, [spec, spec]))
    run = tmp_path / name
    compare_rows(read_metrics(run), res1.metrics)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step_path"] == step_path
    return run, json.loads((run / "sharding_plan.json").read_text())


@pytest.mark.slow
def test_two_ranks_match_one_and_use_every_row_once(tiny_synth, tmp_path, one_process):
    cfg1, res1 = one_process
    log = tmp_path / "rows"
    spec = {"overrides": overrides(tiny_synth, tmp_path, "ws2"), "log_rows": str(log)}
    run, plan = two_ranks_match(tmp_path, spec, "ws2", res1, "distributed")
    assert plan["world_size"] == 2
    assert {t["sharding"] for t in plan["tables"].values()} == {"data_parallel"}
    w1 = load_checkpoint(list_checkpoints(res1.run_dir)[-1])["model"]
    w2 = load_checkpoint(list_checkpoints(run)[-1])["model"]
    for k in w1:
        np.testing.assert_allclose(w2[k].numpy(), w1[k].numpy(), atol=1e-5, err_msg=k)
    # every training row once per epoch, split between the ranks
    seen = [np.load(f"{log}.rank{r}.npy") for r in range(2)]
    n = len(seen[0]) + len(seen[1])
    n_train, epochs = 6000, 2
    assert n == n_train * epochs and len(seen[0]) == len(seen[1])
    per_rank_epoch = [s.reshape(epochs, -1) for s in seen]
    for e in range(epochs):
        both = np.concatenate([p[e] for p in per_rank_epoch])
        assert np.array_equal(np.sort(both), np.arange(n_train))
        order = epoch_order(n_train, e, cfg1.shuffle, cfg1.seed)
        assert set(per_rank_epoch[0][e]) == set(np.concatenate(
            [rank_slice(order[a:a + 256], 0, 2) for a in range(0, n_train, 256)]))


@pytest.mark.slow
def test_killed_on_two_resumes_on_one(tiny_synth, tmp_path, one_process):
    _, res1 = one_process
    spec = {"overrides": overrides(tiny_synth, tmp_path, "killed"), "die": {"epoch": 1}}
    res = launch(tmp_path, [spec, spec])
    assert all(r.returncode == 9 for r in res), [r.stderr[-2000:] for r in res]
    run = tmp_path / "killed"
    assert [p.name for p in list_checkpoints(run)] == ["epoch-001"]
    cfg = load_config(TrainConfig, run / "config.yaml", [])
    resumed = train(cfg, run, resume=True)  # one process now
    compare_rows(resumed.metrics, res1.metrics)


@pytest.mark.slow
def test_a_dead_rank_stops_the_other_with_an_error_naming_it(tiny_synth, tmp_path):
    spec = {"overrides": overrides(tiny_synth, tmp_path, "dies", epochs=1),
            "die": {"rank": 1, "step": 5}}
    t = time.time()
    r0, r1 = launch(tmp_path, [spec, spec])
    assert r1.returncode == 3
    assert r0.returncode != 0 and time.time() - t < 60 + TIMEOUT_S
    assert "rank 1" in r0.stderr and "has exited" in r0.stderr, r0.stderr[-2000:]


def test_mismatched_world_size_is_refused(tiny_synth, tmp_path):
    spec = {"overrides": overrides(tiny_synth, tmp_path, "mismatch", epochs=1)}
    res = launch(tmp_path, [spec, spec], worlds=[2, 3], wait_s=120)
    for r in res:
        assert r.returncode != 0
        assert "WORLD_SIZE mismatch" in r.stderr, r.stderr[-2000:]


def stage1_world(tmp_path: Path) -> list[str]:
    """A tiny engagement world; the stage-1 overrides of these tests (SGD)."""
    from oneepoch.data.synthetic import SurfacesConfig, write_multisurface

    world = tmp_path / "world"
    write_multisurface(world, SurfacesConfig(world=SynthConfig(n_users=300, n_items=600, seed=1),
                                             n_train=1_500, n_valid=500, n_test=500,
                                             engagement_ratio=5.0, n_heldout=500))
    return [f"data.path={world / 'engagements'}", "epochs=2", "batch_size=128",
            "loss.n_uniform=64", "model.dim=8", "threads=1", "progress=false",
            "eval.max_pairs=300", "eval.train_pairs=300", "eval.per_epoch=2",
            f"out_dir={tmp_path}", "optim.name=sgd", "optim.lr=0.5"]


@pytest.mark.slow
@pytest.mark.parametrize("shard", ["", pytest.param("table_wise", marks=needs_torchrec)])
def test_stage1_on_two_ranks_matches_one_and_exports_the_same_tables(tmp_path, shard):
    """Replicated tables (row gradients summed across ranks), or tables sharded by TorchRec
    (SGD fused in FBGEMM, in-batch item vectors all-gathered with autograd)."""
    from oneepoch.embeddings import load_embeddings
    from oneepoch.pretrain import PretrainConfig, pretrain

    over = stage1_world(tmp_path)
    one = pretrain(load_config(PretrainConfig, "pretrain", [*over, "name=p1"]))
    spec = {"pretrain": True, "overrides": [*over, "name=p2"], "shard": shard}
    ok(launch(tmp_path, [spec, spec]))
    two = read_metrics(tmp_path / "p2")
    assert [r["step"] for r in two] == [r["step"] for r in one.metrics]
    for x, y in zip(two, one.metrics, strict=True):
        for k in ("test_full_loss", "train_loss", "tau", "test_hit@3", "test_recall@3"):
            if y[k] is not None:
                assert abs(x[k] - y[k]) < 1e-4, (k, x[k], y[k])
    a, b = load_embeddings(one.export_dir), load_embeddings(tmp_path / "p2" / "embeddings")
    for kind in ("user", "item"):
        np.testing.assert_allclose(getattr(b, kind).weight.numpy(),
                                   getattr(a, kind).weight.numpy(), atol=1e-5)
    assert json.loads((tmp_path / "p2" / "summary.json").read_text())["world_size"] == 2
    plan = json.loads((tmp_path / "p2" / "sharding_plan.json").read_text())
    assert {t["sharding"] for t in plan["tables"].values()} == {shard or "data_parallel"}




@pytest.mark.parametrize("args, msg", [
    (["--hbm-gib", "0"], "--hbm-gib 0: must be positive"),
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--world-size", "0"], "--world-size 0: must be >= 1"),
    (["--device", "cpu", "--hbm-gib", "8"], "--hbm-gib: GPU memory")])
def test_plan_refuses_bad_sizes_in_one_line(args, msg, capsys):
    from oneepoch.cli import main
    base = ["plan", "--tables", "item=1e6:8", "--world-size", "2"]
    assert main([*base, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and msg in err


def test_plan_tables_parse_and_refuse_bad_specs():
    from oneepoch.distributed.plan import parse_tables
    assert parse_tables("item=1e9:64, user=100:8") == [("item", 10**9, 64), ("user", 100, 8)]
    for bad in ("item=1e9", "item=1.5:8", "item=10:0", "a=1:1,a=2:2", "", "9x=1:1"):
        with pytest.raises(ValueError, match="--tables"):
            parse_tables(bad)


def _without_torchrec(monkeypatch):
    """Make ``import torchrec`` fail here, as on a machine without the extra."""
    monkeypatch.setitem(sys.modules, "torchrec", None)


def test_plan_without_the_extra_says_what_to_install(capsys, monkeypatch):
    from oneepoch.cli import main
    _without_torchrec(monkeypatch)
    assert main(["plan", "--tables", "item=1e6:8", "--world-size", "2"]) == 2
    assert 'pip install "oneepoch[distributed]"' in capsys.readouterr().err


@needs_torchrec
def test_plan_for_64_gpus_without_a_gpu(tmp_path, capsys):
    from oneepoch.cli import main
    out = tmp_path / "plan.json"
    assert main(["plan", "--tables", "item=1e9:64,user=1e8:64", "--world-size", "64",
                 "--device", "cuda", "--hbm-gib", "80", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "item" in text and "sharding type" in text
    plan = json.loads(out.read_text())
    rows = {t["name"]: sum(s["sizes"][0] for s in t["shards"] if s["offsets"][1] == 0)
            for t in plan["tables"]}
    assert rows == {"item": 10**9, "user": 10**8}  # every row placed exactly once
    assert max(plan["rank_bytes"]) <= 80 * 2**30
    assert sum(plan["rank_bytes"]) == (10**9 + 10**8) * 64 * 4


@needs_torchrec
def test_plan_that_cannot_fit_is_a_clear_error():
    from oneepoch.distributed.plan import plan_tables
    with pytest.raises(ValueError, match="no plan"):
        plan_tables([("item", 10**10, 64)], 2, "cuda", hbm_gib=80)


@pytest.mark.slow
@pytest.mark.parametrize("what", ["ctr", "stage1"])
def test_bench_dist_worker_runs(tiny_synth, tmp_path, what):
    """The benchmark's worker at tiny sizes on its 2-rank distributed path."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_dist.py"), "--worker", what,
           "--path", "dist", "--data", str(tiny_synth), "--steps", "3", "--stage1-rows",
           "2000", "--stage1-batch", "128", "--stage1-steps", "2"]
    port, procs = free_port(), []
    for r in range(2):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "PYTHONPATH": str(ROOT / "src"),
               "ONEEPOCH_DIST_TIMEOUT": str(TIMEOUT_S)}
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=tmp_path))
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    r = json.loads(outs[0][0].strip().splitlines()[-1])
    assert r["world_size"] == 2 and r["step"] == "distributed"
    assert r["samples_per_s" if what == "ctr" else "pairs_per_s"] > 0


@pytest.mark.slow
def test_cli_nproc_runs_torchrun_and_reports_once(tiny_synth, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "ONEEPOCH_DIST_TIMEOUT": "60"}
    r = subprocess.run([sys.executable, "-m", "oneepoch.cli", "train", "--nproc", "2",
                        *overrides(tiny_synth, tmp_path, "cli", epochs=1)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("report: ") == 1  # rank 0 reports; rank 1 stays quiet
    assert "sharding plan: embedding.weight" in r.stdout
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["world_size"] == 2


def test_sharded_tables_refuse_adam_saying_why():
    from oneepoch.distributed.sharded import ShardedTables
    with pytest.raises(ValueError, match="not Adam"):
        ShardedTables(None, [("item", 10, 4)], "adam", 0.1)  # type: ignore[arg-type]


@needs_torchrec
@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["table_wise", "column_wise"])
def test_torchrec_sharded_sgd_step_and_dcp_checkpoint_resharded_to_one(tmp_path, sharding):
    """2 ranks, tables sharded by TorchRec: one SGD step fused into FBGEMM's backward gives the
    one-replica update of the global batch; the DCP checkpoint written on 2 ranks loads whole
    in one process."""
    from safetensors.torch import load_file

    from oneepoch.distributed.sharded import load_tables
    port, procs = free_port(), []
    for r in range(2):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "PYTHONPATH": str(ROOT / "src"), "ONEEPOCH_DIST_TIMEOUT": str(TIMEOUT_S)}
        procs.append(subprocess.Popen([sys.executable, str(WORKER.with_name(
            "dist_sharded_worker.py")), sharding, str(tmp_path)], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    res = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in res]
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert {v["sharding"] for v in plan.values()} == {sharding}
    t = load_file(str(tmp_path / "tables.st"))
    for n in ("user", "item"):
        np.testing.assert_allclose(t[f"got.{n}"].numpy(), t[f"expected.{n}"].numpy(),
                                   atol=1e-6, err_msg=n)
    whole = load_tables(tmp_path / "ck", [("user", 50, 4), ("item", 80, 4)])
    for n in ("user", "item"):
        np.testing.assert_array_equal(whole[n].numpy(), t[f"got.{n}"].numpy())


def test_sharding_asked_without_the_extra_is_a_clear_error(monkeypatch):
    from oneepoch.distributed import DataParallelRun
    _without_torchrec(monkeypatch)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match=r"pip install \"oneepoch\[distributed\]\""):
        DataParallelRun.from_env("cpu", shard_tables="auto")


STAGE1_OPTIM = {"sgd": ["optim.name=sgd", "optim.lr=0.5"],
                "adagrad": ["optim.name=adagrad", "optim.lr=0.1"]}


@needs_torchrec
@pytest.mark.slow
@pytest.mark.parametrize("optim,world", [("sgd", 1), ("sgd", 2), ("adagrad", 1),
                                         ("adagrad", 2), ("adagrad", "2-replicated")])
def test_sharded_stage1_killed_after_epoch_1_on_two_resumes_on_m(tmp_path, optim, world):
    """Epoch 1 on 2 ranks with TorchRec-sharded tables, killed; the checkpoint holds the
    tables and FBGEMM's Adagrad accumulators as DCP shards (not in the safetensors file);
    epoch 2 on 2 ranks (sharded, each reads its shards; or replicated, each reads them whole)
    or on one process (whole tables and accumulators from DCP): the metrics and export of an
    uninterrupted one-process run (sharded SGD and Adagrad apply oneepoch's rules) within
    1e-4."""
    from safetensors import safe_open

    from oneepoch.embeddings import load_embeddings
    from oneepoch.pretrain import PretrainConfig, pretrain

    over = [*stage1_world(tmp_path), *STAGE1_OPTIM[optim]]
    one = pretrain(load_config(PretrainConfig, "pretrain", [*over, "name=p1"]))
    spec = {"pretrain": True, "overrides": [*over, "name=p2"], "shard": "table_wise",
            "die": {"epoch": 1}}
    res = launch(tmp_path, [spec, spec])
    assert all(r.returncode == 9 for r in res), [r.stderr[-2000:] for r in res]
    run = tmp_path / "p2"
    [ck] = list_checkpoints(run)
    held = json.loads((ck / "state.json").read_text())["tables_dcp"]["tensors"]
    assert sorted(held) == sorted(["model/user_weight", "model/item_weight"] + (
        ["optim/sparse/user_weight/square_avg", "optim/sparse/item_weight/square_avg"]
        if optim == "adagrad" else []))
    assert (ck / "tables.dcp" / ".metadata").is_file()
    with safe_open(str(ck / "tensors.safetensors"), "pt") as f:
        assert not any(k.endswith(("user_weight", "item_weight", "square_avg"))
                       for k in f.keys())  # noqa: SIM118 - safe_open has no __iter__
    if world == "2-replicated":
        ok(launch(tmp_path, [{**spec, "die": None, "resume": True, "shard": ""}] * 2))
        rows = read_metrics(run)
    elif world == 2:  # SGD: resumed with another sharding type (DCP reshards)
        shard = "column_wise" if optim == "sgd" else "table_wise"
        res = launch(tmp_path, [{**spec, "die": None, "resume": True, "shard": shard}] * 2)
        ok(res)
        rows = read_metrics(run)
        held = [json.loads(r.stdout.strip().splitlines()[-1])["table_rows"] for r in res]
        whole = load_checkpoint(list_checkpoints(one.run_dir)[-1])["model"]
        assert held == [{k: whole[k].shape[0] for k in ("user_weight", "item_weight")},
                        {"user_weight": 0, "item_weight": 0}]  # rank 0's mirror only
    else:
        cfg = load_config(PretrainConfig, run / "config.yaml", [])
        rows = pretrain(cfg, run, resume=True).metrics
    assert [r["step"] for r in rows] == [r["step"] for r in one.metrics]
    for x, y in zip(rows, one.metrics, strict=True):
        for k in ("test_full_loss", "train_loss", "tau", "test_hit@3"):
            if y[k] is not None:
                assert abs(x[k] - y[k]) < 1e-4, (k, x["step"], x[k], y[k])
    a, b = load_embeddings(one.export_dir), load_embeddings(run / "embeddings")
    for kind in ("user", "item"):
        np.testing.assert_allclose(getattr(b, kind).weight.numpy(),
                                   getattr(a, kind).weight.numpy(), atol=1e-4)


@needs_torchrec
@pytest.mark.slow
def test_one_process_checkpoint_resumes_sharded_on_two(tmp_path):
    """Epoch 1 on one process (Adagrad), epoch 2 on 2 ranks with sharded tables: the tables and
    the Adagrad accumulators are pushed into the shards; the uninterrupted run's metrics."""
    from oneepoch.pretrain import PretrainConfig, pretrain

    over = [*stage1_world(tmp_path), *STAGE1_OPTIM["adagrad"]]
    one = pretrain(load_config(PretrainConfig, "pretrain", [*over, "name=p1"]))
    pretrain(load_config(PretrainConfig, "pretrain", [*over, "name=p2", "epochs=1"]))
    spec = {"pretrain": True, "overrides": [*over, "name=p2"], "shard": "table_wise",
            "resume": True}
    ok(launch(tmp_path, [spec, spec]))
    rows = read_metrics(tmp_path / "p2")
    assert [r["step"] for r in rows] == [r["step"] for r in one.metrics]
    for x, y in zip(rows, one.metrics, strict=True):
        for k in ("test_full_loss", "train_loss", "tau", "test_hit@3"):
            if y[k] is not None:
                assert abs(x[k] - y[k]) < 1e-4, (k, x["step"], x[k], y[k])


@pytest.mark.parametrize("setting, msg", [
    ("select.metric=test_hit@3", "select.metric: not supported with --shard-tables"),
    ("optim.name=adam", "optim.name='adam': FBGEMM's CPU kernels fuse"),
    ("loss.type=bce", "loss.type / loss.in_batch: stage 1 on sharded tables")])
def test_sharded_stage1_refuses_what_it_cannot_run_before_writing(tmp_path, setting, msg):
    from types import SimpleNamespace

    from oneepoch.pretrain import PretrainConfig, pretrain
    from oneepoch.remedies.early_stopping import select_hook

    cfg = load_config(PretrainConfig, "pretrain", [*stage1_world(tmp_path), "name=sel",
                                                   setting])
    from oneepoch.distributed import DataParallelRun
    dp = SimpleNamespace(shard_tables="table_wise", run_dir=lambda p: p,
                         set_threads=lambda t: None, fail=lambda e: None,
                         check_stage1=DataParallelRun(None, "table_wise").check_stage1)
    with pytest.raises(ValueError, match=msg):
        pretrain(cfg, parallel=dp, hooks=[select_hook(cfg)])
    assert not (tmp_path / "sel").exists()


@needs_torchrec
@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["table_wise", "column_wise"])
def test_train_with_sharded_tables_matches_one_process(tiny_synth, tmp_path, one_process,
                                                       sharding):
    """``train --shard-tables`` on 2 ranks (one TorchRec table per vocabulary, SGD fused in
    FBGEMM) gives the one-process replicated run's metrics and weights, within the module's
    tolerances (float summation order); the plan file places every vocabulary's table."""
    _, res1 = one_process
    spec = {"overrides": overrides(tiny_synth, tmp_path, "sh2"), "shard": sharding}
    run, plan = two_ranks_match(tmp_path, spec, "sh2", res1, "distributed-sharded")
    vocabs = ["user_age", "user_gender", "item_ID", "item_cate", "scene_ID"]
    assert plan["asked"] == sharding and sorted(plan["tables"]) == sorted(vocabs)
    for t in plan["tables"].values():
        assert t["sharding"] == sharding and set(t["ranks"]) <= {0, 1} and t["ranks"]
        assert {s["rank"] for s in t["shards"]} == set(t["ranks"])
    if sharding == "table_wise":  # whole tables, spread over both ranks
        assert {r for t in plan["tables"].values() for r in t["ranks"]} == {0, 1}
    # the checkpoints hold the whole table (the shards, DCP), as one process's
    w1 = load_checkpoint(list_checkpoints(res1.run_dir)[-1])["model"]
    w2 = whole_checkpoint(list_checkpoints(run)[-1])["model"]
    assert set(w1) == set(w2)
    for k in w1:
        np.testing.assert_allclose(w2[k].numpy(), w1[k].numpy(), atol=1e-5, err_msg=k)


@needs_torchrec
@pytest.mark.slow
def test_train_sharded_on_two_stopped_after_epoch_1_resumes_on_one(tiny_synth, tmp_path,
                                                                   one_process):
    """Epoch 1 on 2 ranks with sharded tables (its checkpoint: the mirror of the shards),
    epoch 2 on one process: the uninterrupted one-process run's metrics (SGD)."""
    _, res1 = one_process
    spec = {"overrides": overrides(tiny_synth, tmp_path, "shk"), "die": {"epoch": 1},
            "shard": "table_wise"}
    res = launch(tmp_path, [spec, spec])
    assert all(r.returncode == 9 for r in res), [r.stderr[-2000:] for r in res]
    run = tmp_path / "shk"
    cfg = load_config(TrainConfig, run / "config.yaml", [])
    compare_rows(train(cfg, run, resume=True).metrics, res1.metrics)


CTR_ADAGRAD = ["optim.name=adagrad", "optim.lr=0.05"]
CTR_TABLES = ["model/embedding.weight", "optim/sparse/embedding.weight/square_avg"]


@needs_torchrec
@pytest.mark.slow
@pytest.mark.parametrize("resume_on", ["2-column_wise", "1"])
def test_train_sharded_adagrad_killed_after_epoch_1_resumes_on_2_or_1(tiny_synth, tmp_path,
                                                                      resume_on):
    """``train --shard-tables`` with Adagrad on 2 ranks (table-wise), killed after epoch 1: the
    checkpoint holds the table and FBGEMM's Adagrad accumulators as DCP shards under the
    one-process checkpoint's names (not in the safetensors file); epoch 2 on 2 ranks (sharded
    column-wise: DCP reshards) or on one process (whole, into oneepoch's Adagrad) gives the
    metrics of the uninterrupted 2-rank sharded run within the module's tolerances. Without
    the accumulators (a fresh Adagrad state) the resumed run differs. A checkpoint whose
    tables.dcp is gone is refused as damaged."""
    import shutil

    from safetensors import safe_open

    from oneepoch.training.checkpoint import CheckpointError

    def spec(name: str, **kw) -> dict:
        return {"overrides": [*overrides(tiny_synth, tmp_path, name), *CTR_ADAGRAD],
                "shard": "table_wise", **kw}

    ok(launch(tmp_path, [spec("ref")] * 2))
    ref = read_metrics(tmp_path / "ref")
    res = launch(tmp_path, [spec("k", die={"epoch": 1})] * 2)
    assert all(r.returncode == 9 for r in res), [r.stderr[-2000:] for r in res]
    run = tmp_path / "k"
    [ck] = list_checkpoints(run)
    assert json.loads((ck / "state.json").read_text())["tables_dcp"]["tensors"] == CTR_TABLES
    with safe_open(str(ck / "tensors.safetensors"), "pt") as f:
        assert not any(k.endswith(("embedding.weight", "square_avg"))
                       for k in f.keys())  # noqa: SIM118 - safe_open has no __iter__
    assert whole_checkpoint(ck)["optim"]["sparse"]["embedding.weight"]["square_avg"].sum() > 0
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    shutil.rmtree(damaged / "checkpoints" / ck.name / "tables.dcp")
    cfg = load_config(TrainConfig, run / "config.yaml", [])
    with pytest.raises(CheckpointError, match="tables.dcp: missing or incomplete"):
        train(cfg, damaged, resume=True)
    if resume_on == "1":
        rows = train(cfg, run, resume=True).metrics
    else:
        res = launch(tmp_path, [{**spec("k"), "shard": "column_wise", "resume": True}] * 2)
        ok(res)
        rows = read_metrics(run)
        held = [json.loads(r.stdout.strip().splitlines()[-1])["table_rows"] for r in res]
        n = whole_checkpoint(ck)["model"]["embedding.weight"].shape[0]
        assert held == [{"embedding.weight": n}, {"embedding.weight": 0}]  # rank 0's mirror
    compare_rows(rows, ref)


@needs_torchrec
@pytest.mark.slow
def test_train_sharded_with_early_stopping_and_the_collapse_probe(tiny_synth, tmp_path):
    """Hooks that read the model's table run on every rank while only rank 0 holds it whole:
    early stopping (its best weights restored at the end; min_delta=1 keeps the initial point,
    taken before the table went into the shards, so rank 1's best weights are whole while its
    table has 0 rows) and the collapse probe; the metrics file (rank 0's) has the probe's
    values and the selection."""
    over = [*overrides(tiny_synth, tmp_path, "es"), "data.valid_share=0.2",
            "early_stop.metric=auc", "early_stop.min_delta=1"]
    spec = {"overrides": over, "shard": "table_wise", "config_hooks": True}
    ok(launch(tmp_path, [spec, spec]))
    rows = read_metrics(tmp_path / "es")
    assert all(np.isfinite(r["ia_item_ID"]) and r["selected_step"] == 0 for r in rows)
    assert (tmp_path / "es" / "checkpoints" / "final" / "state.json").is_file()


@needs_torchrec
@pytest.mark.parametrize("setting,says", [
    ("optim.name=adam", r"optim.name='adam'.*not Adam.*drop --shard-tables"),
    ("meda.enabled=true", r"meda: re-initialises table rows.*drop --shard-tables"),
    ("freq_lr.threshold=5", r"freq_lr: scales each row's learning rate"),
    ("optim.momentum=0.9", r"optim.momentum=0.9: FBGEMM's fused sgd"),
    ("model.type=lr", r"multiple of 4")])
def test_train_sharded_refuses_what_it_cannot_run_before_writing(tiny_synth, tmp_path,
                                                                  monkeypatch, setting, says):
    """Adam, the remedies' per-row rules (and other settings the fused tables lack) are a
    clear error naming the setting, raised before the run folder is written."""
    from oneepoch.distributed import DataParallelRun
    from oneepoch.remedies import hooks_from_config

    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                 "ONEEPOCH_DIST_TIMEOUT": str(TIMEOUT_S)}.items():
        monkeypatch.setenv(k, v)
    cfg = load_config(TrainConfig, None, [*overrides(tiny_synth, tmp_path, "refused"), setting])
    par = DataParallelRun.from_env("cpu", shard_tables="auto")
    try:
        with pytest.raises(ValueError, match=says):
            train(cfg, hooks=hooks_from_config(cfg), parallel=par)
    finally:
        par.close()
    assert not (tmp_path / "refused").exists()


@needs_torchrec
def test_shard_tables_without_a_distributed_launch_is_a_clear_error(monkeypatch):
    from oneepoch.distributed import DataParallelRun
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="--shard-tables auto: shards the ID tables .* "
                       "--nproc N or torchrun"):
        DataParallelRun.from_env("cpu", shard_tables="auto")


def test_sharded_ctr_step_refuses_the_update_norm_probe():
    """The update-norm probe reads the optimizer's applied updates: on sharded tables FBGEMM
    applies them inside backward, so the step refuses it (naming the probe)."""
    from oneepoch.config import ModelConfig, OptimConfig
    from oneepoch.distributed.sharded_ctr import ShardedCTRStep
    from oneepoch.models.ctr import build_model
    from oneepoch.training.optim import build_optimizer

    model = build_model(ModelConfig(), {"item": 10}, ["item"], n_single=1)
    opt = build_optimizer(model, OptimConfig(name="sgd"))
    opt.track_updates = True
    with pytest.raises(ValueError, match="update-norm probe"):
        ShardedCTRStep(None, model, opt, None)  # type: ignore[arg-type]


def test_nproc_checks_the_settings_once_before_launching(tiny_synth, tmp_path, capsys):
    """Bad settings (and sharding what FBGEMM cannot fuse) stop ``--nproc`` in the parent:
    one error, exit 2, no rank started, no run folder."""
    from oneepoch.cli import main
    base = [f"data.path={tiny_synth}", f"out_dir={tmp_path}", "name=never"]
    assert main(["train", "--nproc", "2", *base, "epochs=0"]) == 2
    assert main(["train", "--nproc", "0", *base]) == 2
    assert main(["pretrain", "--nproc", "2", "epochs=0", f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("'epochs': got 0") == 2 and "--nproc: 0" in err
    assert main(["train", "--nproc", "2", *base, "device=cuda:7"]) == 2  # not on this machine
    assert "device=cuda:7" in capsys.readouterr().err
    if torchrec_loads():
        assert main(["train", "--nproc", "2", "--shard-tables", "auto", *base]) == 2
        assert capsys.readouterr().err.count("optim.name='adam'") == 1
    assert not (tmp_path / "never").exists()
