"""The stages of the bench protocol for one experiment and batch size; `runner.measure_batch` runs them in order.

Each stage takes the `Batch` (what every stage shares: the model, settings, inputs, device, precision and
options) and returns what it measured; `results` turns the `Measured` into the JSON. Timed stages time the
settings with the package's one interleaved timer, `pumer_lightning.measure.interleaved_times`.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from pumer_lightning.lab.compare import examples_of
from pumer_lightning.lab.context import autocast, to_device, weight_dtype
from pumer_lightning.measure import interleaved_times, spread
from pumer_lightning.tasks import TokenTally, VLTask

from .experiments import Experiment, Setting, make_batch
from .forwards import compiled_runner, eager_runner, graphed_runner, raise_recompile_limits
from .measure import (
    REDUCE_RANGE,
    SavedBytesByPart,
    compiled_kernel_count,
    count_ops,
    flops_by_module,
    mixed_precision,
    peak_memory,
    reduce_range_profile,
    synchronize,
)
from .options import Options
from .parts import part_key, part_of, tokens_by_part

OPS_BATCH = 2  # op counts do not depend on the batch size; 2 as the counter
TRAIN_LR = 0.0  # AdamW at lr 0 costs the same as any lr and keeps the random weights the timed forwards use
CUDA_MIN_SAMPLE_S = 0.05  # a timed sample on CUDA repeats the forward until it lasts this long
WARMUP_MAX_PROBE_S = 30.0  # no warm-up round by default when the probe round took longer (CPU, full size)
REFERENCE = "fp32 baseline"  # the fp32 baseline a CPU half-precision run times beside its settings


@dataclass
class Batch:
    """What every stage of one experiment and batch size shares."""

    exp: Experiment
    model: VLTask
    settings: list[Setting]
    inputs: dict[str, torch.Tensor]  # the batch (`make_batch`), on the device, images in the weights' dtype
    device: torch.device
    precision: str
    options: Options
    train_model: VLTask  # fp32 weights: the training step, under `train_precision`, and the fp32 reference
    train_inputs: dict[str, torch.Tensor]
    train_precision: str
    reference: bool  # the fp32 baseline (`REFERENCE`) is timed and probed beside the settings

    @property
    def backbone(self) -> torch.nn.Module:
        return self.model.backbone

    @property
    def batch_size(self) -> int:
        return examples_of(self.inputs)

    @property
    def small(self) -> dict[str, torch.Tensor]:
        """The batch the op counter and the kernel count see (its first `OPS_BATCH` examples; the first has the
        full text length, so the padding stays the same)."""
        return {k: v[:OPS_BATCH] for k, v in self.inputs.items()}

    @property
    def tag(self) -> str:
        return f"[{self.exp.name} b{self.batch_size}]"

    def log(self, message: str) -> None:
        if self.options.verbose:
            print(message, flush=True)

    def warn(self, message: str) -> None:
        print(f"WARNING: {message}", file=sys.stderr)

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """What every timed or probed forward runs under: ``torch.inference_mode`` and the precision's autocast."""
        with torch.inference_mode(), autocast(self.device, self.precision):
            yield

    def timer_context(self, name: str) -> contextlib.AbstractContextManager:
        """`interleaved_times`'s per-sample context for inference (outside the timed region); the fp32 reference
        runs without autocast."""
        return torch.inference_mode() if name == REFERENCE else self.inference()


@dataclass
class Timing:
    """The timed inference rounds: seconds per forward of every setting, one sample per round."""

    times: dict[str, list[float]]
    inner: dict[str, int]
    warmup: int
    rounds: int
    min_sample_s: float


@dataclass
class Measured:
    """What the stages measured for one batch (`results` writes it out)."""

    probes: dict[str, dict]
    ops: dict[str, dict] = field(default_factory=dict)
    kernels: dict[str, dict | None] = field(default_factory=dict)
    train_probe: dict[str, dict] = field(default_factory=dict)
    compile_s: dict[str, float] = field(default_factory=dict)
    timing: Timing | None = None
    profiled: dict[str, dict] = field(default_factory=dict)
    train_times: dict[str, list[float]] = field(default_factory=dict)
    train_rounds: int = 0
    kernels_used: dict[str, dict] = field(default_factory=dict)  # CPU: what the matmuls ran on
    agreement: dict[str, list[dict]] = field(default_factory=dict)  # tokens kept, merged as in fp32


# ---- stage 0: inputs and checks ----------------------------------------------------------------------------------
def prepare(
    exp: Experiment,
    model: VLTask,
    settings: list[Setting],
    batch_size: int,
    device: torch.device,
    precision: str,
    options: Options,
    train_model: VLTask,
) -> Batch:
    """The batch's inputs (on the device, images in the weights' dtype; fp32 for ``train_model``, the fp32 weights
    of a half-weight run); refuses options the run cannot honour."""
    if options.cuda_graph and device.type != "cuda":
        raise ValueError("--cuda-graph needs a CUDA device")
    fp32_inputs = to_device(make_batch(exp, model.backbone, batch_size, seed=options.seed), device)
    half = weight_dtype(precision) != torch.float32
    inputs = {**fp32_inputs, "pixel_values": fp32_inputs["pixel_values"].to(weight_dtype(precision))}
    batch = Batch(
        exp,
        model,
        settings,
        inputs,
        device,
        precision,
        options,
        train_model,
        fp32_inputs,
        train_precision=mixed_precision(precision),
        reference=half and device.type == "cpu" and options.fp32_reference and not options.compile,
    )
    # every compiled reduction step specialises on its plan and batch size; whole forwards on the setting
    raise_recompile_limits(16 * len(settings) * exp.images_per_example)
    return batch


# ---- stage 1: probe (FLOPs, memory, tokens) ------------------------------------------------------------------------
def _probe(batch: Batch, setting: Setting, run: Callable) -> dict:
    """FLOPs, memory and token counts of one forward (eager, so the instruments see every op)."""
    device, model, inputs = batch.device, batch.model, batch.inputs
    static = [*model.parameters(), *model.buffers(), *inputs.values()]
    cpu = device.type == "cpu"  # CUDA: the memory of a separate plain forward
    t0 = time.perf_counter()
    with batch.inference(), peak_memory(device, static) if cpu else contextlib.nullcontext() as memory:
        with flops_by_module() as flops:
            logits, tokens = run()
    finite = bool(torch.isfinite(logits).all())
    synchronize(device)
    probe_s = time.perf_counter() - t0
    if not cpu:
        with batch.inference(), peak_memory(device, static) as memory:
            run()
    checked = _token_check(batch, setting, tokens)
    return {"flops": flops, "memory": memory, **checked, "outputs_finite": finite, "probe_s": probe_s}


def _per_row(sums: list[float], rows: int) -> list[float | int]:
    """Tokens per image-text pair from a `TokenTally`'s sums (ints where whole, as every pass of a batch is)."""
    means = [v / rows for v in sums]
    return [int(v) if float(v).is_integer() else v for v in means]


def _token_check(batch: Batch, setting: Setting, tokens: TokenTally) -> dict:
    """The tokens entering every layer, per image-text pair of the task's forward (`TokenTally`), against what the
    schedule's plan predicts."""
    backbone = batch.backbone
    n_image, n_text = backbone.num_image_tokens, batch.inputs["input_ids"].shape[1]
    if setting.schedule is None:
        expected = ([n_image] * backbone.num_layers, [n_text] * backbone.num_layers)
    else:
        expected = setting.schedule.tokens_per_layer(n_image, n_text, backbone.num_layers)
    observed = {"image": _per_row(tokens.image, tokens.rows), "text": _per_row(tokens.text, tokens.rows)}
    planned = {"image": list(expected[0]), "text": list(expected[1])}
    return {"tokens_per_layer": observed, "tokens_planned": planned, "tokens_match_plan": observed == planned}


def probe_settings(batch: Batch, eager: dict[str, Callable]) -> dict[str, dict]:
    """Stage 1: `_probe` every setting (eager reduction step); the probe's wall time sizes the warm-up."""
    batch.log(f"{batch.tag} probe: FLOPs, memory, tokens per layer ({len(batch.settings)} settings)")
    probes = {}
    for s in batch.settings:
        with batch.backbone.using_reducer_impl("eager"):
            p = probes[s.name] = _probe(batch, s, eager[s.name])
        check = "ok" if p["tokens_match_plan"] else "MISMATCH with plan()"
        batch.log(
            f"  {s.name:>14}: {p['flops']['total'] / batch.batch_size / 1e9:8.3f} GFLOPs/ex, peak "
            f"{p['memory']['peak_mem_bytes'] / 2**20:8.1f} MiB, image tokens {p['tokens_per_layer']['image']} "
            f"({check})"
        )
        if not p["tokens_match_plan"]:
            batch.warn(f"{batch.exp.name}/{s.name}: traced token counts differ from the plan")
        if p["flops"]["uncounted_ops"]:
            batch.warn(
                f"{batch.exp.name}/{s.name}: ops ran without a FLOP formula: {p['flops']['uncounted_ops']}"
            )
    return probes


# ---- stage 2: launch overhead (ops per forward, compiled-step kernels) ----------------------------------------------
def _op_counts(model: VLTask, setting: Setting, inputs: dict[str, torch.Tensor]) -> dict:
    """Ops that do work in one forward with the eager reduction step (`OpCounter`)."""
    with model.backbone.using_reducer_impl("eager"):
        counter = count_ops(eager_runner(model, setting, inputs))
    return {
        "total": counter.total,
        "in_range": counter.in_range,
        "ranges": counter.ranges,
        "by_op": dict(counter.by_op),
    }


def count_settings_ops(batch: Batch) -> dict[str, dict]:
    """Stage 2a: `_op_counts` of every setting on the small batch."""
    small = batch.small
    ops = {s.name: _op_counts(batch.model, s, small) for s in batch.settings}
    batch.log(
        f"[{batch.exp.name}] ops per forward (batch {examples_of(small)}, eager reduction step): "
        + ", ".join(f"{name} {o['total']}" for name, o in ops.items())
    )
    return ops


def _compiled_step_kernels(model: VLTask, setting: Setting, inputs: dict[str, torch.Tensor]) -> dict:
    """Inductor's count for the backbone's compiled reduction steps of this setting."""
    run = eager_runner(model, setting, inputs)
    with torch.inference_mode(), model.backbone.using_reducer_impl("compiled"):
        return compiled_kernel_count(run)


def count_step_kernels(batch: Batch) -> dict[str, dict | None]:
    """Stage 2b: `_compiled_step_kernels` of the settings ``--kernel-count`` names; a failed compile is reported."""
    kernels: dict[str, dict | None] = {}
    which = batch.options.kernel_count
    if which == "none":
        return kernels
    for s in batch.settings:
        if s.schedule is None or (which == "released" and s.kind != "released"):
            continue
        batch.log(f"[{batch.exp.name}] compiling the reduction steps of {s.name} to count their kernels")
        try:
            kernels[s.name] = _compiled_step_kernels(batch.model, s, batch.small)
        except Exception as err:  # a failed compile is reported, not fatal to the timing
            batch.warn(f"{batch.exp.name}/{s.name}: compiled reduction step failed: {err!r}")
            kernels[s.name] = {"error": repr(err)}
    return kernels


def steps_per_forward(setting: Setting, model: VLTask, inputs: dict[str, torch.Tensor]) -> int:
    """Reduction steps in one forward of ``inputs`` (one per planned layer and backbone pass)."""
    if setting.schedule is None:
        return 0
    plan = setting.schedule.plan(model.backbone.num_image_tokens, inputs["input_ids"].shape[1])
    return len(plan) * model.images_per_example


# ---- stage 3: training step under the instruments ------------------------------------------------------------------
def _allocate_grads(model: torch.nn.Module) -> list[torch.Tensor]:
    """Zeroed parameter gradients, allocated before the step so that its peak is what the step itself adds."""
    grads = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        else:
            p.grad.zero_()
        grads.append(p.grad)
    return grads


def _train_probe(
    model: VLTask,
    setting: Setting,
    run: Callable,
    inputs: dict[str, torch.Tensor],
    device: torch.device,
    precision: str,
) -> dict:
    """One training forward + backward (train mode, summed logits) under the instruments.

    Parameter gradients are allocated beforehand and counted with the weights, so ``activation_peak_bytes`` is
    what the step adds: the activations kept for backward (the autograd graph) plus backward's temporaries. The
    paper's memory figures kept the autograd graph too (docs/official_code_differences.md#b15). Also returns the
    bytes autograd saves per block (`SavedBytesByPart`), the tokens entering each block and the FLOPs of forward +
    backward.
    """
    backbone = model.backbone
    model.train()
    grads = _allocate_grads(model)
    static = [*model.parameters(), *model.buffers(), *inputs.values(), *grads]
    saved = SavedBytesByPart(model, part_of, static)
    try:
        with torch.enable_grad(), peak_memory(device, static) as memory:
            with flops_by_module() as flops:
                with saved, autocast(device, precision):
                    logits, _ = run()
                logits.float().sum().backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    return {
        **memory,
        "saved_bytes_by_part": dict(sorted(saved.by_part.items(), key=lambda kv: part_key(kv[0]))),
        "tokens_by_part": tokens_by_part(
            setting.schedule,
            backbone.num_image_tokens,
            inputs["input_ids"].shape[1],
            backbone.num_layers,
            model.images_per_example,
            list(saved.by_part),
        ),
        "flops": flops["total"],
    }


def training_runs(batch: Batch) -> list[tuple[str, Setting, str]]:
    """``(name, setting, precision)`` of every training step measured: each setting under the training precision,
    then (with ``batch.reference``) the fp32 baseline, all on the fp32 weights of ``batch.train_model``."""
    runs = [(s.name, s, batch.train_precision) for s in batch.settings]
    if batch.reference:
        runs.append((REFERENCE, next(s for s in batch.settings if s.schedule is None), "fp32"))
    return runs


def probe_training(batch: Batch, runs: dict[str, Callable]) -> dict[str, dict]:
    """Stage 3: `_train_probe` every training step of `training_runs` (memory kept for backward, FLOPs)."""
    batch.log(f"{batch.tag} training step ({batch.train_precision}): memory kept for backward, FLOPs")
    probes = {}
    for name, setting, precision in training_runs(batch):
        t = probes[name] = _train_probe(
            batch.train_model, setting, runs[name], batch.train_inputs, batch.device, precision
        )
        batch.log(
            f"  {name:>14}: peak {t['peak_mem_bytes'] / 2**20:8.1f} MiB, activations "
            f"{t['activation_peak_bytes'] / 2**20:8.1f} MiB, saved for backward "
            f"{sum(t['saved_bytes_by_part'].values()) / 2**20:8.1f} MiB"
        )
    return probes


# ---- stages 4-5: warm-up and timed inference rounds -----------------------------------------------------------------
def _fmt_times(times: dict[str, list[float]], index: int) -> str:
    return ", ".join(f"{name} {ts[index]:.3g}s" for name, ts in times.items() if ts)


def _interleaved(
    batch: Batch,
    runs: dict[str, Callable],
    rounds: int,
    label: str | None = None,
    inner: int | dict[str, int] = 1,
    context: Callable[[str], contextlib.AbstractContextManager] | None = None,
) -> dict[str, list[float]]:
    """`interleaved_times` of ``runs`` on the batch's device: samples synchronised, each under ``context`` (default:
    inference mode and autocast), rotated order; no untimed warm-up (the bench's warm-up rounds are timed, as
    they size the samples). Logs every round as ``label i/rounds: <times>``."""

    def on_round(r: int, times: dict[str, list[float]]) -> None:
        batch.log(f"{label} {r + 1}/{rounds}: " + _fmt_times(times, -1))

    return interleaved_times(
        runs,
        rounds,
        warmup=0,
        sync=batch.device,
        inner=inner,
        context=context or batch.timer_context,
        desc=None,
        on_round=None if label is None else on_round,
    )


def _rounds(
    fixed: int | None, round_s: float, budget_s: float, options: Options, min_rounds: int | None = None
) -> int:
    """``fixed``, or as many rounds of ``round_s`` as fit in ``budget_s`` within the options' bounds."""
    if fixed is not None:
        return fixed
    low = options.min_rounds if min_rounds is None else min_rounds
    return int(min(options.max_rounds, max(low, budget_s // max(round_s, 1e-9))))


def timed_runners(batch: Batch, eager: dict[str, Callable]) -> tuple[dict[str, Callable], dict[str, float]]:
    """The forwards the rounds time: eager, or compiled (``--compile``; the first call, timed, compiles), then
    captured as CUDA graphs (``--cuda-graph``). Returns them and the compile seconds of every setting."""
    options, settings = batch.options, batch.settings
    runners, compile_s = eager, {}
    if options.compile:
        runners = {
            s.name: compiled_runner(
                batch.model, s, batch.inputs, options.compile_backend, options.compile_mode
            )
            for s in settings
        }
        batch.log(f"{batch.tag} compiling {len(settings)} settings (fullgraph=True, dynamic=False)")
        compile_s = {name: ts[0] for name, ts in _interleaved(batch, runners, 1).items()}
    if options.cuda_graph:
        batch.log(f"{batch.tag} capturing {len(settings)} settings as CUDA graphs")
        runners = {name: graphed_runner(run, batch.device, batch.precision) for name, run in runners.items()}
    return runners, compile_s


def time_inference(batch: Batch, runners: dict[str, Callable], probes: dict[str, dict]) -> Timing:
    """Stages 4-5: warm-up rounds (their times, else the probe's, size the samples and the rounds), then the
    timed rounds; both interleaved and rotated by `interleaved_times` under inference mode and autocast."""
    options, device = batch.options, batch.device
    min_sample_s = options.min_sample_s
    if min_sample_s is None:
        min_sample_s = CUDA_MIN_SAMPLE_S if device.type == "cuda" else 0.0
    warmup = options.warmup
    if warmup is None:
        probe_round = sum(p["probe_s"] for p in probes.values())
        warmup = 1 if device.type == "cuda" or options.compile or probe_round <= WARMUP_MAX_PROBE_S else 0
    warm = _interleaved(batch, runners, warmup, label=f"{batch.tag} warm-up round")
    ref = {name: (min(warm[name]) if warm[name] else probes[name]["probe_s"]) for name in runners}
    inner = {name: max(1, math.ceil(min_sample_s / max(t, 1e-9))) for name, t in ref.items()}
    round_s = sum(inner[name] * t for name, t in ref.items())
    rounds = _rounds(options.rounds, round_s, options.budget_s, options)
    batch.log(
        f"{batch.tag} timing {rounds} interleaved rounds (~{round_s:.1f} s each, about "
        f"{rounds * round_s:.0f} s; {torch.get_num_threads()} threads, {device.type} {batch.precision})"
    )
    times = _interleaved(batch, runners, rounds, label="  round", inner=inner)
    if rounds > 1:
        noise = ", ".join(f"{name} {spread(ts):.2f}x" for name, ts in times.items())
        batch.log(f"{batch.tag} round-to-round spread (slowest / fastest sample): {noise}")
    return Timing(times, inner, warmup, rounds, min_sample_s)


# ---- stage 6: the reducer's share of the time -----------------------------------------------------------------------
def reducer_shares(batch: Batch, runners: dict[str, Callable], inner: dict[str, int]) -> dict[str, dict]:
    """Stage 6: one profiled sample per setting, through the ranges the backbones open around every reduction
    step (`reduce_range_profile`); on CPU the baseline is skipped, on CUDA its kernel launches are counted too."""
    device, options = batch.device, batch.options
    profiled: dict[str, dict] = {}
    for s in batch.settings:
        if s.schedule is None and device.type != "cuda":
            continue
        with batch.inference():
            profiled[s.name] = reduce_range_profile(runners[s.name], device, forwards=inner[s.name])
    unranged = [s.name for s in batch.settings if s.schedule is not None and not profiled[s.name]["ranges"]]
    if unranged and not (options.compile or options.cuda_graph):
        batch.warn(
            f"{batch.exp.name}: no {REDUCE_RANGE!r} profiler ranges in the reduced forwards; "
            "reducer_time_share is null"
        )
    return profiled


# ---- stage 7: training rounds -------------------------------------------------------------------------------------
def _train_step(
    model: VLTask, run: Callable, optimizer: torch.optim.Optimizer, device: torch.device, precision: str
) -> Callable:
    """One training step as a fine-tune runs it: zero_grad, forward (autocast), backward, AdamW step."""

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            logits, _ = run()
        logits.float().sum().backward()
        optimizer.step()

    return step


def time_training(batch: Batch, runs: dict[str, Callable]) -> tuple[dict[str, list[float]], int]:
    """Stage 7: forward + backward + AdamW step of every training step of `training_runs` in train mode, a warm-up
    round (which also allocates AdamW's state and sizes the rounds) then interleaved rounds as for inference.
    Returns the times and rounds."""
    options, model, device = batch.options, batch.train_model, batch.device
    optimizer = torch.optim.AdamW(model.parameters(), lr=TRAIN_LR)
    steps = {
        name: _train_step(model, runs[name], optimizer, device, precision)
        for name, _, precision in training_runs(batch)
    }
    model.train()
    try:
        warm = _interleaved(batch, steps, 1, context=_grad)
        round_s = sum(ts[0] for ts in warm.values())
        budget = options.budget_s if options.train_budget_s is None else options.train_budget_s
        rounds = _rounds(options.train_rounds, round_s, budget, options, options.train_min_rounds)
        batch.log(
            f"{batch.tag} timing {rounds} interleaved training rounds (forward + backward + AdamW step, "
            f"~{round_s:.1f} s each)"
        )
        times = _interleaved(batch, steps, rounds, label="  training round", context=_grad)
    finally:
        optimizer.zero_grad(set_to_none=True)
        del optimizer, steps
        model.eval()
    return times, rounds


def _grad(_name: str) -> contextlib.AbstractContextManager:
    return torch.enable_grad()
