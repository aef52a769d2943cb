"""The bench protocol: probe, warm up, then time every setting in interleaved rounds in one process.

For each experiment and batch size:

1. **Probe** (one forward per setting, which is also its first warm-up call): FLOPs with
   `FlopCounterMode` (+ the CPU SDPA formula), peak memory (CPU: `TensorMemoryTracker`; CUDA: a separate
   plain forward under ``max_memory_allocated``), and the tokens entering every layer from the backbone's trace,
   checked against `ReducerSchedule.tokens_per_layer` (what `plan()` predicts). Probes run the eager
   reduction step, so the instruments see every op.
2. **Launch overhead**: `OpCounter` counts the ops that do work in one forward of a batch of 2 (eager
   reduction step): ``ops_per_forward``, and ``reducer_ops_per_step`` = (reduced - baseline) / reduction steps.
   When the backbone has a compiled reduction step (``reducer_impl``), inductor's own kernel count for it and
   the extern calls it leaves (`compiled_kernel_count`).
3. **Training step** (unless ``train=False``): per setting, one forward + backward (parameter gradients
   allocated beforehand, so the peak is what the step adds: activations kept for backward and backward's
   temporaries) under the memory instrument, with the bytes autograd saves attributed to each block
   (`SavedBytesByPart`), which gives the memory bound; training FLOPs of forward + backward.
4. **Warm-up**: ``warmup`` plain rounds over all settings (default: one on CUDA, with ``--compile``, or when a
   round is short; none when a CPU round takes over 30 s, as the probe forward already warmed every setting);
   the warm-up (else the probe) times size the timed rounds.
5. **Timed rounds**: every round times each setting once (``inner`` forwards per sample when one forward is
   shorter than ``min_sample_s``, as on a GPU), in an order rotated by one each round so that no setting always
   runs first or after the same neighbour. Timing is wall clock around synchronised forwards under
   ``torch.inference_mode`` (and autocast for fp16/bf16). Nothing is instrumented in the timed forwards.
6. **Reducer share**: one profiled sample per reduced setting; `torch.profiler` time inside the
   ``pumer.reduce`` ranges the backbones open (`reduce_range_profile`).
7. **Training rounds** (unless ``train=False``): forward + backward + AdamW step per setting, interleaved and
   rotated as the inference rounds.

Speedups are ratios of medians within the process; a paired speedup (baseline / setting in the same round) is
reported too, as it cancels drift of the machine's speed between rounds.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.autograd import DeviceType

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
    PRECISIONS,
    REDUCE_RANGE,
    SavedBytesByPart,
    TensorMemoryTracker,
    autocast,
    compiled_kernel_count,
    count_flops,
    count_ops,
    machine_info,
    reduce_range_profile,
    synchronize,
    weight_dtype,
)

SCHEMA = "pumer-lightning/bench/1"
RANGE_PREFIX = "pumer."
QUICK_SETTINGS = ("baseline", "pumer")
REDUCER_IMPLS = ("auto", "eager", "compiled")
OPS_BATCH = 2  # op counts do not depend on the batch size; 2 as the counter
TRAIN_LR = 0.0  # AdamW at lr 0 costs the same as any lr and keeps the random weights the timed forwards use


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
    train: bool = True
    train_rounds: int | None = None
    train_budget_s: float | None = None
    train_min_rounds: int = 3  # a training round of every full-size setting takes minutes on a CPU
    reducer_impl: str | None = None
    op_count: bool = True
    kernel_count: str = "released"
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
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto or one of {', '.join(PRECISIONS)}, got {precision!r}")
    return device, precision


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


def has_reducer_impl(backbone: torch.nn.Module) -> bool:
    """Whether the backbone offers a choice of reduction step (``reducer_impl``: auto, eager or compiled)."""
    return hasattr(backbone, "reducer_impl")


@contextlib.contextmanager
def reducer_impl(backbone: torch.nn.Module, impl: str | None):
    """Use reduction step ``impl`` inside the block (nothing when ``impl`` is None or the backbone has no choice)."""
    if impl is None or not has_reducer_impl(backbone):
        yield
        return
    saved = backbone.reducer_impl
    backbone.reducer_impl = impl
    try:
        yield
    finally:
        backbone.reducer_impl = saved


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


_BLOCK = re.compile(r"^backbone\.(?:(encoder\.layer)|cross_modal_(text|image)_layers)\.(\d+)(?:\.(\w+))?")
_TAIL = re.compile(r"^(?:head|backbone\.(?:layernorm|pooler|cross_modal_\w+_pooler))(?:\.|$)")
_POST = ("layernorm_after", "intermediate", "output")  # the modules of a block that run after its reduction
_PART = re.compile(r"^(\d+)([ti]?)(\+?)$")


def part_of(name: str) -> str:
    """The part of the task model a module belongs to, for attributing what is saved for backward.

    Block ``l`` of ViLT (``backbone.encoder.layer.l``) is split at its reduction: ``"l"`` (norm and attention,
    before it) and ``"l+"`` (norm and MLP, after it). METER's text layer ``l`` likewise gives ``"lt"`` (self- and
    cross-attention, before the reduction) and ``"lt+"`` (its MLP, after it), and its image layer ``"li+"`` (it
    runs on the reduced image tokens). Ops between module calls belong to the last module entered. ``"tail"``: the final norm,
    the poolers and the head; ``"other"``: everything before the blocks (embeddings, METER's unimodal towers).
    """
    match = _BLOCK.match(name)
    if match:
        vilt, stream, layer, sub = match.groups()
        post = "+" if sub in _POST else ""
        if vilt:
            return f"{layer}{post}"
        return f"{layer}i+" if stream == "image" else f"{layer}t{post}"
    return "tail" if _TAIL.match(name) else "other"


def tokens_by_part(
    schedule, n_image: int, n_text: int, num_layers: int, passes: int, parts: list[str]
) -> dict[str, int]:
    """Tokens each part (`part_of`) sees in one forward of ``passes`` backbone passes, from the schedule's plan.

    A part before the reduction of block ``l`` sees the tokens entering it, a part after it those leaving it
    (entering block ``l + 1``); METER's ``lt+`` counts the text stream only and ``li+`` the image stream only,
    while ``lt`` counts both (its cross-attention reads the image tokens); the tail sees what leaves the last
    block. Parts without a count (``other``) are left out.
    """
    if schedule is None:
        image, text = [n_image] * (num_layers + 1), [n_text] * (num_layers + 1)
    else:
        image, text = schedule.tokens_per_layer(n_image, n_text, num_layers + 1)
    out: dict[str, int] = {}
    for part in parts:
        if part == "tail":
            out[part] = passes * (image[num_layers] + text[num_layers])
            continue
        match = _PART.match(part)
        if not match:
            continue
        layer, stream, post = int(match.group(1)), match.group(2), match.group(3)
        idx = layer + 1 if post else layer
        count = {
            "": image[idx] + text[idx],
            "t": text[idx] if post else image[idx] + text[idx],
            "i": image[idx],
        }
        out[part] = passes * count[stream]
    return out


def _part_key(part: str) -> tuple:
    match = _PART.match(part)
    if match:
        return (1, int(match.group(1)), match.group(2), match.group(3))
    return (0,) if part == "other" else (2,)


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
    model: TaskModel, setting: Setting, run: Callable, inputs: Inputs, device: torch.device, precision: str
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
    static = [*model.parameters(), *model.buffers(), *inputs.tensors(), *grads]
    tracker = TensorMemoryTracker(static) if device.type == "cpu" else None
    saved = SavedBytesByPart(model, part_of, static)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    try:
        with torch.enable_grad(), tracker if tracker is not None else contextlib.nullcontext():
            with count_flops() as flops:
                with saved, autocast(device, precision):
                    logits, traces = run()
                logits.float().sum().backward()
        synchronize(device)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        memory = {"peak_mem_bytes": int(peak), "activation_peak_bytes": int(peak - before)}
    else:
        memory = {"peak_mem_bytes": tracker.peak_bytes, "activation_peak_bytes": tracker.peak_new_bytes}
    return {
        **memory,
        "saved_bytes_by_part": dict(sorted(saved.by_part.items(), key=lambda kv: _part_key(kv[0]))),
        "tokens_by_part": tokens_by_part(
            setting.schedule,
            backbone.num_image_tokens,
            inputs.input_ids.shape[1],
            backbone.num_layers,
            len(traces),
            list(saved.by_part),
        ),
        "flops": flops["total"],
    }


def memory_bound(base_saved: dict[str, int], base_tokens: dict[str, int], tokens: dict[str, int]) -> float:
    """Bound on the training activation-memory ratio (setting / baseline): memory proportional to tokens.

    ``bound = sum_p S_p * T_p / T0_p / sum_p S_p`` over the parts ``p`` of the model (`part_of`: each block
    before and after its reduction, the tail, and the unreduced rest), where ``S_p`` is what part ``p`` saves
    for backward in the baseline (bytes), ``T0_p`` the tokens it sees in the baseline and ``T_p`` in the
    setting: every part keeps ``S_p / T0_p`` bytes per token (its per-token bytes) for each token it sees; parts
    without a token count (embeddings, METER's unimodal towers) keep what they keep. The measured ratio stays
    above it by what the reducer itself keeps and by backward's temporaries.
    """
    total = sum(base_saved.values())
    if not total:
        return float("nan")
    kept = 0.0
    for part, nbytes in base_saved.items():
        if base_tokens.get(part):
            kept += nbytes * tokens.get(part, base_tokens[part]) / base_tokens[part]
        else:
            kept += nbytes
    return kept / total


def _train_step(
    model: TaskModel, run: Callable, optimizer: torch.optim.Optimizer, device: torch.device, precision: str
) -> Callable:
    """One training step as a fine-tune runs it: zero_grad, forward (autocast), backward, AdamW step."""

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            logits, _ = run()
        logits.float().sum().backward()
        optimizer.step()

    return step


def _time_train_step(step: Callable, device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    with torch.enable_grad():
        step()
    synchronize(device)
    return time.perf_counter() - t0


def _time_sample(run: Callable, inner: int, device: torch.device, precision: str) -> float:
    """Seconds per forward over ``inner`` forwards."""
    synchronize(device)
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast(device, precision):
        for _ in range(inner):
            run()
    synchronize(device)
    return (time.perf_counter() - t0) / inner


def _op_counts(model: TaskModel, setting: Setting, inputs: Inputs) -> dict:
    """Ops that do work in one forward with the eager reduction step (`OpCounter`)."""
    with reducer_impl(model.backbone, "eager"):
        counter = count_ops(_eager_runner(model, setting, inputs))
    return {
        "total": counter.total,
        "in_range": counter.in_range,
        "ranges": counter.ranges,
        "by_op": dict(counter.by_op),
    }


def _compiled_step_kernels(model: TaskModel, setting: Setting, inputs: Inputs) -> dict | None:
    """Inductor's count for the backbone's compiled reduction steps of this setting (None without one)."""
    backbone = model.backbone
    if setting.schedule is None or not has_reducer_impl(backbone):
        return None
    run = _eager_runner(model, setting, inputs)
    with torch.inference_mode(), reducer_impl(backbone, "compiled"):
        return compiled_kernel_count(run)


def _steps_per_forward(setting: Setting, model: TaskModel, inputs: Inputs) -> int:
    if setting.schedule is None:
        return 0
    backbone = model.backbone
    plan = setting.schedule.plan(backbone.num_image_tokens, inputs.input_ids.shape[1])
    return len(plan) * len(inputs.pixel_values)


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
    inputs = make_inputs(exp, model.backbone, batch_size, seed=options.seed).to(
        device, weight_dtype(precision)
    )
    n = len(settings)
    backbone = model.backbone
    if options.cuda_graph and device.type != "cuda":
        raise ValueError("--cuda-graph needs a CUDA device")
    if options.reducer_impl is not None and options.reducer_impl not in REDUCER_IMPLS:
        raise ValueError(f"reducer_impl must be one of {REDUCER_IMPLS}, got {options.reducer_impl!r}")
    impl_available = has_reducer_impl(backbone)
    if options.reducer_impl is not None and not impl_available:
        print(
            f"WARNING: the backbone has no reducer_impl; --reducer-impl {options.reducer_impl} is ignored",
            file=sys.stderr,
        )
    # every compiled reduction step specialises on its plan and batch size; whole forwards on the setting
    _raise_recompile_limits(16 * n * exp.images_per_example)
    eager = {s.name: _eager_runner(model, s, inputs) for s in settings}

    log(options, f"[{exp.name} b{batch_size}] probe: FLOPs, memory, tokens per layer ({n} settings)")
    probes = {}
    for s in settings:
        with reducer_impl(backbone, "eager"):
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

    small = inputs.head(min(OPS_BATCH, batch_size))
    ops = {}
    if options.op_count:
        for s in settings:
            ops[s.name] = _op_counts(model, s, small)
        log(
            options,
            f"[{exp.name}] ops per forward (batch {small.batch_size}, eager reduction step): "
            + ", ".join(f"{name} {o['total']}" for name, o in ops.items()),
        )
    kernels: dict[str, dict | None] = {}
    if options.kernel_count != "none" and impl_available:
        for s in settings:
            if s.schedule is None or (options.kernel_count == "released" and s.kind != "released"):
                continue
            log(options, f"[{exp.name}] compiling the reduction steps of {s.name} to count their kernels")
            try:
                kernels[s.name] = _compiled_step_kernels(model, s, small)
            except Exception as err:  # a failed compile is reported, not fatal to the timing
                print(
                    f"WARNING: {exp.name}/{s.name}: compiled reduction step failed: {err!r}", file=sys.stderr
                )
                kernels[s.name] = {"error": repr(err)}

    train_probe = {}
    if options.train:
        log(options, f"[{exp.name} b{batch_size}] training step: memory kept for backward, FLOPs")
        for s in settings:
            train_probe[s.name] = _train_probe(model, s, eager[s.name], inputs, device, precision)
            t = train_probe[s.name]
            log(
                options,
                f"  {s.name:>14}: peak {t['peak_mem_bytes'] / 2**20:8.1f} MiB, activations "
                f"{t['activation_peak_bytes'] / 2**20:8.1f} MiB, saved for backward "
                f"{sum(t['saved_bytes_by_part'].values()) / 2**20:8.1f} MiB",
            )

    if options.compile:
        runners = {
            s.name: _compiled_runner(model, s, inputs, options.compile_backend, options.compile_mode)
            for s in settings
        }
        log(options, f"[{exp.name} b{batch_size}] compiling {n} settings (fullgraph=True, dynamic=False)")
        compile_s = {}
        for s in settings:
            t0 = time.perf_counter()
            with torch.inference_mode(), autocast(device, precision):
                runners[s.name]()
            synchronize(device)
            compile_s[s.name] = time.perf_counter() - t0
    else:
        runners = eager

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
            warm[s.name].append(_time_sample(runners[s.name], 1, device, precision))
        log(
            options,
            f"[{exp.name} b{batch_size}] warm-up round {r + 1}/{warmup}: " + _fmt_times(warm, -1),
        )
    ref = {s.name: (min(warm[s.name]) if warm[s.name] else probes[s.name]["probe_s"]) for s in settings}
    inner = {name: max(1, math.ceil(min_sample_s / max(t, 1e-9))) for name, t in ref.items()}
    round_s = sum(inner[name] * t for name, t in ref.items())
    rounds = _rounds(options.rounds, round_s, options.budget_s, options)
    log(
        options,
        f"[{exp.name} b{batch_size}] timing {rounds} interleaved rounds (~{round_s:.1f} s each, about "
        f"{rounds * round_s:.0f} s; {torch.get_num_threads()} threads, {device.type} {precision})",
    )

    times = {s.name: [] for s in settings}
    for r in range(rounds):
        order = settings[r % n :] + settings[: r % n]
        for s in order:
            times[s.name].append(_time_sample(runners[s.name], inner[s.name], device, precision))
        log(options, f"  round {r + 1}/{rounds}: " + _fmt_times(times, -1))

    # the reducer's share: profiled samples, through the ranges the backbones open around every reduction step
    profiled: dict[str, dict] = {}
    for s in settings:
        if s.schedule is None and device.type != "cuda":
            continue  # on CUDA the baseline's kernel launches are counted too
        with torch.inference_mode(), autocast(device, precision):
            profiled[s.name] = reduce_range_profile(runners[s.name], device, forwards=inner[s.name])
    shares = {name: (p if p["ranges"] else None) for name, p in profiled.items()}
    if any(shares[s.name] is None for s in settings if s.schedule is not None) and not (
        options.compile or options.cuda_graph
    ):
        print(
            f"WARNING: {exp.name}: no {REDUCE_RANGE!r} profiler ranges in the reduced forwards; "
            "reducer_time_share is null",
            file=sys.stderr,
        )

    train_times: dict[str, list[float]] = {s.name: [] for s in settings}
    train_rounds = 0
    if options.train:
        optimizer = torch.optim.AdamW(model.parameters(), lr=TRAIN_LR)
        steps = {s.name: _train_step(model, eager[s.name], optimizer, device, precision) for s in settings}
        model.train()
        try:
            warm_train = {}
            for s in settings:  # warm-up: also allocates AdamW's state
                warm_train[s.name] = _time_train_step(steps[s.name], device)
            train_round_s = sum(warm_train.values())
            train_budget = options.budget_s if options.train_budget_s is None else options.train_budget_s
            train_rounds = _rounds(
                options.train_rounds, train_round_s, train_budget, options, options.train_min_rounds
            )
            log(
                options,
                f"[{exp.name} b{batch_size}] timing {train_rounds} interleaved training rounds (forward + "
                f"backward + AdamW step, ~{train_round_s:.1f} s each)",
            )
            for r in range(train_rounds):
                order = settings[r % n :] + settings[: r % n]
                for s in order:
                    train_times[s.name].append(_time_train_step(steps[s.name], device))
                log(options, f"  training round {r + 1}/{train_rounds}: " + _fmt_times(train_times, -1))
        finally:
            optimizer.zero_grad(set_to_none=True)
            del optimizer, steps
            model.eval()

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
        share = shares.get(s.name)
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
            "reducer_time_share": 0.0 if s.schedule is None else (share["share"] if share else None),
            "reducer_host_time_share": 0.0
            if s.schedule is None
            else (share["host_share"] if share else None),
            "reducer_seconds_per_batch": (
                0.0
                if s.schedule is None
                else (share.get("range_device_s", share["range_host_s"]) if share else None)
            ),
            "reduce_ranges_per_forward": 0.0 if s.schedule is None else (share["ranges"] if share else 0.0),
        }
        if "launches" in profiled.get(s.name, {}):  # CUDA: launches the profiler saw in one forward
            entry["kernel_launches_per_forward"] = profiled[s.name]["launches"]
            entry["reducer_kernel_launches_per_forward"] = profiled[s.name]["range_launches"]
        entry.update(_op_fields(s, ops, kernels, model, small))
        if options.train:
            entry.update(_train_fields(s, train_probe, train_times, batch_size))
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
    train_instrument = (
        "cuda max_memory_allocated after reset_peak_memory_stats"
        if device.type == "cuda"
        else "live tensor storage bytes tracked per op by a dispatch mode"
    )
    return {
        "schema": SCHEMA,
        "name": options.name
        or default_name(
            exp, device, precision, batch_size, options.compile, options.cuda_graph, options.reducer_impl
        ),
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
            "autocast": precision in ("fp16", "bf16"),
            "half_weights": precision.endswith("-true"),
            "inference_mode": True,
            "compiled": options.compile,
            "cuda_graph": options.cuda_graph,
            "reducer_impl": getattr(backbone, "reducer_impl", None)
            if options.reducer_impl is None
            else (options.reducer_impl if impl_available else None),
            "reducer_impl_available": impl_available,
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
            "train_rounds": train_rounds,
            "order": "all settings once per round, order rotated by one setting each round",
            "min_sample_s": min_sample_s,
            "timer": "time.perf_counter around synchronised forwards",
            "flops_method": "torch.utils.flop_counter.FlopCounterMode + CPU SDPA formula, one forward of the batch",
            "memory_method": memory_method,
            "ops_method": (
                "aten ops that do work (views, aten.empty*/lift_fresh/detach/alias and profiler ops skipped) "
                f"dispatched in one forward of a batch of {small.batch_size} with the eager reduction step (no "
                "autocast), counted by a TorchDispatchMode; reducer ops per step = (setting - baseline) / "
                f"reduction steps; ops inside {REDUCE_RANGE!r} ranges counted too"
                if options.op_count
                else None
            ),
            "kernels_method": (
                "the backbone's compiled reduction step (reducer_impl='compiled'), compiled from scratch "
                "(dynamo reset, FX graph cache off) in one forward of a batch of "
                f"{small.batch_size}: torch._inductor.metrics.generated_kernel_count / compiled graphs; kernel "
                "and extern calls from the generated code"
                if kernels
                else "not measured: the backbone has no compiled reduction step (reducer_impl)"
                if not impl_available
                else None
            ),
            "train_memory_method": (
                f"one training step (train mode): forward with autograd + backward of the summed logits, parameter "
                f"gradients allocated beforehand and counted with the weights; {train_instrument}; activation = "
                "peak of what the step adds (saved activations + backward temporaries)"
                if options.train
                else None
            ),
            "train_memory_bound": report.MEMORY_BOUND_FORMULA if options.train else None,
            "train_time_method": (
                f"forward + backward + AdamW step (lr {TRAIN_LR}: the same cost, the weights unchanged), train "
                "mode, optimizer.zero_grad(set_to_none=True) first; interleaved rounds as for inference; bound = "
                "FLOPs of forward + backward, baseline / setting"
                if options.train
                else None
            ),
            "reducer_time_method": (
                f"torch.profiler over one sample per setting after the timed rounds: time inside the "
                f"{REDUCE_RANGE!r} record_function ranges the backbones open around every reduction step "
                + (
                    "(GPU kernel time inside the ranges / GPU time of the forward)"
                    if device.type == "cuda"
                    else "(host time inside the ranges / wall time of the forward)"
                )
                + (
                    "; a replayed CUDA graph or a compiled whole forward may show no ranges (then null)"
                    if options.compile or options.cuda_graph
                    else ""
                )
            ),
        },
        **machine_info(device),
        "settings": results,
    }


def _rounds(
    fixed: int | None, round_s: float, budget_s: float, options: Options, min_rounds: int | None = None
) -> int:
    if fixed is not None:
        return fixed
    low = options.min_rounds if min_rounds is None else min_rounds
    return int(min(options.max_rounds, max(low, budget_s // max(round_s, 1e-9))))


def _op_fields(
    s: Setting, ops: dict[str, dict], kernels: dict[str, dict | None], model: TaskModel, small: Inputs
) -> dict:
    """Launch-overhead fields of one setting: ops per forward, reducer ops per step, compiled-step kernels."""
    out: dict = {"ops_per_forward": None, "reducer_ops_per_step": None, "kernels_per_step": None}
    if not ops:
        return out
    o, base = ops[s.name], ops["baseline"]
    steps = _steps_per_forward(s, model, small)
    extra = {
        op: o["by_op"].get(op, 0) - base["by_op"].get(op, 0) for op in set(o["by_op"]) | set(base["by_op"])
    }
    extra = {op: n for op, n in sorted(extra.items(), key=lambda kv: (-abs(kv[1]), kv[0])) if n}
    out.update(
        ops_per_forward=o["total"],
        ops_ratio=o["total"] / base["total"],
        reduction_steps_per_forward=steps,
        reducer_ops_per_step=(o["total"] - base["total"]) / steps if steps else None,
        ops_in_reduce_ranges_per_step=o["in_range"] / o["ranges"] if o["ranges"] else None,
        reduce_ranges_counted=o["ranges"],
        extra_ops_by_op=extra,
    )
    k = kernels.get(s.name)
    if k is not None and "error" not in k and k["graphs"]:
        graphs = k["graphs"]
        externs_per_step = sum(k["extern_calls"].values()) / graphs
        launches_per_step = k["kernel_calls"] / graphs + externs_per_step
        out.update(
            kernels_per_step=k["generated_kernels"] / graphs,
            compiled_step={
                "graphs": graphs,
                "generated_kernels": k["generated_kernels"],
                "kernel_calls_per_step": k["kernel_calls"] / graphs,
                "extern_calls_per_step": externs_per_step,
                "extern_calls": k["extern_calls"],
                "compile_s": k["compile_s"],
            },
        )
        if o["ranges"]:
            # the ops outside the steps as counted, each step as the launches of its compiled code
            launches = o["total"] - o["in_range"] + o["ranges"] * launches_per_step
            out.update(
                launches_per_forward_compiled_step=launches,
                launch_ratio_compiled_step=launches / base["total"],
            )
    elif k is not None and "error" in k:
        out["compiled_step"] = {"error": k["error"]}
    return out


def _train_fields(s: Setting, probe: dict[str, dict], times: dict[str, list[float]], batch_size: int) -> dict:
    t, base = probe[s.name], probe["baseline"]
    saved = sum(t["saved_bytes_by_part"].values())
    base_saved = sum(base["saved_bytes_by_part"].values())
    out = {
        "train_peak_mem_bytes": t["peak_mem_bytes"],
        "train_activation_peak_bytes": t["activation_peak_bytes"],
        "train_activation_mem_ratio": (
            t["activation_peak_bytes"] / base["activation_peak_bytes"]
            if base["activation_peak_bytes"]
            else None
        ),
        "train_activation_mem_bound": memory_bound(
            base["saved_bytes_by_part"], base["tokens_by_part"], t["tokens_by_part"]
        ),
        "train_saved_bytes": saved,
        "train_saved_ratio": saved / base_saved if base_saved else None,
        "train_saved_bytes_by_part": t["saved_bytes_by_part"],
        "train_tokens_by_part": t["tokens_by_part"],
        "train_flops_per_example": t["flops"] / batch_size,
        "train_flops_ratio": base["flops"] / t["flops"] if t["flops"] else None,
    }
    ts, base_ts = times[s.name], times["baseline"]
    if ts:
        paired = [b / x for b, x in zip(base_ts, ts)]
        out.update(
            train_examples_per_s=batch_size / _median(ts),
            train_examples_per_s_min=batch_size / max(ts),
            train_examples_per_s_max=batch_size / min(ts),
            train_examples_per_s_rounds=[batch_size / x for x in ts],
            train_seconds_per_step=_median(ts),
            train_speedup=_median(base_ts) / _median(ts),
            train_paired_speedup_median=_median(paired),
            train_paired_speedup_min=min(paired),
            train_paired_speedup_max=max(paired),
        )
    return out


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
        # half-weight precisions: the weights are cast once here, never per call
        model = build_model(exp, seed=options.seed).to(device, weight_dtype(precision))
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

    inputs = make_inputs(exp, model.backbone, batch_size, seed=options.seed).to(
        device, weight_dtype(precision)
    )
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = {}
    for s in settings:
        if s.name not in ("baseline", "pumer"):
            continue
        run = _eager_runner(model, s, inputs)
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


__all__ = ["ABLATIONS", "QUICK_SETTINGS", "SCHEMA", "Options", "run_bench"]
