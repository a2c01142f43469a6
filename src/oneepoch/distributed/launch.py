"""``--nproc N``: start N local ranks of a ``oneepoch`` command through torchrun's own launcher
(``torch.distributed.run``, standalone rendezvous on a free local port), exactly as
``torchrun --standalone --nproc_per_node N -m oneepoch.cli ...`` would.

When a rank fails, torchrun's agent stops the others and reports which rank failed (and its
exit code or error); ranks still waiting in a collective stop at once (gloo sees the closed
connection) or after ``ONEEPOCH_DIST_TIMEOUT`` seconds.
"""

from __future__ import annotations

import os
import sys


def launch_local(nproc: int, argv: list[str]) -> int:
    """Run ``oneepoch <argv>`` on ``nproc`` local processes; 0 when every rank succeeded."""
    if nproc < 1:
        raise ValueError(f"--nproc: {nproc} (need at least 1 process)")
    if "RANK" in os.environ:
        raise ValueError("--nproc: this process is already one rank of a distributed run "
                         "(RANK is set); drop --nproc when launching with torchrun")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = get_args_parser().parse_args(
        ["--standalone", "--nproc-per-node", str(nproc), "--max-restarts", "0",
         "-m", "oneepoch.cli", *argv])
    try:
        run(args)
    except ChildFailedError as e:
        print(e.format_msg(), file=sys.stderr)
        return 1
    return 0
