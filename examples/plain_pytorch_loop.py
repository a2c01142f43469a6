"""Your own PyTorch model and loop, with oneepoch's monitor: evaluation inside the epoch, the
best point's weights, early stopping and the one-epoch verdict, in the run folder
``oneepoch train`` writes (``oneepoch report`` overlays it with other runs).

    python examples/plain_pytorch_loop.py --out runs/plain

Runs as is on oneepoch's built-in synthetic data (made in ``OUT/data`` on first use), or on a
data-set folder of yours (``--data DIR``, see docs/data.md). The model below is plain PyTorch:
one embedding table per ID field and an MLP; it does not know oneepoch, so the monitor is
handed an adapter from oneepoch's batches to the model's input (the ID matrix).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from oneepoch.data.batcher import Batcher
from oneepoch.data.dataset import load_ctr
from oneepoch.data.synthetic import SynthConfig
from oneepoch.monitor import Monitor, folder_eval_sets


class MyModel(nn.Module):
    """Embedding & MLP over single-ID fields: ``ids`` [B, fields] -> logits [B]."""

    def __init__(self, vocab_sizes: list[int], dim: int = 8, hidden: int = 64) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(n, dim) for n in vocab_sizes)
        for t in self.tables:
            nn.init.normal_(t.weight, std=0.01)
        self.mlp = nn.Sequential(nn.Linear(dim * len(vocab_sizes), hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = torch.cat([t(ids[:, k]) for k, t in enumerate(self.tables)], dim=1)
        return self.mlp(x)[:, 0]


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/plain", help="output folder (run: OUT/run)")
    ap.add_argument("--data", help="a CTR data-set folder (default: built-in synthetic data)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--patience", type=int, default=0, help="early stopping (0 = never)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.data is None:
        from oneepoch.recipes.demo import ensure_synthetic

        ensure_synthetic(out / "data", SynthConfig(n_users=5_000, n_items=20_000,
                                                   n_train=40_000, n_test=10_000, seed=0))
    folder = args.data or out / "data"
    data = load_ctr(folder)
    train = Batcher(data.splits["train"], batch_size=512)
    torch.manual_seed(0)
    model = MyModel([data.vocab_sizes[data.field_vocab(f)] for f in data.single_fields])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    # ---- the loop, with the monitor (the README's 15 lines) --------------------------------
    mon = Monitor(out / "run", steps_per_epoch=train.steps(), epochs=args.epochs,
                  eval_sets=folder_eval_sets(folder, train_rows=10_000), model=model,
                  adapter=lambda batch: batch.ids, patience=args.patience, batch_size=512)
    for epoch in range(args.epochs):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch))
        for batch in train.epoch(order.numpy()):
            loss = F.binary_cross_entropy_with_logits(model(batch.ids), batch.label)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if mon.step(loss):  # evaluates 20 times an epoch; True once early stopping fires
                break
        if mon.should_stop:
            break
    best = mon.restore_best()  # the best point's weights, bit for bit
    verdict = mon.finish()  # metrics.parquet, summary.json, curves.png, report.html
    # ----------------------------------------------------------------------------------------
    print(verdict.line())
    print(f"best test AUC {best['test_auc']:.4f} at epoch {best['epoch']:.2f} (restored)")
    print(f"run: {mon.run_dir}\nreport: {mon.run_dir / 'report.html'}")
    return mon.run_dir


if __name__ == "__main__":
    main()
