"""The bench protocol: probe, warm up, then time every setting in interleaved rounds in one process.

For each experiment and batch size:

1. **Probe** (one forward per setting, which is also its first warm-up call): FLOPs with
   `FlopCounterMode` (+ the CPU SDPA formula), peak memory (CPU: `TensorMemoryTracker`; CUDA: a separate
   plain forward under ``max_memory_allocated``), and the tokens entering every layer from the backbone's trace,
   checked against `ReducerSchedule.tokens_per_layer` (what `plan()` predicts). Probes run the eager
   reduction step, so the instruments see every op.
2. **Launch overhead**: `OpCounter` counts the ops that do work in one forward of a batch of 2 (eager
   reduction step): ``ops_per_forward``, and ``reducer_ops_per_step`` = (reduced - baseline) / reduction steps.
   Inductor's own kernel count for the backbone's compiled reduction step (``reducer_impl="compiled"``) and the
   extern calls it leaves (`compiled_kernel_count`).
3. **Training step** (unless ``train=False``): per setting, one forward + backward (parameter gradients
   allocated beforehand, so the peak is what the step adds: activations kept for backward and backward's
   temporaries) under the memory instrument, with the bytes autograd saves attributed to each block
   (`SavedBytesByPart`), which gives the memory bound; training FLOPs of forward + backward.
4. **Warm-up**: ``warmup`` plain rounds over all settings (default: one on CUDA, with ``--compile``, or when a
   round is short; none when a CPU round takes over 30 s, as the probe forward already warmed every setting);
   the warm-up (else the probe) times size the timed rounds.
5. **Timed rounds**: every round times each setting once (``inner`` forwards per sample when one forward is
   shorter than ``min_sample_s``, as on a GPU), in an order rotated by one each round so that no setting always
   runs first or after the same neighbour: `pumer_lightning.measure.interleaved_times`, the package's one timer.
   Timing is wall clock around synchronised forwards under ``torch.inference_mode`` (and autocast for
   fp16/bf16), entered outside the timed region. Nothing is instrumented in the timed forwards.
6. **Reducer share**: one profiled sample per reduced setting; `torch.profiler` time inside the
   ``pumer.reduce`` ranges the backbones open (`reduce_range_profile`).
7. **Training rounds** (unless ``train=False``): forward + backward + AdamW step per setting, interleaved and
   rotated as the inference rounds.

Speedups are ratios of medians within the process (`pumer_lightning.measure.speedup`); a paired speedup
(baseline / setting in the same round, `pumer_lightning.measure.paired_speedups`) is reported too, as it cancels
drift of the machine's speed between rounds. Every forward runs its setting's schedule through
``backbone.using(schedule)``, so the model's own schedule is restored after each call, error or not.

The stages are in `stages`, the forwards they time in `forwards`, the JSON they make in `results`, the options
(and the CLI generated from them) in `options`.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType

from pumer_lightning.lab.context import autocast, resolve_device, to_device, weight_dtype
from pumer_lightning.reduce import ABLATIONS as REDUCE_ABLATIONS
from pumer_lightning.tasks import VLTask

from . import report, stages
from .experiments import ABLATIONS, Experiment, Setting, build_task, get_experiment, make_batch, make_settings
from .forwards import eager_runner
from .measure import synchronize
from .options import Options
from .precision import kernel_report, probe_reference, run_precisions, token_agreement
from .results import build_result
from .stages import REFERENCE, Measured

RANGE_PREFIX = "pumer."
KERNEL_SETTINGS = ("baseline", "pumer")  # whose forward is run once under the libraries' verbose modes


def log(options: Options, message: str) -> None:
    if options.verbose:
        print(message, flush=True)


def default_name(
    exp: Experiment,
    device: torch.device,
    precision: str,
    batch: int,
    compiled: bool,
    graphed: bool = False,
    reducer_impl: str | None = None,
) -> str:
    tag = device.type if precision == "fp32" else f"{device.type}-{precision}"
    return (
        f"{exp.name}_{tag}_b{batch}"
        + ("_compiled" if compiled else "")
        + ("_graphed" if graphed else "")
        + (f"_reducer-{reducer_impl}" if reducer_impl else "")
    )


def select_settings(exp: Experiment, options: Options) -> list[Setting]:
    """The settings ``options.settings`` names (all by default; the baseline always). Besides the default
    ablations (`ABLATIONS`), any other ablation of `pumer_lightning.reduce.ABLATIONS` can be named."""
    extra = tuple(n for n in options.settings or () if n in REDUCE_ABLATIONS and n not in ABLATIONS)
    settings = make_settings(exp, options.keep_sweep, ABLATIONS + extra)
    if options.settings is None:
        return settings
    known = {s.name for s in settings}
    wanted = []
    for name in options.settings:
        if name not in known:
            raise ValueError(
                f"unknown setting {name!r} for {exp.name}; choose from {sorted(known | set(REDUCE_ABLATIONS))} "
                f"(sweep points are keep_<ratio> for the ratios in --keep-sweep)"
            )
        wanted.append(name)
    if "baseline" not in wanted:
        wanted.insert(0, "baseline")  # every ratio is taken against it
    return [s for s in settings if s.name in wanted]


# ---- one experiment ---------------------------------------------------------------------------------------------
def measure_batch(
    exp: Experiment,
    model: VLTask,
    settings: list[Setting],
    batch_size: int,
    device: torch.device,
    precision: str,
    options: Options,
    train_model: VLTask | None = None,
) -> dict:
    """Run the protocol for one batch size (the stages in `stages`); returns the result dict that becomes the JSON.

    ``train_model`` holds the fp32 weights of a half-weight run (the training step and the fp32 reference run on
    it); None: ``model`` itself. The model's own schedule is left as it was: every forward runs its setting through
    ``backbone.using``.
    """
    train_model = model if train_model is None else train_model
    batch = stages.prepare(exp, model, settings, batch_size, device, precision, options, train_model)
    eager = {s.name: eager_runner(model, s, batch.inputs) for s in settings}
    train_runs = {s.name: eager_runner(train_model, s, batch.train_inputs) for s in settings}
    if batch.reference:  # the fp32 baseline, timed beside the settings
        train_runs[REFERENCE] = eager[REFERENCE] = train_runs["baseline"]
    m = Measured(probes=stages.probe_settings(batch, eager))  # 1. FLOPs, memory, tokens
    if device.type == "cpu":  # what the matmuls ran on
        with batch.inference():
            m.kernels_used = {
                s.name: kernel_report(eager[s.name]) for s in settings if s.name in KERNEL_SETTINGS
            }
    if options.op_count:
        m.ops = stages.count_settings_ops(batch)  # 2. launch overhead: ops per forward
    m.kernels = stages.count_step_kernels(batch)  # 2. the compiled reduction step's kernels
    if options.train:
        m.train_probe = stages.probe_training(batch, train_runs)  # 3. memory kept for backward
    if batch.reference:
        m.probes[REFERENCE] = probe_reference(train_model, batch.train_inputs, eager[REFERENCE])
        m.agreement = {
            s.name: token_agreement(model, train_model, s.schedule, batch.inputs, batch.train_inputs)
            for s in settings
            if s.kind == "released"
        }
    runners, m.compile_s = stages.timed_runners(batch, eager)
    m.timing = stages.time_inference(batch, runners, m.probes)  # 4-5. warm-up and timed rounds
    m.profiled = stages.reducer_shares(batch, runners, m.timing.inner)  # 6. the reducer's share
    if options.train:
        m.train_times, m.train_rounds = stages.time_training(batch, train_runs)  # 7. training rounds
    name = options.name or default_name(
        exp, device, precision, batch_size, options.compile, options.cuda_graph, options.reducer_impl
    )
    return build_result(batch, m, name)


# ---- entry point ------------------------------------------------------------------------------------------------
def run_bench(exp_names: list[str], options: Options) -> list[dict]:
    """Run the bench for every experiment and batch size; writes JSON, Markdown and PNG; returns the results."""
    threads = torch.get_num_threads()
    if options.threads:
        torch.set_num_threads(options.threads)
    try:
        return _run_bench(exp_names, options)
    finally:
        torch.set_num_threads(threads)


def _run_bench(exp_names: list[str], options: Options) -> list[dict]:
    device = resolve_device(options.device)
    precisions = run_precisions(options.precision, options.cpu_bf16, device)
    exps = [get_experiment(name, tiny=options.tiny) for name in exp_names]
    if options.name and (len(exps) > 1 or len(options.batch_sizes) > 1 or len(precisions) > 1):
        raise ValueError(
            "--name names one output; it needs a single experiment, batch size and precision (this run measures "
            f"{', '.join(precisions)}: pick one with --precision)"
        )
    out_dir = Path(options.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    all_results = []
    for exp in exps:
        t0 = time.perf_counter()
        settings = select_settings(exp, options)
        model = build_task(exp, options.seed, options.reducer_impl).to(device)
        n_params = sum(p.numel() for p in model.parameters())
        log(
            options,
            f"[{exp.name}] {exp.preset} + {exp.task} head, {n_params / 1e6:.1f}M params, random weights; "
            f"settings: {', '.join(s.name for s in settings)}; precisions: {', '.join(precisions)}",
        )
        for precision in precisions:
            # half-weight precisions: the weights are cast once here, never per call; the fp32 ones stay for the
            # training step (its autocast counterpart) and the fp32 reference
            dtype = weight_dtype(precision)
            run_model = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
            all_results.extend(_run_precision(exp, run_model, model, settings, device, precision, options))
            del run_model
        log(options, f"[{exp.name}] done in {time.perf_counter() - t0:.0f} s")
        del model
    return all_results


def _run_precision(
    exp: Experiment,
    model: VLTask,
    fp32_model: VLTask,
    settings: list[Setting],
    device: torch.device,
    precision: str,
    options: Options,
) -> list[dict]:
    """Every batch size of one experiment in one precision: the results, written as JSON, Markdown and PNG."""
    out_dir = Path(options.out_dir)
    per_batch = []
    for batch in options.batch_sizes:
        result = measure_batch(exp, model, settings, batch, device, precision, options, fp32_model)
        if options.profile:
            result["profile"] = profile_settings(model, settings, exp, batch, device, precision, options)
        paths = report.write_result(result, out_dir, plot=options.plot)
        log(options, report.summary(result))
        log(options, "wrote " + ", ".join(str(p) for p in paths))
        per_batch.append(result)
    if len(per_batch) > 1:
        paths = report.write_batch_sweep(per_batch, out_dir, plot=options.plot)
        log(options, "wrote " + ", ".join(str(p) for p in paths))
    return per_batch


def profile_settings(
    model: VLTask,
    settings: list[Setting],
    exp: Experiment,
    batch_size: int,
    device: torch.device,
    precision: str,
    options: Options,
) -> dict:
    """Where the time goes: `torch.profiler` self time by op for the baseline and the released setting."""
    from torch.profiler import ProfilerActivity, profile

    inputs = to_device(make_batch(exp, model.backbone, batch_size, seed=options.seed), device)
    inputs["pixel_values"] = inputs["pixel_values"].to(weight_dtype(precision))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = {}
    for s in settings:
        if s.name not in ("baseline", "pumer"):
            continue
        run = eager_runner(model, s, inputs)
        with torch.inference_mode(), autocast(device, precision):
            run()  # warm
            synchronize(device)
            with profile(activities=activities) as prof:
                t0 = time.perf_counter()
                run()
                synchronize(device)
                wall = time.perf_counter() - t0
        device_side = device.type == "cuda"
        self_attr = "self_device_time_total" if device_side else "self_cpu_time_total"
        incl_attr = "device_time_total" if device_side else "cpu_time_total"
        host = [e for e in prof.events() if e.device_type == DeviceType.CPU and not e.is_async]
        ranges: dict[str, float] = {}
        for e in host:  # the backbones' own record_function ranges (pumer.reduce ...), host-side events only
            if e.name.startswith(RANGE_PREFIX):
                ranges[e.name] = ranges.get(e.name, 0.0) + getattr(e, incl_attr) / 1e6
        averages = prof.key_averages()
        events = [(e.key, getattr(e, self_attr) / 1e6, e.count) for e in averages if e.key not in ranges]
        total = sum(t for _, t, _ in events) or 1.0
        events.sort(key=lambda e: -e[1])
        # ranges include the Python time between their ops: on CPU they are shares of the forward's wall time
        range_total = total if device_side else wall
        out[s.name] = {
            "total_s": total,
            "wall_s": wall,
            "ops": [{"op": k, "self_s": t, "share": t / total, "calls": c} for k, t, c in events[:25]],
            # inclusive time of the `record_function` ranges named pumer.* that the backbones open
            "ranges": {k: {"s": t, "share": t / range_total} for k, t in sorted(ranges.items())},
        }
        log(
            options,
            f"[{exp.name} b{batch_size}] profiled {s.name}: top op {events[0][0]} {events[0][1]:.3f} s",
        )
    return out
