"""Command line of the bench: ``python -m pumer_lightning.bench EXP [EXP ...] [options]``."""

from __future__ import annotations

from dataclasses import dataclass, field

from pumer_lightning.command import Command, flag

from .experiments import ABLATIONS, EXPERIMENTS, get_experiment
from .options import QUICK_SETTINGS, Options
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
  scripts/gpu_check.sh                       # every GPU measurement of the bench (GPU_CHECK_TINY=1: CPU smoke)
"""


@dataclass
class BenchArgs:
    """Throughput, peak memory and FLOPs of PuMer reducer settings against the unreduced model, measured
    interleaved in one process."""

    exp: list[str] = field(metadata=flag(positional=True))
    """experiment name(s)"""
    options: Options = field(default_factory=Options)
    quick: bool = False
    """only baseline and pumer, no sweep, no warm-up round beyond the probe, 3 rounds (unless --rounds /
    --train-rounds say otherwise)"""
    quiet: bool = field(default=False, metadata=flag("--quiet", "-q"))
    """no progress output"""
    train_memory: bool = False
    """no effect, accepted for old commands: the training step is always measured (--no-train skips it)"""

    def __post_init__(self) -> None:
        options = self.options
        if self.quick:
            options.settings = options.settings or list(QUICK_SETTINGS)
            options.keep_sweep = ()
            options.warmup = 0
            options.rounds = QUICK_ROUNDS if options.rounds is None else options.rounds
            options.train_rounds = QUICK_ROUNDS if options.train_rounds is None else options.train_rounds
        options.verbose = options.verbose and not self.quiet
        for name in self.exp:
            get_experiment(name, tiny=options.tiny)  # a ValueError naming the experiments
        for b in options.batch_sizes:
            if b < 1:
                raise ValueError(f"--batch must be positive, got {b}")
        if options.rounds is not None and options.rounds < 1:
            raise ValueError(f"--rounds must be positive, got {options.rounds}")
        if options.train_rounds is not None and options.train_rounds < 0:
            raise ValueError(f"--train-rounds must be >= 0, got {options.train_rounds}")


def run(args: BenchArgs) -> None:
    run_bench(args.exp, args.options)


COMMAND = Command(BenchArgs, run, prog="python -m pumer_lightning.bench", epilog=EPILOG)


def parse_args(argv: list[str] | None = None) -> tuple[list[str], Options]:
    """The experiments and `Options` of a command line; a bad value exits with a message naming its flag."""
    args = COMMAND.parse(argv)
    return args.exp, args.options


def main(argv: list[str] | None = None) -> None:
    """``python -m pumer_lightning.bench`` (``pumer bench``, ``make bench``)."""
    COMMAND.main(argv)


if __name__ == "__main__":
    main()
