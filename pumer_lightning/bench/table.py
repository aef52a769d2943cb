"""Print one combined results table from bench JSON files (docs/bench.md).

    python -m pumer_lightning.bench.table results/bench/vilt_nlvr2_cpu_b8.json results/bench/meter_nlvr2_cpu_b8.json
    python -m pumer_lightning.bench.table results/bench/*_b8.json --settings baseline pumer random_prune

One row per experiment and setting, then the command, machine and protocol of each run.
"""

from __future__ import annotations

import argparse

from .report import load, readme_table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pumer_lightning.bench.table",
        description="Render one combined results table from bench JSON files.",
    )
    parser.add_argument("json", nargs="+", help="results/bench/<name>.json files")
    parser.add_argument("--settings", nargs="+", help="only these settings (default: all)")
    args = parser.parse_args(argv)
    print(readme_table(load(args.json), args.settings), end="")


if __name__ == "__main__":
    main()
