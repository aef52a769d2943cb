"""Command line of the bench: ``python -m pumer_lightning.bench EXP [EXP ...] [options]``."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .experiments import DEFAULT_KEEP_SWEEP, EXPERIMENTS, get_experiment
from .runner import QUICK_SETTINGS, Options, run_bench

EPILOG = f"""
experiments: {", ".join(EXPERIMENTS)} (full size; tiny_<name> or --tiny for the tiny presets)
settings: baseline, pumer (released), prune_only, merge_only, no_text_merge, random_prune, keep_<ratio>

outputs: <out>/<name>.json (top-level "settings" list), <name>.md (table), <name>.png (plots);
<name> defaults to <exp>_<device>[-<precision>]_b<batch>[_compiled][_graphed][_reducer-<impl>].
Every run also measures a training step per setting (memory with its bound, throughput; --no-train skips it),
the ops per forward (--no-op-count skips it) and, when the backbone has a compiled reduction step, its kernels.

examples:
  python -m pumer_lightning.bench vilt_nlvr2 meter_nlvr2
  python -m pumer_lightning.bench meter_vqa2 --quick
  python -m pumer_lightning.bench vilt_vqa2 --batch 1 8 32 --settings pumer
  python -m pumer_lightning.bench vilt_nlvr2 --compile --settings pumer
  python -m pumer_lightning.bench vilt_nlvr2 --batch 32 --precision fp16-true --reducer-impl compiled --cuda-graph
  scripts/gpu_check.sh                       # every GPU measurement of issue 13 (GPU_CHECK_TINY=1: CPU smoke)
"""


def parse_args(argv: list[str] | None = None) -> tuple[list[str], Options]:
    p = argparse.ArgumentParser(
        prog="python -m pumer_lightning.bench",
        description="Throughput, peak memory and FLOPs of PuMer reducer settings against the unreduced model, "
        "measured interleaved in one process.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("exp", nargs="+", help="experiment name(s)")
    p.add_argument("--tiny", action="store_true", help="use the tiny presets (smoke runs and tests)")
    p.add_argument("--batch", type=int, nargs="+", default=[8], help="batch size(s); several = a sweep")
    p.add_argument("--settings", nargs="+", help="only these settings (the baseline is always added)")
    p.add_argument(
        "--keep-sweep",
        type=float,
        nargs="*",
        default=list(DEFAULT_KEEP_SWEEP),
        help="keep ratios of the sweep, with the released merge and text ratios (none: no sweep)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"only {' and '.join(QUICK_SETTINGS)}, no warm-up round beyond the probe, {3} rounds",
    )
    p.add_argument("--rounds", type=int, help="timed rounds (default: as many as fit in --budget)")
    p.add_argument("--budget", type=float, default=120.0, help="seconds of timed rounds per experiment")
    p.add_argument("--min-rounds", type=int, default=5, help="fewest timed rounds, whatever the budget")
    p.add_argument("--max-rounds", type=int, default=20)
    p.add_argument(
        "--warmup",
        type=int,
        help="plain warm-up rounds after the probe forward (default: 1 on CUDA, with --compile or when a round "
        "is under 30 s; else 0, the probe having run every setting once)",
    )
    p.add_argument(
        "--no-train",
        dest="train",
        action="store_false",
        help="skip the training step (forward + backward memory and bound; forward + backward + AdamW throughput)",
    )
    p.add_argument(
        "--train-rounds", type=int, help="timed training rounds (default: as many as fit in the budget)"
    )
    p.add_argument("--train-budget", type=float, help="seconds of timed training rounds (default: --budget)")
    p.add_argument(
        "--train-min-rounds", type=int, default=3, help="fewest timed training rounds (default: 3)"
    )
    p.add_argument(
        "--train-memory", action="store_true", help=argparse.SUPPRESS
    )  # the default now; kept for old commands
    p.add_argument(
        "--reducer-impl",
        choices=["auto", "eager", "compiled"],
        help="the backbone's reduction step (default: the backbone's own default); ignored, with a warning, "
        "by a backbone without the choice",
    )
    p.add_argument(
        "--kernel-count",
        choices=["released", "all", "none"],
        default="released",
        help="count inductor's kernels of the compiled reduction step for these settings (default: released)",
    )
    p.add_argument("--no-op-count", dest="op_count", action="store_false", help="skip the op counter")
    p.add_argument(
        "--min-sample",
        type=float,
        help="seconds a timed sample lasts at least (default: 0.05 on CUDA, 0 on CPU)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "fp16", "bf16", "fp16-true", "bf16-true"],
        help="auto: fp16 autocast on CUDA, fp32 on CPU; fp16/bf16: autocast; fp16-true/bf16-true: weights cast "
        "to half once (no autocast, no per-call recast)",
    )
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    p.add_argument(
        "--compile", action="store_true", help="time torch.compile(fullgraph=True, dynamic=False) models"
    )
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (with --compile)")
    p.add_argument(
        "--compile-mode",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="torch.compile mode (with --compile; reduce-overhead = CUDA graphs)",
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="CUDA only: capture each setting's forward as a CUDA graph and time replays (no launch overhead; "
        "the reducer share is not measured)",
    )
    p.add_argument(
        "--profile", action="store_true", help="add a torch.profiler op breakdown (baseline, pumer)"
    )
    p.add_argument("--out", type=Path, default=Path("results/bench"), help="output directory")
    p.add_argument("--name", help="output file stem (one experiment and batch size only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    a = p.parse_args(argv)
    options = Options(
        batch_sizes=a.batch,
        settings=a.settings,
        keep_sweep=tuple(a.keep_sweep),
        tiny=a.tiny,
        rounds=a.rounds,
        budget_s=a.budget,
        min_rounds=a.min_rounds,
        max_rounds=a.max_rounds,
        warmup=a.warmup,
        train=a.train,
        train_rounds=a.train_rounds,
        train_budget_s=a.train_budget,
        train_min_rounds=a.train_min_rounds,
        reducer_impl=a.reducer_impl,
        kernel_count=a.kernel_count,
        op_count=a.op_count,
        min_sample_s=a.min_sample,
        device=a.device,
        precision=a.precision,
        threads=a.threads,
        compile=a.compile,
        compile_backend=a.compile_backend,
        compile_mode=a.compile_mode,
        cuda_graph=a.cuda_graph,
        profile=a.profile,
        out_dir=a.out,
        name=a.name,
        seed=a.seed,
        plot=not a.no_plot,
        verbose=not a.quiet,
    )
    if a.quick:
        options.settings = options.settings or list(QUICK_SETTINGS)
        options.keep_sweep = ()
        options.warmup = 0
        if options.rounds is None:
            options.rounds = 3
        if options.train_rounds is None:
            options.train_rounds = 3
    for name in a.exp:
        try:
            get_experiment(name, tiny=a.tiny)
        except ValueError as err:
            p.error(str(err))
    for b in options.batch_sizes:
        if b < 1:
            p.error(f"--batch must be positive, got {b}")
    return a.exp, options


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    exps, options = parse_args(argv)
    options.command = "python -m pumer_lightning.bench " + shlex.join(argv)
    run_bench(exps, options)


if __name__ == "__main__":
    main()
