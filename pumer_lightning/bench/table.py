"""Print one combined results table from bench JSON files (docs/bench.md).

    python -m pumer_lightning.bench.table results/bench/vilt_nlvr2_cpu_b8.json results/bench/meter_nlvr2_cpu_b8.json
    python -m pumer_lightning.bench.table results/bench/*_b8.json --settings baseline pumer random_prune

One row per experiment and setting, then the command, machine and protocol of each run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pumer_lightning.command import Command, flag

from .report import load, readme_table


@dataclass
class TableArgs:
    """Render one combined results table from bench JSON files."""

    json: list[str] = field(metadata=flag(positional=True))
    """results/bench/<name>.json files"""
    settings: list[str] | None = None
    """only these settings (default: all)"""


def print_table(args: TableArgs) -> None:
    print(readme_table(load(args.json), args.settings), end="")


COMMAND = Command(TableArgs, print_table, prog="python -m pumer_lightning.bench.table", description=__doc__)


def main(argv: list[str] | None = None) -> None:
    """``python -m pumer_lightning.bench.table`` (``pumer bench-table``)."""
    COMMAND.main(argv)


if __name__ == "__main__":
    main()
