"""One rank of a sharded-table test (tests/test_distributed.py; needs the distributed extra):
``python dist_sharded_worker.py SHARDING OUT_DIR``. Sets the tables from seeded whole tensors,
trains one SGD step of a linear loss on this rank's slice of a global batch through TorchRec
(the update fused into backward), then rank 0 writes the whole tables after the step (and the
expected ones, computed on a whole replica) as safetensors, and every rank saves its shards
with torch.distributed.checkpoint into OUT_DIR/ck."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from oneepoch.distributed import DataParallelRun
from oneepoch.distributed.parallel import rank_bounds

TABLES = [("user", 50, 4), ("item", 80, 4)]
LR, B = 0.5, 9


def main() -> None:
    sharding, out = sys.argv[1], Path(sys.argv[2])
    dp = DataParallelRun.from_env("cpu", 1)
    assert dp is not None
    from oneepoch.distributed.sharded import ShardedTables

    ctx = dp.ctx
    t = ShardedTables(ctx, TABLES, "sgd", LR, sharding)
    g = torch.Generator().manual_seed(0)
    full = {n: torch.randn(r, d, generator=g) for n, r, d in TABLES}
    t.load_full(full)
    ids = {n: torch.randint(0, r, (B,), generator=g) for n, r, _ in TABLES}
    w = torch.randn(4, generator=g)
    bnd = rank_bounds(B, ctx.world_size)
    a, b = int(bnd[ctx.rank]), int(bnd[ctx.rank + 1])
    vec = t.lookup({n: ids[n][a:b] for n in ids})
    loss = sum((vec[n] @ w).sum() for n in ids) / B  # this rank's share of the batch mean
    (loss * t.grad_scale).backward()
    got = {n: t.gather_full(n) for n, _, _ in TABLES}
    t.save(out / "ck")
    if ctx.rank == 0:
        exp = {}
        for n in ids:
            e = full[n].clone()
            e.index_add_(0, ids[n], (-LR / B) * w.expand(B, 4))
            exp[f"expected.{n}"] = e
        save_file({**{f"got.{n}": v for n, v in got.items()}, **exp}, str(out / "tables.st"))
        import json
        (out / "plan.json").write_text(json.dumps(t.plan_dict()))
    dp.close()


if __name__ == "__main__":
    main()
