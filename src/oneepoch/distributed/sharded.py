"""ID tables sharded across ranks by TorchRec (``DistributedModelParallel`` over an
``EmbeddingBagCollection``), with the optimizer fused into FBGEMM's backward pass, and
checkpoints through ``torch.distributed.checkpoint`` (which reshards on load).

Used by stage 1's sharded step (:class:`~oneepoch.distributed.stage1.ShardedStage1`,
``pretrain --shard-tables``: one feature per table, one ID per bag) and the CTR model's
(:class:`~oneepoch.distributed.sharded_ctr.ShardedCTRStep`, ``train --shard-tables``: one
table per vocabulary, whose features are the fields using it, mean-pooled bags of any length
through :meth:`ShardedTables.lookup_bags`).

    >>> t = ShardedTables(ctx, [("user", 10**6, 64)], "sgd", 0.1)  # doctest: +SKIP
    >>> vecs = t.lookup({"user": u_rows})    # this rank's rows     # doctest: +SKIP
    >>> (loss * t.grad_scale).backward()     # the update happens here  # doctest: +SKIP

Shardings. On CPU ranks TorchRec 1.8 offers table-wise, column-wise and data-parallel;
row-wise and table-row-wise need CUDA ranks (``oneepoch plan --device cuda`` shows them).
``auto`` lets the planner choose among the sharded types (not data-parallel, which it picks
for small tables: that is the replicated path, where FBGEMM's fused update does not run).

Optimizers. FBGEMM's CPU kernels fuse ``sgd`` (exact SGD) and ``adagrad`` (exact Adagrad, and
``rowwise_adagrad``) into the backward pass; they have no Adam, so ``adam`` (and ``rmsprop``)
is refused here with a clear error: Adam, and the remedies' per-row rules, run through
oneepoch's row-wise update on replicated tables.

Gradient scale. TorchRec divides the table gradients by the world size (DDP's convention: each
rank's loss a local mean). oneepoch's losses are the rank's summed loss over the *global* batch
size, so multiply the loss by :attr:`grad_scale` (the world size) before ``backward``, and
divide the dense gradients by it (as DDP does).
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from oneepoch.distributed.env import DistContext
from oneepoch.distributed.plan import require_torchrec

FUSED = {"sgd": "EXACT_SGD", "adagrad": "EXACT_ADAGRAD",
         "rowwise_adagrad": "EXACT_ROWWISE_ADAGRAD"}
SHARDINGS = ("auto", "table_wise", "row_wise", "column_wise", "table_row_wise")


def check_fused_optim(optim: str) -> None:
    """Refuse an optimizer FBGEMM cannot fuse into the sharded tables' backward pass."""
    if optim not in FUSED:
        raise ValueError(
            f"optim.name={optim!r}: FBGEMM's CPU kernels fuse {sorted(FUSED)} into the "
            "backward pass of sharded tables, not Adam or RMSprop; use one of those, or "
            "replicated tables (the default: drop --shard-tables), where oneepoch's row-wise "
            "Adam and the remedies' per-row rules run")


class ShardedTables:
    """Tables ``[(name, rows, dim)]`` sharded over the ranks of ``ctx`` by TorchRec's planner
    (``sharding="auto"``) or one forced sharding type. By default each table has one feature
    of its own name, sum-pooled (one ID per bag: its vector, :meth:`lookup`); ``features``
    (table -> feature names) lets several features share a table and ``pooling="mean"``
    averages bags of several IDs (:meth:`lookup_bags`; an empty bag gives zeros)."""

    def __init__(self, ctx: DistContext, tables: list[tuple[str, int, int]], optim: str,
                 lr: float, sharding: str = "auto", eps: float = 1e-8,
                 features: dict[str, list[str]] | None = None, pooling: str = "sum") -> None:
        check_fused_optim(optim)
        if pooling not in ("sum", "mean"):
            raise ValueError(f"pooling: {pooling!r} (choose sum or mean)")
        cpu_types = ("auto", "table_wise", "column_wise")
        if ctx is not None and ctx.backend != "nccl" and sharding not in cpu_types:
            raise ValueError(f"sharding: {sharding!r} needs CUDA ranks; TorchRec 1.8 shards "
                             f"tables on CPU ranks {cpu_types[1:]} (or data-parallel)")
        require_torchrec()
        if sharding not in SHARDINGS:
            raise ValueError(f"sharding: {sharding!r} (choose {SHARDINGS})")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from fbgemm_gpu.split_embedding_configs import EmbOptimType
            from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
            from torchrec.distributed.model_parallel import DistributedModelParallel
            from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
            from torchrec.distributed.planner.types import ParameterConstraints
            from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
            from torchrec.modules.embedding_modules import EmbeddingBagCollection

            self.ctx, self.tables = ctx, list(tables)
            feats = features or {n: [n] for n, _, _ in tables}
            self.names = [f for n, _, _ in tables for f in feats[n]]  # the lookups' keys
            pool = PoolingType.MEAN if pooling == "mean" else PoolingType.SUM
            ebc = EmbeddingBagCollection(tables=[
                EmbeddingBagConfig(name=n, embedding_dim=d, num_embeddings=r,
                                   feature_names=feats[n], pooling=pool)
                for n, r, d in tables], device=torch.device("meta"))
            fused = {"optimizer": getattr(EmbOptimType, FUSED[optim]), "learning_rate": lr,
                     "eps": eps}
            sharder = EmbeddingBagCollectionSharder(fused_params=fused)
            device = "cuda" if ctx.backend == "nccl" else "cpu"
            # auto: the planner's choice among the sharded types (it picks data-parallel
            # for small tables, which is the replicated path, not FBGEMM's fused update)
            kinds = [sharding] if sharding != "auto" else [
                k for k in SHARDINGS[1:] if device == "cuda" or k in cpu_types]
            cons = {n: ParameterConstraints(sharding_types=kinds) for n, _, _ in tables}
            # TorchRec's forward asks torch.fx a deprecated question, and torch says so once
            logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
            quiet = logging.getLogger("torchrec.distributed.planner")  # its notes on dry runs
            level = quiet.level  # and a hand-built topology are about its internals
            quiet.setLevel(logging.ERROR)
            try:
                topo = Topology(world_size=ctx.world_size, compute_device=device,
                                local_world_size=ctx.local_world_size)
                planner = EmbeddingShardingPlanner(topology=topo, constraints=cons)
                self.plan = planner.collective_plan(ebc, [sharder], dist.GroupMember.WORLD)
            finally:
                quiet.setLevel(level)
            self.dmp = DistributedModelParallel(ebc, device=torch.device(device),
                                                plan=self.plan, sharders=[sharder])
        self.grad_scale = float(ctx.world_size)

    def plan_dict(self) -> dict[str, Any]:
        """Per table: sharding type, compute kernel, ranks and shards (for the run folder)."""
        out = {}
        for mod in self.plan.plan.values():
            for name, ps in mod.items():
                shards = [] if ps.sharding_spec is None else [
                    {"rank": s.placement.rank(), "offsets": list(s.shard_offsets),
                     "sizes": list(s.shard_sizes)} for s in ps.sharding_spec.shards]
                out[name] = {"sharding": str(ps.sharding_type), "kernel": str(ps.compute_kernel),
                             "ranks": list(ps.ranks or []), "shards": shards}
        return out

    def _local(self) -> list[tuple[str, int, int, int, int, torch.Tensor]]:
        """(table, row offset, col offset, rows, cols, tensor) of this rank's shards."""
        out = []
        for key, v in self.dmp.state_dict().items():
            name = key.split(".")[-2]
            for sh in v.local_shards():
                o, s = sh.metadata.shard_offsets, sh.metadata.shard_sizes
                out.append((name, o[0], o[1], s[0], s[1], sh.tensor))
        return out

    @torch.no_grad()
    def load_full(self, full: dict[str, torch.Tensor]) -> None:
        """Set the tables from whole tensors (the same on every rank), e.g. the one-process
        initialisation, so a sharded run starts where a replicated one does."""
        for name, r0, c0, nr, nc, t in self._local():
            t.copy_(full[name][r0:r0 + nr, c0:c0 + nc])

    @torch.no_grad()
    def gather_full(self, name: str) -> torch.Tensor | None:
        """The whole table ``name`` on rank 0 (``None`` elsewhere): for exports and
        evaluation against the whole catalogue."""
        rows, dim = {t[0]: (t[1], t[2]) for t in self.tables}[name]
        key = next(k for k in self.dmp.state_dict() if k.split(".")[-2] == name)
        out = torch.empty(rows, dim) if self.ctx.rank == 0 else None
        with self.ctx.collective(f"gathering table {name}"):
            self.dmp.state_dict()[key].gather(dst=0, out=out)
        return out

    def lookup(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Vectors ``[n_f, dim]`` of this rank's rows of each feature (any count per rank)."""
        empty = torch.zeros(0, dtype=torch.int64)
        vals = [rows[n].reshape(-1).to(torch.int64) if n in rows else empty
                for n in self.names]
        size = max(v.shape[0] for v in vals)  # a KJT has one batch size: pad with empty bags
        lengths = torch.zeros(len(vals), size, dtype=torch.int64)
        for k, v in enumerate(vals):
            lengths[k, :v.shape[0]] = 1
        out = self.lookup_bags(torch.cat(vals), lengths)
        return {n: out[n][:v.shape[0]] for n, v in zip(self.names, vals, strict=True)
                if n in rows}

    def lookup_bags(self, values: torch.Tensor, lengths: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
        """Pooled vectors ``{feature: [size, dim]}`` of bags of IDs: ``lengths[k, i]`` IDs in
        bag ``i`` of feature ``k`` (features in :attr:`names` order; every feature has the
        same number ``size`` of bags, pad with empty ones), ``values`` the IDs (table rows),
        feature by feature, bag by bag. Differentiable: backward updates the shards."""
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        kjt = KeyedJaggedTensor.from_lengths_sync(keys=self.names, values=values,
                                                  lengths=lengths.reshape(-1))
        with self.ctx.collective("sharded embedding lookup"):
            return self.dmp(kjt).to_dict()

    def checkpoint_state(self, names: dict[str, str] | None = None) -> dict[str, Any]:
        """This rank's shards of the tables and of the fused optimizer's state, under the keys
        of oneepoch's checkpoints (see :mod:`oneepoch.training.checkpoint`): ``model/<name>``
        for a table and ``optim/sparse/<name>/<state>`` for its optimizer state, ``name`` the
        model's parameter of the table (``names``: table -> parameter; default the table's
        name). FBGEMM's exact Adagrad accumulator (``momentum1``, the running sum of squared
        gradients per element) is oneepoch's Adagrad ``square_avg``: the same update rule, so a
        one-process run continues it. In place: loading into it sets the shards."""
        names = names or {n: n for n, _, _ in self.tables}
        out: dict[str, Any] = {}
        for key, v in self.dmp.state_dict().items():
            out[f"model/{names[key.split('.')[-2]]}"] = v
        for key, st in self.dmp.fused_optimizer.state_dict()["state"].items():
            table = names[key.split(".")[-2]]
            for k, v in st.items():
                k = k.split(".")[-1]
                with warnings.catch_warnings():  # TorchRec's ShardedTensor deprecation
                    warnings.simplefilter("ignore", FutureWarning)
                    exact = len(v.size()) == 2
                if k == "momentum1" and exact:  # exact (not row-wise) Adagrad
                    k = "square_avg"
                out[f"optim/sparse/{table}/{k}"] = v
        return out

    @torch.no_grad()
    def load_whole(self, whole: dict[str, torch.Tensor],
                   names: dict[str, str] | None = None) -> None:
        """Set this rank's shards of the tables and of the fused optimizer's state from whole
        tensors under :meth:`checkpoint_state`'s keys (those present in ``whole``)."""
        load_whole_into(self.checkpoint_state(names), whole)

    def joined_state(self, param: str, offsets: dict[str, int], shape: tuple[int, int],
                     whole: dict[str, torch.Tensor]) -> dict[str, Any]:
        """:meth:`checkpoint_state` with every table joined into one parameter ``param`` of
        ``shape`` (the CTR model's one concatenated table): table ``t``'s rows at row
        ``offsets[t]``, so the keys are the one-process checkpoint's (``model/<param>``,
        ``optim/sparse/<param>/<state>``) and a one-process run reads them whole. Its shards are
        TorchRec's, moved by the table's offset (the same memory: loading sets the shards);
        rows of no table (a vocabulary no field reads) are one more shard, on rank 0, read from
        ``whole`` (the model's table and the one-process optimizer's state, same keys; only
        rank 0's are read; an entry absent or not whole there gives zeros: such rows are never
        updated, their optimizer state is zero)."""
        groups: dict[str, list[tuple[int, Any]]] = {}
        for key, st in self.checkpoint_state().items():
            parts = key.split("/")
            at = 1 if parts[0] == "model" else 2  # model/<t> or optim/sparse/<t>/<state>
            table, parts[at] = parts[at], param
            groups.setdefault("/".join(parts), []).append((offsets[table], st))
        return {k: _joined(v, shape, whole.get(k), self.ctx.rank) for k, v in groups.items()}

    def save(self, path: str | Path, names: dict[str, str] | None = None) -> None:
        """Every rank writes its shards of the tables and of the fused optimizer's state
        (:meth:`checkpoint_state`) with ``torch.distributed.checkpoint`` into folder ``path``
        (the same folder for every rank: a file system they share)."""
        import torch.distributed.checkpoint as dcp

        with self.ctx.collective("torch.distributed.checkpoint save"), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # DCP's planner notes
            dcp.save(self.checkpoint_state(names), checkpoint_id=str(path))

    def load(self, path: str | Path, names: dict[str, str] | None = None) -> None:
        """Read a checkpoint written by :meth:`save` at any world size or sharding (DCP
        reshards): the tables and, when the checkpoint has it, the fused optimizer's state."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        from oneepoch.distributed.env import DistributedError
        from oneepoch.training.checkpoint import dcp_damaged, dcp_shapes

        have = set(dcp_shapes(path))
        sd = {k: v for k, v in self.checkpoint_state(names).items() if k in have}
        try:
            with self.ctx.collective("torch.distributed.checkpoint load"), \
                    warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # DCP's planner notes
                dcp.load(sd, checkpoint_id=str(path))
        except DistributedError:
            raise
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - an unreadable shard file
            raise dcp_damaged(path, e) from e


def _joined(items: list[tuple[int, Any]], shape: tuple[int, int],
            whole: torch.Tensor | None, rank: int) -> Any:
    """One ShardedTensor of ``shape`` from ShardedTensors ``items`` ``[(row offset, st)]`` (see
    :meth:`ShardedTables.joined_state`); rows none covers: rank 0's ``whole``."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import (
        Shard,
        ShardedTensor,
        ShardedTensorMetadata,
    )
    from torch.distributed._shard.sharded_tensor.metadata import TensorProperties

    def moved(md: Any, off: int) -> Any:
        return ShardMetadata([md.shard_offsets[0] + off, *md.shard_offsets[1:]],
                             list(md.shard_sizes), md.placement)

    mds, local, covered = [], [], []
    for off, st in items:
        mds += [moved(md, off) for md in st.metadata().shards_metadata]
        local += [Shard(sh.tensor, moved(sh.metadata, off)) for sh in st.local_shards()]
        with warnings.catch_warnings():  # TorchRec's ShardedTensor deprecation
            warnings.simplefilter("ignore", FutureWarning)
            covered.append((off, off + st.size(0)))
    dtype = items[0][1].metadata().tensor_properties.dtype
    device = mds[0].placement.device()
    start = 0
    for a, b in [*sorted(covered), (shape[0], shape[0])]:
        if a > start:  # rows of no table: rank 0 keeps them
            md = ShardMetadata([start, 0], [a - start, shape[1]], f"rank:0/{device}")
            mds.append(md)
            if rank == 0:
                rest = whole[start:a] if whole is not None and whole.shape[0] == shape[0] \
                    else torch.zeros(a - start, shape[1], dtype=dtype)
                local.append(Shard(rest, md))
        start = max(start, b)
    meta = ShardedTensorMetadata(mds, torch.Size(shape), TensorProperties(dtype=dtype))
    return ShardedTensor._init_from_local_shards_and_global_metadata(local, meta)


@torch.no_grad()
def drop_copies(ctx: DistContext, opt: Any, params: dict[str, torch.nn.Parameter]) -> None:
    """Once the shards hold the tables: the model's whole tables ``params`` (the optimizer's
    names) shrink to 0 rows except on rank 0 (the mirror), and the one-process optimizer's
    state of them to 0 rows on every rank."""
    for name, w in params.items():
        if ctx.rank != 0:
            w.data = w.data.new_empty(0, *w.shape[1:])
        o = opt.sparse[name]
        o.state = {k: v.new_empty(0, *v.shape[1:]) for k, v in o.state.items()}


def load_whole_into(state: dict[str, Any], whole: dict[str, torch.Tensor]) -> None:
    """Set the local shards of a checkpoint state of ShardedTensors (:meth:`ShardedTables.
    checkpoint_state`, :meth:`~ShardedTables.joined_state`) from whole tensors under the same
    keys (those present in ``whole``)."""
    for key, v in state.items():
        if key in whole:
            for sh in v.local_shards():
                at = tuple(slice(o, o + n) for o, n in zip(sh.metadata.shard_offsets,
                                                           sh.metadata.shard_sizes, strict=True))
                sh.tensor.copy_(whole[key][at])


def write_checkpoint(ctx: DistContext, root: Path | None, path: Path, state: dict[str, Any],
                     shards: dict[str, Any]) -> None:
    """Write the loop's checkpoint ``path`` with sharded tables (every rank calls it): every
    rank writes its ``shards`` (a DCP state dict of ShardedTensors) with
    ``torch.distributed.checkpoint`` into ``checkpoints/.<name>.tables.tmp`` of the run folder
    ``root`` (shared by the ranks: the other ranks' own ``path`` is in a scratch folder); after
    a barrier rank 0 writes the rest (``state`` without the entries the shards hold) and moves
    that folder in as ``tables.dcp/``, atomically
    (:func:`~oneepoch.training.checkpoint.save_checkpoint`)."""
    import torch.distributed.checkpoint as dcp

    from oneepoch.training.checkpoint import save_checkpoint

    if root is None:
        raise RuntimeError("sharded tables' checkpoint: the run folder shared by the ranks is "
                           "not set (the step's root; DataParallelRun sets it)")
    tmp = root / "checkpoints" / f".{path.name}.tables.tmp"
    if ctx.is_writer:  # an earlier attempt's files (e.g. of another world size)
        shutil.rmtree(tmp, ignore_errors=True)
    with ctx.collective("barrier before writing the sharded tables"):
        dist.barrier()
    with ctx.collective("torch.distributed.checkpoint save"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # DCP's planner notes
        dcp.save(shards, checkpoint_id=str(tmp))
    with ctx.collective("barrier after writing the sharded tables"):
        dist.barrier()
    if ctx.is_writer:
        save_checkpoint(path, state, tables=tmp)


def load_tables(path: str | Path, tables: list[tuple[str, int, int]]) -> dict[str, torch.Tensor]:
    """Whole tables from a :meth:`ShardedTables.save` checkpoint (saved without ``names``), in
    one process without a process group (e.g. to resume sharded training on one process, or to
    export)."""
    from oneepoch.training.checkpoint import read_dcp

    whole = read_dcp(path)
    out = {n: whole[f"model/{n}"] for n, _, _ in tables}
    for n, r, d in tables:
        if tuple(out[n].shape) != (r, d):
            raise ValueError(f"{path}: table {n} is {tuple(out[n].shape)} there, not {(r, d)}")
    return out
