"""Runs users ask for, wired from the components: the demo, sweeps, the papers' reproductions.

Each reproduction takes a :class:`ReproduceOptions` (the CLI builds one from its flags):

    >>> opts = ReproduceOptions(figure="6", quick=True, seeds=1, out="runs/reproduce")
    >>> opts.overrides
    []
    >>> from oneepoch.recipes import zhang2022                      # doctest: +SKIP
    >>> zhang2022.reproduce(opts)                                    # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ReproduceOptions:
    """What ``oneepoch reproduce PAPER`` was asked for.

    Args:
        figure: figure number(s), comma-separated, or ``"all"``.
        table: table number.
        data: a data-set folder (``None``: the built-in synthetic data).
        seeds: seeds per setting.
        quick: the small preset (for tests or a look).
        out: the output folder.
        workers: parallel processes (0 = one per core).
        overrides: ``key=value`` training settings applied to every run.
    """

    figure: str | None = None
    table: str | None = None
    data: str | None = None
    seeds: int = 3
    quick: bool = False
    out: str = "runs/reproduce"
    workers: int = 0
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ValueError(f"--seeds: must be >= 1, got {self.seeds}")
        if self.workers < 0:
            raise ValueError(f"--workers: must be >= 0, got {self.workers}")
