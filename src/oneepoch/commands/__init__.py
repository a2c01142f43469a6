"""One module per ``oneepoch`` subcommand (see :mod:`oneepoch.cli`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def config_and_run_dir(args: argparse.Namespace, cls: type) -> tuple[Any, Path | None]:
    """The settings of ``train`` / ``pretrain``: from ``--config`` plus overrides, or with
    ``--resume RUN_DIR`` from the run's own ``config.yaml`` plus overrides (then the folder)."""
    from oneepoch.config import load_config

    if not args.resume:
        return load_config(cls, args.config, args.overrides), None
    run_dir = Path(args.resume)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir}: not a run folder (no config.yaml)")
    return load_config(cls, run_dir / "config.yaml", args.overrides), run_dir
