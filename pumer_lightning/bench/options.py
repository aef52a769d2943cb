"""How to run the bench: `Options`, whose fields are the flags of ``python -m pumer_lightning.bench``.

Every field is one flag (`pumer_lightning.command`): its docstring is the flag's help, its type gives the flag's
form (``bool``: ``--<name>`` / ``--no-<name>``; ``list[T]`` / ``tuple[T, ...]``: ``--<name> V [V ...]``;
``Literal[...]``: the choices) and its metadata (`flag`) names the flag where it differs from the field's name.
A new field is a new flag with nothing else to write.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pumer_lightning.command import flag
from pumer_lightning.models.base import ReducerImpl

from .experiments import DEFAULT_KEEP_SWEEP

PrecisionChoice = Literal["auto", "fp32", "fp16", "bf16", "fp16-true", "bf16-true"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
QUICK_SETTINGS = ("baseline", "pumer")


@dataclass
class Options:
    """How to run the bench (the CLI's flags; see ``python -m pumer_lightning.bench --help``)."""

    batch_sizes: list[int] = field(default_factory=lambda: [8], metadata=flag("--batch", nargs="+"))
    """batch size(s); several = a sweep"""
    settings: list[str] | None = field(default=None, metadata=flag(nargs="+"))
    """only these settings (the baseline is always added)"""
    keep_sweep: tuple[float, ...] = field(default=DEFAULT_KEEP_SWEEP, metadata=flag(nargs="*"))
    """keep ratios of the sweep, with the released merge and text ratios (none: no sweep)"""
    tiny: bool = False
    """use the tiny presets (smoke runs and tests)"""
    rounds: int | None = None
    """timed rounds (default: as many as fit in --budget)"""
    budget_s: float = field(default=120.0, metadata=flag("--budget"))
    """seconds of timed rounds per experiment"""
    min_rounds: int = 5
    """fewest timed rounds, whatever the budget"""
    max_rounds: int = 20
    """most timed rounds, whatever the budget"""
    warmup: int | None = None
    """plain warm-up rounds after the probe forward (default: 1 on CUDA, with --compile or when a round is under
    30 s; else 0, the probe having run every setting once)"""
    train: bool = True
    """the training step of every setting (forward + backward memory and bound; forward + backward + AdamW
    throughput)"""
    train_rounds: int | None = None
    """timed training rounds (default: as many as fit in the budget)"""
    train_budget_s: float | None = field(default=None, metadata=flag("--train-budget"))
    """seconds of timed training rounds (default: --budget)"""
    train_min_rounds: int = 3
    """fewest timed training rounds (a training round of every full-size setting takes minutes on a CPU)"""
    reducer_impl: ReducerImpl | None = None
    """the backbone's reduction step (default: the backbone's own default, auto)"""
    op_count: bool = True
    """the op counter (ops per forward, reducer ops per reduction step)"""
    kernel_count: Literal["released", "all", "none"] = "released"
    """count inductor's kernels of the compiled reduction step for these settings"""
    min_sample_s: float | None = field(default=None, metadata=flag("--min-sample"))
    """seconds a timed sample lasts at least (default: 0.05 on CUDA, 0 on CPU)"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """the device (auto: CUDA when there is one)"""
    precision: PrecisionChoice = "auto"
    """auto: fp16 autocast on CUDA; on a CPU fp32, then bf16-true when the CPU has bf16 matrix instructions (see
    --cpu-bf16); fp16/bf16: autocast; fp16-true/bf16-true: weights cast to half once (no autocast, no per-call
    recast), the training step running the autocast counterpart over fp32 weights (bf16-true trains as bf16-mixed)"""
    cpu_bf16: Literal["auto", "on", "off"] = "auto"
    """bf16 rows on a CPU with --precision auto: auto when the CPU has bf16 matrix instructions (avx512_bf16, amx_bf16;
    else a message says why not), on even without them (emulated, slow), off never"""
    fp32_reference: bool = True
    """the fp32 baseline timed beside a CPU half-precision run's settings, in the same rounds and training rounds
    (the bf16-over-fp32 ratio)"""
    threads: int | None = None
    """torch.set_num_threads (default: torch's default)"""
    compile: bool = False
    """time torch.compile(fullgraph=True, dynamic=False) models"""
    compile_backend: str = "inductor"
    """torch.compile backend (with --compile)"""
    compile_mode: CompileMode | None = None
    """torch.compile mode (with --compile; reduce-overhead = CUDA graphs)"""
    cuda_graph: bool = False
    """CUDA only: capture each setting's forward as a CUDA graph and time replays (no launch overhead; the
    reducer share is not measured)"""
    profile: bool = False
    """add a torch.profiler op breakdown (baseline, pumer)"""
    out_dir: Path = field(default=Path("results/bench"), metadata=flag("--out"))
    """output directory"""
    name: str | None = None
    """output file stem (one experiment and batch size only)"""
    seed: int = 0
    """seed of the random weights and inputs"""
    plot: bool = True
    """the PNG plots"""
    verbose: bool = field(default=True, metadata=flag(cli=False))
    """progress output (``--quiet``: none)"""
    command: str | None = field(default=None, metadata=flag(cli=False))
    """the command line, recorded in the results (set by the CLI)"""
