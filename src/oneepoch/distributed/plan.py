"""TorchRec's sharding plan for ID tables on a topology that need not exist here.

``oneepoch plan --tables item=1e9:64,user=1e8:64 --world-size 64 --device cuda --hbm-gib 80``
builds the tables on the ``meta`` device (no memory), runs TorchRec's
``EmbeddingShardingPlanner`` on ``Topology(world_size, compute_device, hbm_cap, ...)`` and
returns the plan: per table its sharding type (table-wise, row-wise, table-row-wise,
column-wise, data-parallel), compute kernel and ranks, and per rank the bytes of the table
shards it would hold, plus TorchRec's own memory and cost estimates.

    >>> parse_tables("item=1e9:64,user=1e8:32")
    [('item', 1000000000, 64), ('user', 100000000, 32)]
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

INSTALL = ('pip install "oneepoch[distributed]" (TorchRec 1.8.0 with FBGEMM); on a machine '
           "without a GPU then: pip uninstall -y fbgemm_gpu && pip install --no-deps "
           "fbgemm-gpu-cpu==1.8.0 (see docs/distributed.md)")


class MissingExtra(ValueError):
    """TorchRec / FBGEMM is not installed (or does not load)."""


def require_torchrec() -> None:
    """Import TorchRec, or raise a :class:`MissingExtra` saying what to install."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import fbgemm_gpu  # noqa: F401
            import torchrec  # noqa: F401
    except Exception as e:  # ImportError, or OSError "Could not load this library"
        raise MissingExtra(f"sharded ID tables need TorchRec and FBGEMM, which do not load "
                           f"here ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                           f"install them: {INSTALL}") from None


def parse_tables(spec: str) -> list[tuple[str, int, int]]:
    """``name=rows:dim,...`` (rows may be written 1e9) into ``[(name, rows, dim)]``."""
    out: list[tuple[str, int, int]] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = re.fullmatch(r"([A-Za-z_][\w]*)=([0-9.eE+]+):([0-9]+)", part)
        if not m:
            raise ValueError(f"--tables: {part!r} is not name=rows:dim (e.g. item=1e9:64)")
        rows_f = float(m.group(2))
        if rows_f < 1 or rows_f != int(rows_f):
            raise ValueError(f"--tables: {part!r}: rows must be a positive integer")
        dim = int(m.group(3))
        if dim < 1:
            raise ValueError(f"--tables: {part!r}: dim must be >= 1")
        if m.group(1) in {t[0] for t in out}:
            raise ValueError(f"--tables: table {m.group(1)!r} given twice")
        out.append((m.group(1), int(rows_f), dim))
    if not out:
        raise ValueError("--tables: no table given (e.g. item=1e9:64,user=1e8:64)")
    return out


@dataclass
class TablePlan:
    name: str
    rows: int
    dim: int
    sharding: str
    kernel: str
    ranks: list[int]
    shards: list[dict[str, Any]]  # {"rank", "offsets", "sizes"}


@dataclass
class Plan:
    world_size: int
    device: str
    tables: list[TablePlan]
    rank_bytes: list[int]  # table-shard weights per rank (fp32)
    torchrec_text: str  # TorchRec's own rendering of the plan
    stats_text: str = ""  # TorchRec's planner statistics (memory and cost per rank)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "device": self.device, "settings": self.settings,
                "tables": [t.__dict__ for t in self.tables], "rank_bytes": self.rank_bytes}

    def summary(self) -> str:
        """The plan per table, and per rank the GiB of table shards it holds."""
        lines = [f"TorchRec sharding plan: {len(self.tables)} table(s) on {self.world_size} "
                 f"{self.device} rank(s)"]
        for t in self.tables:
            rk = t.ranks if len(t.ranks) <= 8 else f"{t.ranks[:4]}..{t.ranks[-1]} ({len(t.ranks)})"
            lines.append(f"  {t.name}: {t.rows:,} x {t.dim} ({t.rows * t.dim * 4 / 2**30:.1f} "
                         f"GiB fp32) -> {t.sharding}, kernel {t.kernel}, ranks {rk}")
        lines.append("table-shard weights per rank (GiB, fp32; optimizer state and buffers "
                     "come on top, see TorchRec's estimate below):")
        groups: dict[float, list[int]] = {}
        for r, b in enumerate(self.rank_bytes):
            groups.setdefault(round(b / 2**30, 3), []).append(r)
        for gib, ranks in sorted(groups.items(), reverse=True):
            lines.append(f"  {gib:9.3f} GiB on {_ranges(ranks)}")
        return "\n".join(lines)


def _ranges(ranks: list[int]) -> str:
    out, a = [], ranks[0]
    for prev, r in zip(ranks, [*ranks[1:], None], strict=True):
        if r != prev + 1 if r is not None else True:
            out.append(f"{a}" if a == prev else f"{a}-{prev}")
            a = r
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(out)


def plan_tables(tables: list[tuple[str, int, int]], world_size: int, device: str = "cuda",
                hbm_gib: float | None = None, ddr_gib: float | None = None,
                local_world_size: int | None = None, batch_size: int = 512) -> Plan:
    """Run TorchRec's planner for ``tables`` on a topology of ``world_size`` ranks (no GPU or
    process group needed: the tables live on the ``meta`` device)."""
    if world_size < 1:
        raise ValueError(f"--world-size: {world_size} (need >= 1)")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"--device: {device!r} (choose cuda or cpu)")
    require_torchrec()
    import torch

    with warnings.catch_warnings():  # FBGEMM's import warns about modules it lacks on CPU
        warnings.simplefilter("ignore")
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
        from torchrec.distributed.planner.stats import EmbeddingStats
        from torchrec.modules.embedding_configs import EmbeddingBagConfig
        from torchrec.modules.embedding_modules import EmbeddingBagCollection

    lws = local_world_size or min(world_size, 8 if device == "cuda" else 1)
    kw: dict[str, Any] = {"world_size": world_size, "compute_device": device,
                          "local_world_size": lws}
    if hbm_gib is not None:
        kw["hbm_cap"] = int(hbm_gib * 2**30)
    if ddr_gib is not None:
        kw["ddr_cap"] = int(ddr_gib * 2**30)
    ebc = EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name=n, embedding_dim=d, num_embeddings=r,
                                   feature_names=[n]) for n, r, d in tables],
        device=torch.device("meta"))
    quiet = [logging.getLogger(f"torchrec.distributed.planner.{m}")
             for m in ("types", "storage_reservations", "planners", "enumerators")]
    levels = [q.level for q in quiet]
    for q in quiet:  # warnings about building a topology by hand, dry-run estimates
        q.setLevel(logging.ERROR)
    log = logging.getLogger("torchrec.distributed.planner.stats")
    buf, handler = io.StringIO(), None
    handler = logging.StreamHandler(buf)
    old_level, old_prop = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            planner = EmbeddingShardingPlanner(topology=Topology(**kw), batch_size=batch_size,
                                               stats=[EmbeddingStats()])
            try:
                plan = planner.plan(ebc, [EmbeddingBagCollectionSharder()])
            except Exception as e:  # the planner's "no plan fits" errors are long
                cap = hbm_gib if device == "cuda" else ddr_gib
                raise ValueError(
                    f"TorchRec's planner found no plan for {world_size} {device} ranks "
                    f"({'HBM' if device == 'cuda' else 'DDR'} per rank: "
                    f"{'default' if cap is None else f'{cap:g} GiB'}): "
                    f"{str(e).splitlines()[0][:400]}") from e
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        log.propagate = old_prop
        for q, lv in zip(quiet, levels, strict=True):
            q.setLevel(lv)
    stats = "\n".join(ln.rstrip().rstrip("#").rstrip() for ln in buf.getvalue().splitlines())
    mod_plan = plan.plan.get("", next(iter(plan.plan.values())) if plan.plan else {})
    dims = {n: (r, d) for n, r, d in tables}
    out, rank_bytes = [], [0] * world_size
    for name, ps in mod_plan.items():
        shards = []
        if ps.sharding_spec is not None:
            for sh in ps.sharding_spec.shards:
                rank = sh.placement.rank()
                shards.append({"rank": rank, "offsets": list(sh.shard_offsets),
                               "sizes": list(sh.shard_sizes)})
                rank_bytes[rank] += int(sh.shard_sizes[0]) * int(sh.shard_sizes[1]) * 4
        else:  # data-parallel: a full copy on every rank
            for r in range(world_size):
                rank_bytes[r] += dims[name][0] * dims[name][1] * 4
        out.append(TablePlan(name, dims[name][0], dims[name][1], str(ps.sharding_type),
                             str(ps.compute_kernel), sorted(ps.ranks or range(world_size)),
                             shards))
    return Plan(world_size, device, out, rank_bytes, str(plan), stats,
                {k: v for k, v in kw.items()})
