"""``--nproc N``: start N local ranks of a ``oneepoch`` command through torchrun's own launcher
(``torch.distributed.run``, standalone rendezvous on a free local port), exactly as
``torchrun --standalone --nproc_per_node N -m oneepoch.cli ...`` would.

When a rank fails, torchrun's agent stops the others and reports which rank failed (and its
exit code or error; not when the first rank to fail exited with 2, the code of an error the
ranks print in one line, e.g. a setting sharded tables refuse); ranks still waiting in a
collective stop at once (gloo sees the closed connection) or after ``ONEEPOCH_DIST_TIMEOUT``
seconds. Ctrl-C stops every rank (each says "interrupted") and returns 130.
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
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = get_args_parser().parse_args(
        ["--standalone", "--nproc-per-node", str(nproc), "--max-restarts", "0",
         "-m", "oneepoch.cli", *argv])
    try:
        run(args)
    except ChildFailedError as e:
        _, first = e.get_first_failure()
        if first.exitcode == 2:  # the ranks' own one-line error (bad settings, input) said it
            return 2  # all; the others were stopped by the launcher
        print(e.format_msg(), file=sys.stderr)
        return 1
    except (SignalException, KeyboardInterrupt):  # Ctrl-C: the ranks said "interrupted"
        return 130
    return 0
