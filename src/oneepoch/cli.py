"""The ``oneepoch`` command line: thin fronts over the recipes.

Each subcommand lives in ``oneepoch/commands/<name>.py`` with a ``register(subparsers)``
function; add a module there and list it in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from oneepoch.config import ConfigError
from oneepoch.data.schema import DataError

COMMANDS = ("demo", "train", "data", "report", "reproduce", "sweep", "compare", "pretrain",
            "plan")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="oneepoch",
        description="Train ID-embedding recommendation models past the one-epoch phenomenon.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"oneepoch.commands.{name}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow options (argparse only takes them before)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-")
                                                    for e in extra):
        args.overrides = [*(args.overrides or []), *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    warnings.simplefilter("default")
    try:
        return int(args.func(args) or 0)
    except (DataError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"oneepoch {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; resume with --resume RUN_DIR where supported", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
