"""Issue 19, item 9: a truncated, empty or garbage ``tensors.safetensors``, a ``state.json`` of
the wrong structure or a tensor of the wrong shape is a one-line error naming the file and
saying what to do (exit code 2 on the command line), never a traceback."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from oneepoch.cli import main
from oneepoch.training.checkpoint import (
    CheckpointError,
    check_state_shapes,
    load_checkpoint,
    save_checkpoint,
)

STATE = {"model": {"emb.weight": torch.arange(12.0).reshape(4, 3), "b": torch.zeros(3)},
         "optim": {"sparse": {}, "dense": {}}, "step": 7, "epoch": 1}


def _ck(tmp_path):
    return save_checkpoint(tmp_path / "checkpoints" / "epoch-001", STATE)


def _truncate(f):
    f.write_bytes(f.read_bytes()[:-5])


@pytest.mark.parametrize("damage", [
    lambda f: f.write_bytes(b""),
    lambda f: f.write_bytes(b"\x00garbage that is not safetensors" * 3),
    _truncate,
    lambda f: f.unlink(),
], ids=["empty", "garbage", "truncated", "missing"])
def test_damaged_tensors_file(tmp_path, damage):
    ck = _ck(tmp_path)
    damage(ck / "tensors.safetensors")
    with pytest.raises(CheckpointError, match=r"epoch-001/tensors\.safetensors: .*damaged: use "
                                              r"another one \(for --resume, delete") as ei:
        load_checkpoint(ck)
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize("state, msg", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object at the top level, got list"),
    (json.dumps({"model": {"__tensor__": "nope"}}), "refers to tensor 'nope'"),
    (json.dumps({"model": {"x": {"__tensor__": ["unhashable"]}}}), "refers to tensor"),
])
def test_bad_state_json(tmp_path, state, msg):
    ck = _ck(tmp_path)
    (ck / "state.json").write_text(state)
    with pytest.raises(CheckpointError, match=r"epoch-001/state\.json: " + msg):
        load_checkpoint(ck)


def test_required_entries(tmp_path):
    ck = _ck(tmp_path)
    got = load_checkpoint(ck, required=("model", "optim.sparse", "step"))
    assert torch.equal(got["model"]["emb.weight"], STATE["model"]["emb.weight"])
    with pytest.raises(CheckpointError, match=r"state\.json: no entry 'optim\.dense\.x'"):
        load_checkpoint(ck, required=("optim.dense.x",))
    with pytest.raises(CheckpointError, match=r"no entry 'torch_rng'"):
        load_checkpoint(ck, required=("torch_rng",))


def test_run_folder_instead_of_checkpoint_is_named(tmp_path):
    ck = _ck(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"this is a run folder: use one of its "
                                                f"checkpoints, e.g. {ck}"):
        load_checkpoint(tmp_path)


def test_check_state_shapes(tmp_path):
    ck = _ck(tmp_path)
    loaded = load_checkpoint(ck)["model"]
    model = torch.nn.Module()
    model.emb = torch.nn.Embedding(4, 3)
    model.register_buffer("b", torch.zeros(3))
    check_state_shapes(model.state_dict(), loaded, ck)  # fits
    model.emb = torch.nn.Embedding(6, 3)
    with pytest.raises(CheckpointError, match=r"epoch-001/tensors\.safetensors: does not fit the "
                                              r"model: 'emb\.weight' has shape \(4, 3\), the "
                                              r"model needs \(6, 3\)"):
        check_state_shapes(model.state_dict(), loaded, ck)
    model.emb2 = torch.nn.Embedding(4, 3)
    with pytest.raises(CheckpointError, match=r"missing \['emb2\.weight'\]"):
        check_state_shapes(model.state_dict(), loaded, ck)
    with pytest.raises(CheckpointError, match=r"unexpected \['b'\]"):
        check_state_shapes({"emb.weight": torch.zeros(4, 3)}, loaded, ck)
    with pytest.raises(CheckpointError, match="not a set of named tensors"):
        check_state_shapes({"emb.weight": torch.zeros(4, 3)}, {"emb.weight": [1]}, ck)


def _train_args(tiny, out):
    return [f"data.path={tiny}", f"out_dir={out}", "progress=false", "threads=1", "epochs=1",
            "batch_size=512"]


def test_cli_init_from_damaged_checkpoint_exits_2(tmp_path, tiny_synth, capsys):
    ck = _ck(tmp_path)
    _truncate(ck / "tensors.safetensors")
    code = main(["train", *_train_args(tiny_synth, tmp_path / "runs"), f"init_from={ck}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "tensors.safetensors" in err and "damaged" in err


def test_cli_resume_from_garbage_checkpoint_exits_2(tmp_path, tiny_synth, capsys):
    run = tmp_path / "run"
    ck = save_checkpoint(run / "checkpoints" / "epoch-001", STATE)
    (ck / "tensors.safetensors").write_bytes(b"garbage" * 40)
    from oneepoch.config import TrainConfig, load_config, to_dict

    cfg = load_config(TrainConfig, None, _train_args(tiny_synth, tmp_path / "runs"))
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    code = main(["train", "--resume", str(run)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "epoch-001/tensors.safetensors" in err


def _engagements(tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "eng"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 400), ("test", 100)):
        pq.write_table(pa.table({"user_id": rng.integers(0, 30, n),
                                 "item_id": rng.integers(0, 50, n)}), data / f"{split}.parquet")
    (data / "schema.yaml").write_text("format: engagements\nuser: user_id\nitem: item_id\n"
                                      "splits: {train: train.parquet, test: test.parquet}\n")
    return data


def test_cli_pretrain_resume_from_truncated_checkpoint_exits_2(tmp_path, capsys):
    from oneepoch.config import load_config, to_dict
    from oneepoch.pretrain import PretrainConfig

    data = _engagements(tmp_path)
    run = tmp_path / "run"
    ck = save_checkpoint(run / "checkpoints" / "epoch-001", STATE)
    _truncate(ck / "tensors.safetensors")
    cfg = load_config(PretrainConfig, "pretrain", [f"data.path={data}", "epochs=2",
                                                   "batch_size=64", "model.dim=4", "threads=1",
                                                   "progress=false"])
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    code = main(["pretrain", "--resume", str(run)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "epoch-001/tensors.safetensors" in err


def _write_dcp(path, tensors):
    """A DCP folder of whole tensors, written by this one process (as the ranks of a sharded
    run write their shards)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(dict(tensors), checkpoint_id=str(path), no_dist=True)


def test_checkpoint_with_dcp_tables_round_trips_and_refuses_a_missing_folder(tmp_path):
    from safetensors import safe_open

    from oneepoch.training.checkpoint import put_tensors, read_dcp

    tables = tmp_path / "checkpoints" / ".tables.tmp"
    _write_dcp(tables, {"model/emb.weight": STATE["model"]["emb.weight"]})
    ck = save_checkpoint(tmp_path / "checkpoints" / "epoch-001", STATE, tables=tables)
    assert not tables.exists() and (ck / "tables.dcp" / ".metadata").is_file()
    with safe_open(str(ck / "tensors.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["model.b"]  # the table is in tables.dcp only
    got = load_checkpoint(ck, required=("model",))
    assert got["tables_dcp"]["shapes"] == {"model/emb.weight": (4, 3)}
    whole = put_tensors(got, read_dcp(got["tables_dcp"]["path"]))
    for k, v in STATE["model"].items():
        assert torch.equal(whole["model"][k], v)
    (ck / "tables.dcp" / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"tables.dcp: missing or incomplete.*damaged"):
        load_checkpoint(ck)


def test_pretrain_resumes_on_one_process_from_dcp_tables(tmp_path, capsys):
    """A checkpoint whose tables and Adagrad accumulators are DCP tensors (as a sharded run
    writes them) resumes on one process, whole: the uninterrupted run's metrics exactly; the
    same checkpoint without its tables.dcp/ is refused as damaged (exit code 2)."""
    from oneepoch.config import load_config
    from oneepoch.pretrain import PretrainConfig, pretrain
    from oneepoch.training.checkpoint import list_checkpoints

    over = [f"data.path={_engagements(tmp_path)}", "epochs=2", "batch_size=64", "model.dim=4",
            "threads=1", "progress=false", "optim.name=adagrad", "optim.lr=0.1",
            f"out_dir={tmp_path}", "checkpoint_keep=0"]
    one = pretrain(load_config(PretrainConfig, "pretrain", [*over, "name=one"]))
    ck = list_checkpoints(one.run_dir)[0]
    state = load_checkpoint(ck)
    held = {"model/user_weight": state["model"]["user_weight"],
            "model/item_weight": state["model"]["item_weight"],
            "optim/sparse/user_weight/square_avg":
                state["optim"]["sparse"]["user_weight"]["square_avg"],
            "optim/sparse/item_weight/square_avg":
                state["optim"]["sparse"]["item_weight"]["square_avg"]}
    assert all(float(v.abs().sum()) > 0 for v in held.values())
    run = tmp_path / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text((one.run_dir / "config.yaml").read_text())
    _write_dcp(run / "checkpoints" / ".tables.tmp", held)
    save_checkpoint(run / "checkpoints" / ck.name, state, tables=run / "checkpoints" /
                    ".tables.tmp")
    cfg = load_config(PretrainConfig, run / "config.yaml", [])
    resumed = pretrain(cfg, run, resume=True)
    assert resumed.metrics == [{**r, "elapsed_s": resumed.metrics[i]["elapsed_s"],
                                "pairs_per_s": resumed.metrics[i]["pairs_per_s"]}
                               for i, r in enumerate(one.metrics)]
    import shutil
    shutil.rmtree(run / "checkpoints" / "epoch-002")
    shutil.rmtree(run / "checkpoints" / ck.name / "tables.dcp")
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tables.dcp: missing" in err, err


def test_truncated_dcp_shard_is_a_damaged_checkpoint(tmp_path):
    from oneepoch.training.checkpoint import read_dcp

    tables = tmp_path / "tables.dcp"
    _write_dcp(tables, {"model/emb.weight": torch.randn(64, 8)})
    shard = next(tables.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"tables.dcp: its sharded tables .* cannot be "
                                              r"read \(.+\); the checkpoint is damaged"):
        read_dcp(tables)


def test_resume_with_another_optimizer_is_refused_before_touching_the_run(tmp_path, tiny_synth,
                                                                          capsys):
    """Adam's moments are not Adagrad's accumulators: one line, exit 2, config.yaml as it was
    (a failed resume used to save the new optimizer into it, so the run could not resume)."""
    runs = tmp_path / "runs"
    assert main(["train", *_train_args(tiny_synth, runs), "name=r"]) == 0
    before = (runs / "r" / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["train", "--resume", str(runs / "r"), "epochs=2", "optim.name=adagrad"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "optim.name=adam" in err and "adagrad" in err
    assert (runs / "r" / "config.yaml").read_text() == before
