"""The phenomenon itself, end to end on a small seeded synthetic world (fast config)."""

import pytest

from oneepoch.config import TrainConfig, load_config
from oneepoch.training.trainer import train


@pytest.mark.slow
def test_dnn_drops_at_epoch_2_and_lr_does_not(small_synth, tmp_path):
    common = [f"data.path={small_synth}", f"out_dir={tmp_path}", "progress=false", "threads=1",
              "epochs=2", "batch_size=256", "eval.per_epoch=10", "eval.at_start=false"]
    dnn = train(load_config(TrainConfig, None, [*common, "name=dnn"]))
    lr = train(load_config(TrainConfig, None, [*common, "name=lr", "model.type=lr",
                                               "optim.lr=0.01"]))
    assert dnn.verdict.phenomenon and dnn.verdict.at_epoch == 2, dnn.verdict.line()
    # (in this small world the DNN recovers within epoch 2: only the drop is asserted)
    assert not lr.verdict.phenomenon and lr.verdict.drop < 0.003, lr.verdict.line()
    # train AUC jumps at the same moment
    tr = {round(r["epoch"], 2): r["train_auc"] for r in dnn.metrics}
    assert tr[1.1] - tr[1.0] > 0.02
