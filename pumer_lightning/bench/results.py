"""The result of one experiment and batch size: the `Measured` of the stages as the JSON's fields.

Every ratio is taken against the baseline measured in the same process. The ``protocol`` block of the JSON
describes how each figure was measured; its prose is the module-level ``*_METHOD`` constants (docs/bench.md has
the longer account).
"""

from __future__ import annotations

import statistics
from datetime import datetime, timezone

import torch

from pumer_lightning.lab.compare import examples_of
from pumer_lightning.lab.context import AUTOCAST_DTYPES
from pumer_lightning.lab.machine import machine_info
from pumer_lightning.measure import median_rates, paired_speedups, speedup

from . import report
from .experiments import Setting
from .measure import REDUCE_RANGE
from .precision import cpu_bf16, kernels_line
from .stages import REFERENCE, TRAIN_LR, Batch, Measured, steps_per_forward

SCHEMA = "pumer-lightning/bench/1"
BASELINE = "baseline"

ORDER = "all settings once per round, order rotated by one setting each round"
TIMER = "time.perf_counter around synchronised forwards"
FLOPS_METHOD = "torch.utils.flop_counter.FlopCounterMode + CPU SDPA formula, one forward of the batch"
MEMORY_METHOD = {
    "cuda": "cuda max_memory_allocated during a plain forward after reset_peak_memory_stats (weights and inputs "
    "included); activation = peak - allocated before the forward",
    "cpu": "live tensor storage bytes tracked per op by a dispatch mode during one forward (weights, buffers "
    "and inputs included); activation = peak of storages created during the forward",
}
OPS_METHOD = (
    "aten ops that do work (views, aten.empty*/lift_fresh/detach/alias and profiler ops skipped) "
    "dispatched in one forward of a batch of {batch} with the eager reduction step (no "
    "autocast), counted by a TorchDispatchMode; reducer ops per step = (setting - baseline) / "
    "reduction steps; ops inside {range!r} ranges counted too"
)
KERNELS_METHOD = (
    "the backbone's compiled reduction step (reducer_impl='compiled'), compiled from scratch "
    "(dynamo reset, FX graph cache off) in one forward of a batch of "
    "{batch}: torch._inductor.metrics.generated_kernel_count / compiled graphs; kernel "
    "and extern calls from the generated code"
)
TRAIN_INSTRUMENT = {
    "cuda": "cuda max_memory_allocated after reset_peak_memory_stats",
    "cpu": "live tensor storage bytes tracked per op by a dispatch mode",
}
TRAIN_MEMORY_METHOD = (
    "one training step (train mode): forward with autograd + backward of the summed logits, parameter "
    "gradients allocated beforehand and counted with the weights; {instrument}; activation = "
    "peak of what the step adds (saved activations + backward temporaries)"
)
TRAIN_TIME_METHOD = (
    "forward + backward + AdamW step (lr {lr}: the same cost, the weights unchanged), train "
    "mode, optimizer.zero_grad(set_to_none=True) first; interleaved rounds as for inference; bound = "
    "FLOPs of forward + backward, baseline / setting"
)
REDUCER_TIME_METHOD = (
    "torch.profiler over one sample per setting after the timed rounds: time inside the "
    "{range!r} record_function ranges the backbones open around every reduction step "
)
REDUCER_TIME_SHARE = {
    "cuda": "(GPU kernel time inside the ranges / GPU time of the forward)",
    "cpu": "(host time inside the ranges / wall time of the forward)",
}
REDUCER_TIME_UNRANGED = "; a replayed CUDA graph or a compiled whole forward may show no ranges (then null)"


# ---- one setting ------------------------------------------------------------------------------------------------
def rate_fields(prefix: str, times: dict[str, list[float]], name: str, batch_size: int) -> dict:
    """Throughput of ``name`` over its timed rounds (`interleaved_times` samples): ``<prefix>examples_per_s`` (of
    the median time) and its ``_min``, ``_max`` and per-round ``_rounds``."""
    ts, key = times[name], f"{prefix}examples_per_s"
    return {
        key: median_rates({name: ts}, batch_size)[name],
        f"{key}_min": batch_size / max(ts),
        f"{key}_max": batch_size / min(ts),
        f"{key}_rounds": [batch_size / t for t in ts],
    }


def speedup_fields(prefix: str, times: dict[str, list[float]], reference: str, name: str) -> dict:
    """``<prefix>speedup`` of ``name`` over ``reference`` (ratio of median times) and the paired speedup of the
    same rounds, ``<prefix>paired_speedup_median``, ``_min`` and ``_max``."""
    paired = paired_speedups(times, reference, name)
    return {
        f"{prefix}speedup": speedup(times, reference, name),
        f"{prefix}paired_speedup_median": statistics.median(paired),
        f"{prefix}paired_speedup_min": min(paired),
        f"{prefix}paired_speedup_max": max(paired),
    }


def _speed_fields(name: str, times: dict[str, list[float]], inner: int, batch_size: int) -> dict:
    """Throughput and speedups of one setting from the timed rounds."""
    return {
        **rate_fields("", times, name, batch_size),
        "seconds_per_batch": statistics.median(times[name]),
        "inner_forwards_per_sample": inner,
        **speedup_fields("", times, BASELINE, name),
        # the fastest samples are the least disturbed by other load on a shared machine
        "speedup_best": min(times[BASELINE]) / min(times[name]),
    }


def _flops_fields(p: dict, base: dict, batch: Batch, speedup_: float) -> dict:
    """FLOPs per example, the FLOPs ratio (the speedup run time proportional to FLOPs would give) and by part."""
    flops, batch_size = p["flops"]["total"], batch.batch_size
    ratio = base["flops"]["total"] / flops if flops else None
    roots = {type(batch.backbone).__name__: "backbone", type(batch.model.head).__name__: "head"}
    return {
        "flops_per_example": flops / batch_size,
        "flops_ratio": ratio,
        "flops_speedup_bound": ratio,
        "bound_attainment": speedup_ / ratio if ratio else None,
        "flops_by_part": {
            k: v / batch_size for k, v in group_modules(p["flops"]["by_module"], flops, roots).items()
        },
        "flops_uncounted_ops": p["flops"]["uncounted_ops"],
    }


def _memory_fields(p: dict, base: dict) -> dict:
    memory, base_mem = p["memory"], base["memory"]
    return {
        "peak_mem_bytes": memory["peak_mem_bytes"],
        "activation_peak_bytes": memory["activation_peak_bytes"],
        "peak_mem_ratio": memory["peak_mem_bytes"] / base_mem["peak_mem_bytes"],
        "activation_mem_ratio": (
            memory["activation_peak_bytes"] / base_mem["activation_peak_bytes"]
            if base_mem["activation_peak_bytes"]
            else None
        ),
    }


def _share_fields(s: Setting, profiled: dict | None) -> dict:
    """The reducer's share of the time (profiled ranges; 0 for the baseline, null when no range was seen)."""
    if s.schedule is None:
        out = {
            "reducer_time_share": 0.0,
            "reducer_host_time_share": 0.0,
            "reducer_seconds_per_batch": 0.0,
            "reduce_ranges_per_forward": 0.0,
        }
    else:
        share = profiled if profiled and profiled["ranges"] else None
        out = {
            "reducer_time_share": share["share"] if share else None,
            "reducer_host_time_share": share["host_share"] if share else None,
            "reducer_seconds_per_batch": share.get("range_device_s", share["range_host_s"])
            if share
            else None,
            "reduce_ranges_per_forward": share["ranges"] if share else 0.0,
        }
    if profiled and "launches" in profiled:  # CUDA: launches the profiler saw in one forward
        out["kernel_launches_per_forward"] = profiled["launches"]
        out["reducer_kernel_launches_per_forward"] = profiled["range_launches"]
    return out


def setting_entry(batch: Batch, m: Measured, s: Setting) -> dict:
    """The JSON item of one setting: speed, FLOPs, memory, tokens, reducer share, launch overhead, training."""
    p, base = m.probes[s.name], m.probes[BASELINE]
    speed = _speed_fields(s.name, m.timing.times, m.timing.inner[s.name], batch.batch_size)
    entry = {
        "name": s.name,
        "kind": s.kind,
        "description": s.description,
        "schedule": s.schedule_dict(),
        **speed,
        **_flops_fields(p, base, batch, speed["speedup"]),
        **_memory_fields(p, base),
        "tokens_per_layer": p["tokens_per_layer"],
        "tokens_planned": p["tokens_planned"],
        "tokens_match_plan": p["tokens_match_plan"],
        "outputs_finite": p["outputs_finite"],
        **_share_fields(s, m.profiled.get(s.name)),
    }
    entry.update(op_fields(s, m.ops, m.kernels, batch))
    if batch.options.train:
        entry.update(train_fields(s, m.train_probe, m.train_times, batch.batch_size))
    if batch.options.compile:
        entry["compile_seconds"] = m.compile_s[s.name]
    if not p["outputs_finite"]:
        batch.warn(f"{batch.exp.name}/{s.name}: non-finite logits ({batch.precision})")
    return entry


def op_fields(s: Setting, ops: dict[str, dict], kernels: dict[str, dict | None], batch: Batch) -> dict:
    """Launch-overhead fields of one setting: ops per forward, reducer ops per step, compiled-step kernels."""
    out: dict = {"ops_per_forward": None, "reducer_ops_per_step": None, "kernels_per_step": None}
    if not ops:
        return out
    o, base = ops[s.name], ops[BASELINE]
    steps = steps_per_forward(s, batch.model, batch.small)
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


def train_fields(s: Setting, probe: dict[str, dict], times: dict[str, list[float]], batch_size: int) -> dict:
    """Training-step fields of one setting: memory kept for backward against its bound, FLOPs, throughput."""
    t, base = probe[s.name], probe[BASELINE]
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
    if times[s.name]:
        out.update(rate_fields("train_", times, s.name, batch_size))
        out["train_seconds_per_step"] = statistics.median(times[s.name])
        out.update(speedup_fields("train_", times, BASELINE, s.name))
    return out


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


def group_modules(by_module: dict[str, int], total: int, roots: dict[str, str]) -> dict[str, int]:
    """FLOPs by part of the model (towers, blocks, head), from `FlopCounterMode`'s per-module counts.

    ``roots`` names the top modules the counter saw by the class names it gives them (`VLTask.compute_logits` calls
    the backbone and the head, not the task module): ``{"ViltBackbone": "backbone", "ClassifierHead": "head"}``.
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
        root, *rest = name.split(".")
        rel = [roots.get(root, root), *rest]
        if rel[0] != "backbone":
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


# ---- the fp32 reference ------------------------------------------------------------------------------------------
def reference_fields(
    name: str,
    probe: dict,
    times: dict[str, list[float]],
    train_probe: dict[str, dict],
    train_times: dict[str, list[float]],
    batch_size: int,
) -> dict:
    """The JSON's ``fp32_reference``: the fp32 baseline timed in the same rounds as the settings (``name`` its key
    in the times), and the settings' baseline against it: ``baseline_speedup`` (ratio of medians) and the paired
    ratio per round; the same for the training step, and its activation memory (``train_activation_ratio``)."""
    out = {
        **rate_fields("", times, name, batch_size),
        **probe["memory"],
        **speedup_fields("baseline_", times, name, BASELINE),
    }
    if name in train_probe:
        t, ref = train_probe[BASELINE], train_probe[name]
        out.update(
            train_peak_mem_bytes=ref["peak_mem_bytes"],
            train_activation_peak_bytes=ref["activation_peak_bytes"],
            train_activation_ratio=t["activation_peak_bytes"] / ref["activation_peak_bytes"],
        )
    if train_times.get(name):
        out.update(rate_fields("train_", train_times, name, batch_size))
        out.update(speedup_fields("train_baseline_", train_times, name, BASELINE))
    return out


def setting_vs_reference(entry: dict, reference: dict) -> dict:
    """A setting's throughput (inference, training) and training activations against the fp32 baseline."""
    out = {"speedup_vs_fp32_baseline": entry["examples_per_s"] / reference["examples_per_s"]}
    if "train_examples_per_s" in entry and reference.get("train_examples_per_s"):
        out["train_speedup_vs_fp32_baseline"] = (
            entry["train_examples_per_s"] / reference["train_examples_per_s"]
        )
    if "train_activation_peak_bytes" in entry and reference.get("train_activation_peak_bytes"):
        out["train_activation_ratio_vs_fp32_baseline"] = (
            entry["train_activation_peak_bytes"] / reference["train_activation_peak_bytes"]
        )
    return out


# ---- the whole result -------------------------------------------------------------------------------------------
def protocol(batch: Batch, m: Measured) -> dict:
    """How every figure of the result was measured (the JSON's ``protocol``)."""
    options, device, precision, backbone = batch.options, batch.device, batch.precision, batch.backbone
    compile_ = {
        "fullgraph": True,
        "dynamic": False,
        "backend": options.compile_backend,
        "mode": options.compile_mode,
    }
    tf32 = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    small = examples_of(batch.small)
    reducer_time = REDUCER_TIME_METHOD.format(range=REDUCE_RANGE) + REDUCER_TIME_SHARE[_kind(device)]
    if options.compile or options.cuda_graph:
        reducer_time += REDUCER_TIME_UNRANGED
    train = options.train
    return {
        "device": device.type,
        "precision": precision,
        "train_precision": batch.train_precision,
        "fp32_reference": batch.reference,
        "autocast": precision in AUTOCAST_DTYPES,
        "half_weights": precision.endswith("-true"),
        "inference_mode": True,
        "compiled": options.compile,
        "cuda_graph": options.cuda_graph,
        "reducer_impl": backbone.reducer_impl,
        "compile": compile_ if options.compile else None,
        "tf32": tf32 if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "warmup_rounds": m.timing.warmup,
        "rounds": m.timing.rounds,
        "train_rounds": m.train_rounds,
        "order": ORDER,
        "min_sample_s": m.timing.min_sample_s,
        "timer": TIMER,
        "flops_method": FLOPS_METHOD,
        "memory_method": MEMORY_METHOD[_kind(device)],
        "ops_method": (OPS_METHOD.format(batch=small, range=REDUCE_RANGE) if options.op_count else None),
        "kernels_method": KERNELS_METHOD.format(batch=small) if m.kernels else None,
        "train_memory_method": (
            TRAIN_MEMORY_METHOD.format(instrument=TRAIN_INSTRUMENT[_kind(device)]) if train else None
        ),
        "train_memory_bound": report.MEMORY_BOUND_FORMULA if train else None,
        "train_time_method": TRAIN_TIME_METHOD.format(lr=TRAIN_LR) if train else None,
        "reducer_time_method": reducer_time,
    }


def _kind(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"


def build_result(batch: Batch, m: Measured, name: str) -> dict:
    """The JSON of one experiment and batch size, named ``name``: the run, its inputs, protocol and machine, and
    one `setting_entry` per setting."""
    exp, backbone, inputs = batch.exp, batch.backbone, batch.inputs
    return {
        "schema": SCHEMA,
        "name": name,
        "exp": exp.name,
        "preset": exp.preset,
        "family": exp.family,
        "task": exp.task,
        "tiny": exp.tiny,
        "batch_size": batch.batch_size,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": batch.options.command,
        "params": sum(p.numel() for p in batch.model.parameters()),
        "inputs": {
            "image_size": backbone.image_size,
            "patch_size": backbone.patch_size,
            "images_per_example": exp.images_per_example,
            "image_tokens": backbone.num_image_tokens,
            "text_len": exp.text_len,
            "text_real_lengths": inputs["attention_mask"].sum(1).tolist(),
            "num_layers": backbone.num_layers,
        },
        "protocol": protocol(batch, m),
        **_machine(batch, m),
        **_settings_and_reference(batch, m),
    }


def _machine(batch: Batch, m: Measured) -> dict:
    """`machine_info`, with on a CPU its bf16 matrix support (`cpu_bf16`) and what the matmuls of the baseline and
    the released setting ran on (`kernel_report`; ``kernels_summary`` in one line)."""
    info = machine_info(batch.device)
    if batch.device.type == "cpu":
        info["hardware"]["bf16"] = cpu_bf16()
        info["hardware"]["kernels"] = m.kernels_used
        info["hardware"]["kernels_summary"] = kernels_line(m.kernels_used.get(BASELINE))
    return info


def _settings_and_reference(batch: Batch, m: Measured) -> dict:
    """The ``settings`` list and, in a run with the fp32 reference, ``fp32_reference`` (with each setting's figures
    against it)."""
    settings = [setting_entry(batch, m, s) for s in batch.settings]
    if not batch.reference:
        return {"settings": settings}
    reference = reference_fields(
        REFERENCE, m.probes[REFERENCE], m.timing.times, m.train_probe, m.train_times, batch.batch_size
    )
    reference["token_agreement"] = m.agreement
    for entry in settings:
        entry.update(setting_vs_reference(entry, reference))
    return {"fp32_reference": reference, "settings": settings}
