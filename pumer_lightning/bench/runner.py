"""The bench protocol: probe, warm up, then time every setting in interleaved rounds in one process.

For each experiment and batch size:

1. **Probe** (one forward per setting, which is also its first warm-up call): FLOPs with
   `FlopCounterMode` (+ the CPU SDPA formula), peak memory (CPU: `TensorMemoryTracker`; CUDA: a separate
   plain forward under ``max_memory_allocated``), and the tokens entering every layer from the backbone's trace,
   checked against `ReducerSchedule.tokens_per_layer` (what `plan()` predicts).
2. **Warm-up**: ``warmup`` plain rounds over all settings (default: one on CUDA, with ``--compile``, or when a
   round is short; none when a CPU round takes over 30 s, as the probe forward already warmed every setting);
   the warm-up (else the probe) times size the timed rounds.
3. **Timed rounds**: every round times each setting once (``inner`` forwards per sample when one forward is
   shorter than ``min_sample_s``, as on a GPU), in an order rotated by one each round so that no setting always
   runs first or after the same neighbour. Timing is wall clock around synchronised forwards under
   ``torch.inference_mode`` (and autocast for fp16/bf16). The reducer's own time is accumulated in the same
   forwards by `ReducerTimer`.

Speedups are ratios of medians within the process; a paired speedup (baseline / setting in the same round) is
reported too, as it cancels drift of the machine's speed between rounds.
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import report
from .experiments import (
    ABLATIONS,
    DEFAULT_KEEP_SWEEP,
    Experiment,
    Inputs,
    Setting,
    TaskModel,
    build_model,
    get_experiment,
    make_inputs,
    make_settings,
)
from .measure import (
    ReducerTimer,
    TensorMemoryTracker,
    autocast,
    count_flops,
    machine_info,
    synchronize,
)

SCHEMA = "pumer-lightning/bench/1"
RANGE_PREFIX = "pumer."
RANGE = "pumer.reducer"  # the profiler range the bench opens around each reducer call
QUICK_SETTINGS = ("baseline", "pumer")


@dataclass
class Options:
    """How to run the bench (the CLI's flags; see ``python -m pumer_lightning.bench --help``)."""

    batch_sizes: list[int] = field(default_factory=lambda: [8])
    settings: list[str] | None = None
    keep_sweep: tuple[float, ...] = DEFAULT_KEEP_SWEEP
    tiny: bool = False
    rounds: int | None = None
    budget_s: float = 120.0
    min_rounds: int = 5
    max_rounds: int = 20
    warmup: int | None = None
    train_memory: bool = False
    min_sample_s: float | None = None
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: str | None = None
    cuda_graph: bool = False
    profile: bool = False
    out_dir: Path = Path("results/bench")
    name: str | None = None
    seed: int = 0
    plot: bool = True
    verbose: bool = True
    command: str | None = None


def log(options: Options, message: str) -> None:
    if options.verbose:
        print(message, flush=True)


def resolve_device(options: Options) -> tuple[torch.device, str]:
    if options.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(options.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but torch.cuda.is_available() is False")
    precision = options.precision
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"precision must be auto, fp32, fp16 or bf16, got {precision!r}")
    return device, precision


def default_name(
    exp: Experiment, device: torch.device, precision: str, batch: int, compiled: bool, graphed: bool = False
) -> str:
    tag = device.type if precision == "fp32" else f"{device.type}-{precision}"
    return f"{exp.name}_{tag}_b{batch}" + ("_compiled" if compiled else "") + ("_graphed" if graphed else "")


def select_settings(exp: Experiment, options: Options) -> list[Setting]:
    settings = make_settings(exp, options.keep_sweep)
    if options.settings is None:
        return settings
    known = {s.name for s in settings}
    wanted = []
    for name in options.settings:
        if name not in known:
            raise ValueError(
                f"unknown setting {name!r} for {exp.name}; choose from {sorted(known)} "
                f"(sweep points are keep_<ratio> for the ratios in --keep-sweep)"
            )
        wanted.append(name)
    if "baseline" not in wanted:
        wanted.insert(0, "baseline")  # every ratio is taken against it
    return [s for s in settings if s.name in wanted]


# ---- forward callables ------------------------------------------------------------------------------------------
def _eager_runner(model: TaskModel, setting: Setting, inputs: Inputs) -> Callable:
    def run():
        model.backbone.reducer = setting.schedule
        return model(*inputs.args())

    return run


def _compiled_runner(
    model: TaskModel, setting: Setting, inputs: Inputs, backend: str = "inductor", mode: str | None = None
) -> Callable:
    """``torch.compile(fullgraph=True, dynamic=False)`` of the task forward with this setting's reducer.

    Each setting gets a shallow copy of the backbone (parameters shared) holding its own schedule, so the
    compiled graphs specialise on it and all settings stay compiled side by side.
    """
    backbone = copy.copy(model.backbone)
    backbone.reducer = setting.schedule
    head = model.head

    def forward(pixel_values, input_ids, attention_mask):
        outs = [
            backbone(images, input_ids, attention_mask, image_index=i)
            for i, images in enumerate(pixel_values)
        ]
        return head(torch.cat([o.pooled for o in outs], dim=-1)), [o.trace for o in outs]

    compiled = torch.compile(forward, fullgraph=True, dynamic=False, backend=backend, mode=mode)
    return lambda: compiled(*inputs.args())


def _graphed_runner(run: Callable, device: torch.device, precision: str) -> Callable:
    """The forward captured once as a CUDA graph and replayed: no Python or kernel-launch cost per call.

    Every shape in a reduced forward is static (the counts come from the schedule, never from the data), so one
    capture per setting holds the whole forward, the reducer's top-k, matching and merging included. Warm-up runs
    on a side stream first, as capture requires; autocast's weight cache is off while capturing (cached casts
    made inside a capture would point into the graph's private pool).
    """
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

    def amp():
        return torch.autocast("cuda", dtype=dtype, cache_enabled=False) if dtype else contextlib.nullcontext()

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.inference_mode(), amp():
        for _ in range(2):
            run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), amp(), torch.cuda.graph(graph):
        out = run()

    def replay():
        graph.replay()
        return out

    return replay


def _raise_recompile_limits(n: int) -> None:
    config = torch._dynamo.config
    for name in (
        "recompile_limit",
        "cache_size_limit",
        "accumulated_recompile_limit",
        "accumulated_cache_size_limit",
    ):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 4 * n + 8))


# ---- one experiment ---------------------------------------------------------------------------------------------
def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _probe(
    model: TaskModel,
    setting: Setting,
    run: Callable,
    inputs: Inputs,
    device: torch.device,
    precision: str,
) -> dict:
    """FLOPs, memory and token counts of one forward (eager, so the instruments see every op)."""
    static = [*model.parameters(), *model.buffers(), *inputs.tensors()]
    tracker = TensorMemoryTracker(static) if device.type == "cpu" else None
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast(device, precision):
        if tracker is not None:
            with tracker, count_flops() as flops:
                logits, traces = run()
        else:
            with count_flops() as flops:
                logits, traces = run()
    finite = bool(torch.isfinite(logits).all())
    synchronize(device)
    probe_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with torch.inference_mode(), autocast(device, precision):
            run()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        memory = {"peak_mem_bytes": int(peak), "activation_peak_bytes": int(peak - before)}
    else:
        memory = {"peak_mem_bytes": tracker.peak_bytes, "activation_peak_bytes": tracker.peak_new_bytes}

    first = traces[0]
    per_pass_equal = all(
        (t.image_tokens, t.text_tokens) == (first.image_tokens, first.text_tokens) for t in traces[1:]
    )
    backbone = model.backbone
    n_image, n_text = backbone.num_image_tokens, inputs.input_ids.shape[1]
    if setting.schedule is None:
        expected = ([n_image] * backbone.num_layers, [n_text] * backbone.num_layers)
    else:
        expected = setting.schedule.tokens_per_layer(n_image, n_text, backbone.num_layers)
    observed = (list(first.image_tokens), list(first.text_tokens))
    return {
        "flops": flops,
        "memory": memory,
        "tokens_per_layer": {"image": observed[0], "text": observed[1]},
        "tokens_planned": {"image": list(expected[0]), "text": list(expected[1])},
        "tokens_match_plan": observed == (list(expected[0]), list(expected[1])) and per_pass_equal,
        "outputs_finite": finite,
        "probe_s": probe_s,
    }


def _train_memory(
    model: TaskModel, run: Callable, inputs: Inputs, device: torch.device, precision: str
) -> dict:
    """Peak memory of one training step without optimiser state: forward with autograd, backward of the summed
    logits, parameter gradients allocated (the setting the paper's memory figures resemble: its harness kept the
    autograd graph, docs/official_code_differences.md#b15)."""
    static = [*model.parameters(), *model.buffers(), *inputs.tensors()]
    model.zero_grad(set_to_none=True)
    tracker = TensorMemoryTracker(static) if device.type == "cpu" else None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with torch.enable_grad():
        if tracker is not None:
            with tracker:
                with autocast(device, precision):
                    logits, _ = run()
                logits.float().sum().backward()
        else:
            with autocast(device, precision):
                logits, _ = run()
            logits.float().sum().backward()
    synchronize(device)
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mem_bytes": int(peak), "activation_peak_bytes": int(peak - before)}
    return {"peak_mem_bytes": tracker.peak_bytes, "activation_peak_bytes": tracker.peak_new_bytes}


def _time_sample(
    run: Callable, inner: int, device: torch.device, precision: str, timer: ReducerTimer | None
) -> tuple[float, float | None]:
    """Seconds per forward over ``inner`` forwards, and the seconds per forward spent in the reducer."""
    if timer is not None:
        timer.start()
    synchronize(device)
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast(device, precision):
        for _ in range(inner):
            run()
    synchronize(device)
    seconds = (time.perf_counter() - t0) / inner
    reducer = timer.elapsed() / inner if timer is not None else None
    return seconds, reducer


def _group_modules(by_module: dict[str, int], total: int) -> dict[str, int]:
    """FLOPs by part of the model (towers, blocks, head), from `FlopCounterMode`'s per-module counts.

    Every module's own FLOPs (its count minus those of the nearest counted modules below it) go to the part its
    name falls in. Modules only count while their ``forward`` runs, so work a backbone does in its own code
    outside any submodule call (ViLT's attention, METER's text-layer attention, the reducer's scores) lands in
    ``backbone (own code)``.
    """
    names = [n for n in by_module if n != "Global"]
    present = set(names)

    def parent(name: str) -> str | None:
        pieces = name.split(".")
        for cut in range(len(pieces) - 1, 0, -1):
            candidate = ".".join(pieces[:cut])
            if candidate in present:
                return candidate
        return None

    own = dict(by_module)
    for name in names:
        up = parent(name)
        if up is not None:
            own[up] -= by_module[name]
    parts: dict[str, int] = {}
    for name in names:
        rel = name.split(".")[1:]  # drop the root (the task model's class name)
        if not rel:
            key = "other"
        elif rel[0] != "backbone":
            key = rel[0]
        elif len(rel) == 1:
            key = "backbone (own code)"
        elif rel[1] == "encoder" and len(rel) >= 4:
            key = f"block.{rel[3]}"
        elif rel[1].startswith("cross_modal_") and rel[1].endswith("_layers") and len(rel) >= 3:
            key = f"{rel[1].removeprefix('cross_modal_')}.{rel[2]}"
        else:
            key = rel[1]
        parts[key] = parts.get(key, 0) + own[name]
    roots = sum(by_module[n] for n in names if parent(n) is None)
    parts["other"] = parts.get("other", 0) + total - roots
    return {k: v for k, v in sorted(parts.items(), key=lambda kv: _natural_key(kv[0])) if v}


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def measure_batch(
    exp: Experiment,
    model: TaskModel,
    settings: list[Setting],
    batch_size: int,
    device: torch.device,
    precision: str,
    options: Options,
) -> dict:
    """Run the protocol for one batch size; returns the result dict that becomes the JSON."""
    inputs = make_inputs(exp, model.backbone, batch_size, seed=options.seed).to(device)
    n = len(settings)
    eager = {s.name: _eager_runner(model, s, inputs) for s in settings}
    if options.compile:
        _raise_recompile_limits(n * exp.images_per_example)
        runners = {
            s.name: _compiled_runner(model, s, inputs, options.compile_backend, options.compile_mode)
            for s in settings
        }
    else:
        runners = eager
    if options.cuda_graph and device.type != "cuda":
        raise ValueError("--cuda-graph needs a CUDA device")

    log(options, f"[{exp.name} b{batch_size}] probe: FLOPs, memory, tokens per layer ({n} settings)")
    probes = {}
    for s in settings:
        probes[s.name] = _probe(model, s, eager[s.name], inputs, device, precision)
        p = probes[s.name]
        check = "ok" if p["tokens_match_plan"] else "MISMATCH with plan()"
        log(
            options,
            f"  {s.name:>14}: {p['flops']['total'] / batch_size / 1e9:8.3f} GFLOPs/ex, peak "
            f"{p['memory']['peak_mem_bytes'] / 2**20:8.1f} MiB, image tokens {p['tokens_per_layer']['image']} "
            f"({check})",
        )
        if not p["tokens_match_plan"]:
            print(f"WARNING: {exp.name}/{s.name}: traced token counts differ from the plan", file=sys.stderr)
        if p["flops"]["uncounted_ops"]:
            print(
                f"WARNING: {exp.name}/{s.name}: ops ran without a FLOP formula: {p['flops']['uncounted_ops']}",
                file=sys.stderr,
            )

    train_mem = {}
    if options.train_memory:
        log(options, f"[{exp.name} b{batch_size}] training-step memory (forward + backward, fp32 gradients)")
        for s in settings:
            train_mem[s.name] = _train_memory(model, eager[s.name], inputs, device, precision)
            log(options, f"  {s.name:>14}: peak {train_mem[s.name]['peak_mem_bytes'] / 2**20:8.1f} MiB")

    if options.compile:
        log(options, f"[{exp.name} b{batch_size}] compiling {n} settings (fullgraph=True, dynamic=False)")
        compile_s = {}
        for s in settings:
            t0 = time.perf_counter()
            with torch.inference_mode(), autocast(device, precision):
                runners[s.name]()
            synchronize(device)
            compile_s[s.name] = time.perf_counter() - t0

    if options.cuda_graph:
        log(options, f"[{exp.name} b{batch_size}] capturing {n} settings as CUDA graphs")
        runners = {s.name: _graphed_runner(runners[s.name], device, precision) for s in settings}

    min_sample_s = options.min_sample_s
    if min_sample_s is None:
        min_sample_s = 0.05 if device.type == "cuda" else 0.0
    warmup = options.warmup
    if warmup is None:
        probe_round = sum(p["probe_s"] for p in probes.values())
        warmup = 1 if device.type == "cuda" or options.compile or probe_round <= 30.0 else 0
    warm = {s.name: [] for s in settings}
    for r in range(warmup):
        for s in settings:
            t, _ = _time_sample(runners[s.name], 1, device, precision, None)
            warm[s.name].append(t)
        log(
            options,
            f"[{exp.name} b{batch_size}] warm-up round {r + 1}/{warmup}: " + _fmt_times(warm, -1),
        )
    ref = {s.name: (min(warm[s.name]) if warm[s.name] else probes[s.name]["probe_s"]) for s in settings}
    inner = {name: max(1, math.ceil(min_sample_s / max(t, 1e-9))) for name, t in ref.items()}
    round_s = sum(inner[name] * t for name, t in ref.items())
    if options.rounds is not None:
        rounds = options.rounds
    else:
        rounds = int(min(options.max_rounds, max(options.min_rounds, options.budget_s // max(round_s, 1e-9))))
    log(
        options,
        f"[{exp.name} b{batch_size}] timing {rounds} interleaved rounds (~{round_s:.1f} s each, about "
        f"{rounds * round_s:.0f} s; {torch.get_num_threads()} threads, {device.type} {precision})",
    )

    times = {s.name: [] for s in settings}
    reducer_s = {s.name: [] for s in settings}
    # compiled graphs hold the reducer fused in (patching the functions they traced would only force
    # recompiles), and a replayed CUDA graph runs no Python: the reducer share is measured in eager mode only
    static = options.compile or options.cuda_graph
    timer = ReducerTimer(model.backbone, device)
    with timer if not static else contextlib.nullcontext():
        timer_used = timer if (not static and timer.available) else None
        for r in range(rounds):
            order = settings[r % n :] + settings[: r % n]
            for s in order:
                t, red = _time_sample(runners[s.name], inner[s.name], device, precision, timer_used)
                times[s.name].append(t)
                reducer_s[s.name].append(red)
            log(options, f"  round {r + 1}/{rounds}: " + _fmt_times(times, -1))
    if not static and not timer.available:
        print(
            "WARNING: the backbone has no _reduction_inputs/reduce to time; reducer_time_share is null",
            file=sys.stderr,
        )

    base = "baseline"
    base_times = times[base]
    base_flops = probes[base]["flops"]["total"]
    base_mem = probes[base]["memory"]
    results = []
    for s in settings:
        ts = times[s.name]
        p = probes[s.name]
        flops = p["flops"]["total"]
        speedup = _median(base_times) / _median(ts)
        paired = [b / t for b, t in zip(base_times, ts)]
        flops_ratio = base_flops / flops if flops else None
        shares = [red / t for red, t in zip(reducer_s[s.name], ts) if red is not None]
        entry = {
            "name": s.name,
            "kind": s.kind,
            "description": s.description,
            "schedule": s.schedule_dict(),
            "examples_per_s": batch_size / _median(ts),
            "examples_per_s_min": batch_size / max(ts),
            "examples_per_s_max": batch_size / min(ts),
            "examples_per_s_rounds": [batch_size / t for t in ts],
            "seconds_per_batch": _median(ts),
            "inner_forwards_per_sample": inner[s.name],
            "speedup": speedup,
            # the fastest samples are the least disturbed by other load on a shared machine
            "speedup_best": min(base_times) / min(ts),
            "paired_speedup_median": _median(paired),
            "paired_speedup_min": min(paired),
            "paired_speedup_max": max(paired),
            "flops_per_example": flops / batch_size,
            "flops_ratio": flops_ratio,
            "flops_speedup_bound": flops_ratio,
            "bound_attainment": speedup / flops_ratio if flops_ratio else None,
            "flops_by_part": {
                k: v / batch_size for k, v in _group_modules(p["flops"]["by_module"], flops).items()
            },
            "flops_uncounted_ops": p["flops"]["uncounted_ops"],
            "peak_mem_bytes": p["memory"]["peak_mem_bytes"],
            "activation_peak_bytes": p["memory"]["activation_peak_bytes"],
            "peak_mem_ratio": p["memory"]["peak_mem_bytes"] / base_mem["peak_mem_bytes"],
            "activation_mem_ratio": (
                p["memory"]["activation_peak_bytes"] / base_mem["activation_peak_bytes"]
                if base_mem["activation_peak_bytes"]
                else None
            ),
            "tokens_per_layer": p["tokens_per_layer"],
            "tokens_planned": p["tokens_planned"],
            "tokens_match_plan": p["tokens_match_plan"],
            "outputs_finite": p["outputs_finite"],
            "reducer_time_share": _median(shares) if shares else None,
            "reducer_seconds_per_batch": (
                _median([x for x in reducer_s[s.name] if x is not None]) if shares else None
            ),
        }
        if options.train_memory:
            tm, base_tm = train_mem[s.name], train_mem[base]
            entry["train_peak_mem_bytes"] = tm["peak_mem_bytes"]
            entry["train_activation_peak_bytes"] = tm["activation_peak_bytes"]
            entry["train_activation_mem_ratio"] = (
                tm["activation_peak_bytes"] / base_tm["activation_peak_bytes"]
            )
        if options.compile:
            entry["compile_seconds"] = compile_s[s.name]
        if not p["outputs_finite"]:
            print(f"WARNING: {exp.name}/{s.name}: non-finite logits ({precision})", file=sys.stderr)
        results.append(entry)

    memory_method = (
        "cuda max_memory_allocated during a plain forward after reset_peak_memory_stats (weights and inputs "
        "included); activation = peak - allocated before the forward"
        if device.type == "cuda"
        else "live tensor storage bytes tracked per op by a dispatch mode during one forward (weights, buffers "
        "and inputs included); activation = peak of storages created during the forward"
    )
    backbone = model.backbone
    return {
        "schema": SCHEMA,
        "name": options.name
        or default_name(exp, device, precision, batch_size, options.compile, options.cuda_graph),
        "exp": exp.name,
        "preset": exp.preset,
        "family": exp.family,
        "task": exp.task,
        "tiny": exp.tiny,
        "batch_size": batch_size,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": options.command,
        "params": sum(p.numel() for p in model.parameters()),
        "inputs": {
            "image_size": backbone.image_size,
            "patch_size": backbone.patch_size,
            "images_per_example": exp.images_per_example,
            "image_tokens": backbone.num_image_tokens,
            "text_len": exp.text_len,
            "text_real_lengths": inputs.text_lengths,
            "num_layers": backbone.num_layers,
        },
        "protocol": {
            "device": device.type,
            "precision": precision,
            "autocast": precision != "fp32",
            "inference_mode": True,
            "compiled": options.compile,
            "cuda_graph": options.cuda_graph,
            "compile": (
                {
                    "fullgraph": True,
                    "dynamic": False,
                    "backend": options.compile_backend,
                    "mode": options.compile_mode,
                }
                if options.compile
                else None
            ),
            "tf32": (
                {
                    "matmul": torch.backends.cuda.matmul.allow_tf32,
                    "cudnn": torch.backends.cudnn.allow_tf32,
                }
                if device.type == "cuda"
                else None
            ),
            "threads": torch.get_num_threads(),
            "warmup_rounds": warmup,
            "rounds": rounds,
            "order": "all settings once per round, order rotated by one setting each round",
            "min_sample_s": min_sample_s,
            "timer": "time.perf_counter around synchronised forwards",
            "flops_method": "torch.utils.flop_counter.FlopCounterMode + CPU SDPA formula, one forward of the batch",
            "memory_method": memory_method,
            "train_memory_method": (
                "forward with autograd + backward of the summed logits, parameter gradients included, no "
                "optimiser state; same instrument as memory_method"
                if options.train_memory
                else None
            ),
            "reducer_time_method": (
                "not measured: the compiled graph fuses the reducer with the layers"
                if options.compile
                else "not measured: a replayed CUDA graph runs no Python to time"
                if options.cuda_graph
                else "backbone._reduction_inputs and reduce() wrapped with timers "
                + ("(CUDA events)" if device.type == "cuda" else "(perf_counter)")
                + " in the timed forwards; share = reducer time / forward time, median over rounds"
            ),
        },
        **machine_info(device),
        "settings": results,
    }


def _fmt_times(times: dict[str, list[float]], index: int) -> str:
    return ", ".join(f"{name} {ts[index]:.3g}s" for name, ts in times.items() if ts)


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
    device, precision = resolve_device(options)
    exps = [get_experiment(name, tiny=options.tiny) for name in exp_names]
    if options.name and (len(exps) > 1 or len(options.batch_sizes) > 1):
        raise ValueError("--name names one output; it needs a single experiment and a single batch size")
    out_dir = Path(options.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    all_results = []
    for exp in exps:
        t0 = time.perf_counter()
        settings = select_settings(exp, options)
        model = build_model(exp, seed=options.seed).to(device)
        n_params = sum(p.numel() for p in model.parameters())
        log(
            options,
            f"[{exp.name}] {exp.preset} + {exp.task} head, {n_params / 1e6:.1f}M params, random weights; "
            f"settings: {', '.join(s.name for s in settings)}",
        )
        per_batch = []
        for batch in options.batch_sizes:
            result = measure_batch(exp, model, settings, batch, device, precision, options)
            if options.profile:
                result["profile"] = profile_settings(model, settings, exp, batch, device, precision, options)
            paths = report.write_result(result, out_dir, plot=options.plot)
            log(options, report.summary(result))
            log(options, "wrote " + ", ".join(str(p) for p in paths))
            per_batch.append(result)
        if len(per_batch) > 1:
            paths = report.write_batch_sweep(per_batch, out_dir, plot=options.plot)
            log(options, "wrote " + ", ".join(str(p) for p in paths))
        all_results.extend(per_batch)
        log(options, f"[{exp.name}] done in {time.perf_counter() - t0:.0f} s")
        del model
    return all_results


def profile_settings(
    model: TaskModel,
    settings: list[Setting],
    exp: Experiment,
    batch_size: int,
    device: torch.device,
    precision: str,
    options: Options,
) -> dict:
    """Where the time goes: `torch.profiler` self time by op for the baseline and the released setting."""
    from torch.profiler import ProfilerActivity, profile

    inputs = make_inputs(exp, model.backbone, batch_size, seed=options.seed).to(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = {}
    for s in settings:
        if s.name not in ("baseline", "pumer"):
            continue
        run = _eager_runner(model, s, inputs)
        with torch.inference_mode(), autocast(device, precision), ReducerTimer(model.backbone, device, RANGE):
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
        averages = prof.key_averages()
        ranges = {e.key: getattr(e, incl_attr) / 1e6 for e in averages if e.key.startswith(RANGE_PREFIX)}
        events = [(e.key, getattr(e, self_attr) / 1e6, e.count) for e in averages if e.key not in ranges]
        total = sum(t for _, t, _ in events) or 1.0
        events.sort(key=lambda e: -e[1])
        # ranges include the Python time between their ops: on CPU they are shares of the forward's wall time
        range_total = total if device_side else wall
        out[s.name] = {
            "total_s": total,
            "wall_s": wall,
            "ops": [{"op": k, "self_s": t, "share": t / total, "calls": c} for k, t, c in events[:25]],
            # inclusive time of `record_function` ranges named pumer.* (the reducer calls, and any the
            # backbones open)
            "ranges": {k: {"s": t, "share": t / range_total} for k, t in sorted(ranges.items())},
        }
        log(
            options,
            f"[{exp.name} b{batch_size}] profiled {s.name}: top op {events[0][0]} {events[0][1]:.3f} s",
        )
    return out


__all__ = ["ABLATIONS", "QUICK_SETTINGS", "SCHEMA", "Options", "run_bench"]
