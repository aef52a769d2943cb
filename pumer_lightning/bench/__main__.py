"""Command line of the bench: ``python -m pumer_lightning.bench EXP [EXP ...] [options]``."""

from __future__ import annotations

import argparse
import shlex
import sys

from .experiments import ABLATIONS, EXPERIMENTS, get_experiment
from .options import QUICK_SETTINGS, Options, add_option_arguments, options_from_namespace
from .runner import run_bench

QUICK_ROUNDS = 3

EPILOG = f"""
experiments: {", ".join(EXPERIMENTS)} (full size; tiny_<name> or --tiny for the tiny presets)
settings: baseline, pumer (released), {", ".join(ABLATIONS)} (pumer_lightning.reduce.ABLATIONS), keep_<ratio>

outputs: <out>/<name>.json (top-level "settings" list), <name>.md (table), <name>.png (plots);
<name> defaults to <exp>_<device>[-<precision>]_b<batch>[_compiled][_graphed][_reducer-<impl>].
On a CPU, --precision auto measures fp32 and then bf16-true where the CPU has bf16 matrix instructions (--cpu-bf16;
the training step as bf16-mixed, the fp32 baseline timed in the same rounds).
Every run also measures a training step per setting (memory with its bound, throughput; --no-train skips it),
the ops per forward (--no-op-count skips it) and, when the backbone has a compiled reduction step, its kernels.

examples:
  python -m pumer_lightning.bench vilt_nlvr2 meter_nlvr2
  python -m pumer_lightning.bench meter_vqa2 --quick
  python -m pumer_lightning.bench vilt_nlvr2 meter_nlvr2 --settings pumer --keep-sweep --precision bf16-true
  python -m pumer_lightning.bench vilt_vqa2 --batch 1 8 32 --settings pumer
  python -m pumer_lightning.bench vilt_nlvr2 --compile --settings pumer
  python -m pumer_lightning.bench vilt_nlvr2 --batch 32 --precision fp16-true --reducer-impl compiled --cuda-graph
  scripts/gpu_check.sh                       # every GPU measurement of issue 13 (GPU_CHECK_TINY=1: CPU smoke)
"""


def build_parser() -> argparse.ArgumentParser:
    """The bench's parser: the experiments, one flag per `Options` field (`add_option_arguments`), and ``--quick``."""
    p = argparse.ArgumentParser(
        prog="python -m pumer_lightning.bench",
        description="Throughput, peak memory and FLOPs of PuMer reducer settings against the unreduced model, "
        "measured interleaved in one process.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("exp", nargs="+", help="experiment name(s)")
    add_option_arguments(p, Options)
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"only {' and '.join(QUICK_SETTINGS)}, no sweep, no warm-up round beyond the probe, "
        f"{QUICK_ROUNDS} rounds (unless --rounds / --train-rounds say otherwise)",
    )
    # the training step is always measured now (--no-train skips it); the flag stays for old commands
    p.add_argument("--train-memory", action="store_true", help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None) -> tuple[list[str], Options]:
    """The experiments and `Options` of a command line; a bad value exits with a message naming its flag."""
    p = build_parser()
    a = p.parse_args(argv)
    options = options_from_namespace(a, Options)
    if a.quick:
        options.settings = options.settings or list(QUICK_SETTINGS)
        options.keep_sweep = ()
        options.warmup = 0
        if options.rounds is None:
            options.rounds = QUICK_ROUNDS
        if options.train_rounds is None:
            options.train_rounds = QUICK_ROUNDS
    for name in a.exp:
        try:
            get_experiment(name, tiny=a.tiny)
        except ValueError as err:
            p.error(str(err))
    for b in options.batch_sizes:
        if b < 1:
            p.error(f"--batch must be positive, got {b}")
    if options.rounds is not None and options.rounds < 1:
        p.error(f"--rounds must be positive, got {options.rounds}")
    if options.train_rounds is not None and options.train_rounds < 0:
        p.error(f"--train-rounds must be >= 0, got {options.train_rounds}")
    return a.exp, options


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    exps, options = parse_args(argv)
    options.command = "python -m pumer_lightning.bench " + shlex.join(argv)
    run_bench(exps, options)


if __name__ == "__main__":
    main()
