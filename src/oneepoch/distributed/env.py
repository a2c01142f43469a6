"""Joining the process group from the launcher's environment (``torchrun`` or hand-set
``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``), and errors that name the rank.

Backend: gloo on the CPU, nccl on CUDA. Every collective waits at most
``ONEEPOCH_DIST_TIMEOUT`` seconds (default :data:`DEFAULT_TIMEOUT_S`); a rank whose peer has
died fails at its next collective (gloo notices the closed connection at once) with a
:class:`DistributedError` naming the dead rank when it can be told (same machine: its process
is gone; any machine: it posted its error before exiting).

    >>> ctx = from_env("cpu")      # None when not launched by torchrun   # doctest: +SKIP
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0
_KEY = "oneepoch/"


class DistributedError(RuntimeError):
    """Processes of a distributed run could not start together, or one of them stopped."""


def timeout_s() -> float:
    """The collective timeout in seconds (``ONEEPOCH_DIST_TIMEOUT``)."""
    raw = os.environ.get("ONEEPOCH_DIST_TIMEOUT", "")
    try:
        t = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise DistributedError(f"ONEEPOCH_DIST_TIMEOUT={raw!r}: not a number of seconds") \
            from None
    if t <= 0:
        raise DistributedError(f"ONEEPOCH_DIST_TIMEOUT={raw!r}: must be > 0 seconds")
    return t


def launched() -> bool:
    """True when this process was started as one rank of a distributed run."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """This process's rank from the environment (0 when not distributed)."""
    return int(os.environ.get("RANK", "0") or 0)


def _env_int(name: str) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"{name}={raw!r}: not an integer (set by torchrun)") from None


def _alive(pid: int) -> bool:
    """Is process ``pid`` (on this machine) still running (a zombie counts as dead)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


@dataclass
class DistContext:
    """This process's place in a distributed run."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str
    timeout: float
    store: dist.Store
    owns_group: bool  # we initialised the process group (and destroy it at close)
    own_store: bool = False  # our TCPStore (hand-set environment), hosted by rank 0

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes the run folder; the others keep a private scratch folder."""
        return self.rank == 0

    def dead_ranks(self) -> list[str]:
        """What can be told about ranks that stopped: their posted errors, and ranks on this
        machine whose process is gone."""
        out: list[str] = []
        host = socket.gethostname()
        for r in range(self.world_size):
            if r == self.rank:
                continue
            try:
                if self.store.check([f"{_KEY}error/{r}"]):
                    msg = self.store.get(f"{_KEY}error/{r}").decode(errors="replace")
                    out.append(f"rank {r} stopped with: {msg}")
                    continue
                where = self.store.get(f"{_KEY}pid/{r}").decode().rsplit(":", 1)
            except Exception:  # noqa: BLE001 - the store itself may be gone with rank 0
                if r == 0:
                    out.append("rank 0 (which holds the rendezvous store) is unreachable")
                continue
            if where[0] == host and not _alive(int(where[1])):
                out.append(f"rank {r} (pid {where[1]} on {host}) has exited")
        return out

    @contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """Run a collective; turn a failure into an error naming the rank(s) that stopped."""
        try:
            yield
        except DistributedError:
            raise
        except Exception as e:  # gloo / nccl raise RuntimeError subclasses
            text = str(e)
            if not (isinstance(e, dist.DistError) or any(
                    k in text for k in ("gloo", "Connection", "onnection reset", "imed out",
                                        "NCCL", "Socket"))):
                raise  # not a communication failure: this rank's own error
            time.sleep(0.2)  # let a dying peer's process disappear before we look
            dead = self.dead_ranks()
            who = "; ".join(dead) if dead else (
                f"no answer from another rank within {self.timeout:g} s (ONEEPOCH_DIST_TIMEOUT)"
                " or it stopped")
            raise DistributedError(
                f"rank {self.rank}/{self.world_size}: {what} failed: {who} ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''})") from e

    def post_error(self, err: BaseException) -> None:
        """Tell the other ranks why this one stops (best effort)."""
        try:
            self.store.set(f"{_KEY}error/{self.rank}", f"{type(err).__name__}: {err}"[:2000])
        except Exception:  # noqa: BLE001
            pass

    def barrier(self, what: str = "barrier") -> None:
        with self.collective(what):
            dist.barrier()

    def close(self) -> None:
        """Leave the process group. With our own store (hosted by rank 0's process), rank 0
        leaves last: a rank still tearing its group down when the store's host exits can
        abort ("terminate called without an active exception"); it waits at most 10 s."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        if not self.own_store:
            return
        try:
            left = self.store.add(f"{_KEY}left", 1)
            deadline = time.time() + 10
            while self.rank == 0 and left < self.world_size and time.time() < deadline:
                time.sleep(0.01)
                left = self.store.add(f"{_KEY}left", 0)
        except Exception:  # noqa: BLE001 - best effort (a rank may be gone)
            pass


def _handshake(store: dist.Store, rank: int, world: int, timeout: float) -> None:
    """Check that every rank was started with the same ``WORLD_SIZE`` before the process
    group waits for them (a mismatch would otherwise hang until the timeout)."""
    if rank == 0:
        store.set(f"{_KEY}world", str(world))
    else:
        store.wait([f"{_KEY}world"], timedelta(seconds=timeout))
        w0 = int(store.get(f"{_KEY}world"))
        if w0 != world:
            msg = (f"WORLD_SIZE mismatch in the rendezvous: rank {rank} was started with "
                   f"WORLD_SIZE={world}, rank 0 with WORLD_SIZE={w0}; start every process with "
                   "the same world size (torchrun --nnodes/--nproc_per_node)")
            store.set(f"{_KEY}mismatch", msg)
            raise DistributedError(msg)
    store.add(f"{_KEY}joined", 1)
    if rank != 0:
        return
    deadline = time.time() + timeout
    while True:
        if store.check([f"{_KEY}mismatch"]):
            raise DistributedError(store.get(f"{_KEY}mismatch").decode())
        joined = store.add(f"{_KEY}joined", 0)
        if joined >= world:
            return
        if time.time() > deadline:
            raise DistributedError(
                f"rendezvous: only {joined} of WORLD_SIZE={world} ranks joined within "
                f"{timeout:g} s (ONEEPOCH_DIST_TIMEOUT); start all of them, with the same "
                "MASTER_ADDR/MASTER_PORT")
        time.sleep(0.05)


def from_env(device: str = "cpu", threads: int = 0) -> DistContext | None:
    """Join the process group described by the environment, or ``None`` when this process
    was not launched as a rank (no ``RANK``/``WORLD_SIZE``). ``threads`` is not used (kept
    for callers; see ``DataParallelRun.set_threads``)."""
    if not launched():
        return None
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"RANK={rank}, WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    local_rank = int(os.environ.get("LOCAL_RANK", rank) or 0)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world) or 1)
    cuda = str(device).startswith("cuda")
    if cuda:  # before any rank waits for the others: the one-process error, on every rank
        from oneepoch.config import check_device
        try:
            check_device(device)
        except ValueError as e:
            raise DistributedError(str(e)) from None
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local_rank)
    t = timeout_s()
    owns = not dist.is_initialized()
    if not owns:
        store = dist.distributed_c10d._get_default_store()
    elif os.environ.get("TORCHELASTIC_RUN_ID"):  # torchrun: its agent did the rendezvous
        dist.init_process_group(backend, timeout=timedelta(seconds=t))
        store = dist.distributed_c10d._get_default_store()
    else:  # hand-set environment: our own store, with a world-size check first
        addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = _env_int("MASTER_PORT") if "MASTER_PORT" in os.environ else 29500
        try:
            store = dist.TCPStore(addr, port, None, rank == 0, timedelta(seconds=t),
                                  wait_for_workers=False)
        except Exception as e:  # noqa: BLE001
            raise DistributedError(f"rank {rank}: cannot reach the rendezvous at {addr}:{port} "
                                   f"within {t:g} s ({e})") from e
        _handshake(store, rank, world, t)
        dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=rank,
                                world_size=world, timeout=timedelta(seconds=t))
    store.set(f"{_KEY}pid/{rank}", f"{socket.gethostname()}:{os.getpid()}")
    return DistContext(rank, world, local_rank, local_world, backend, t, store, owns,
                       own_store=owns and not os.environ.get("TORCHELASTIC_RUN_ID"))
