"""Bench outputs: JSON, a Markdown table (plots in `plots`), console lines, and a combined table of several runs.

The combined table (docs/bench.md) is printed by ``python -m pumer_lightning.bench.table <json files>``. Every
table is `pumer_lightning.lab.report.table` of rows, every percentage `pumer_lightning.lab.report.pct`; results
written before a field was measured render it as ``n/a``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pumer_lightning.lab.report import MISSING, pct, table
from pumer_lightning.reduce import ReducerSchedule

from .plots import plot_batch_sweep, plot_result

REQUIRED_FIELDS = (
    "name",
    "examples_per_s",
    "speedup",
    "flops_per_example",
    "flops_ratio",
    "peak_mem_bytes",
    "tokens_per_layer",
    "reducer_time_share",
    "ops_per_forward",
    "reducer_ops_per_step",
    "kernels_per_step",
)
TRAIN_FIELDS = (
    "train_peak_mem_bytes",
    "train_activation_peak_bytes",
    "train_activation_mem_ratio",
    "train_activation_mem_bound",
    "train_examples_per_s",
    "train_speedup",
    "train_flops_ratio",
)
MEMORY_BOUND_FORMULA = (
    "bound on the training activation-memory ratio = sum_p S_p * T_p / T0_p / sum_p S_p, over the parts p of "
    "the model (each block before and after its reduction, the final norm, poolers and head, and the unreduced "
    "rest), where S_p is what part p saves for backward in the baseline (bytes, from saved_tensors_hooks), and "
    "T0_p, T_p the tokens part p sees in the baseline and in the setting; i.e. memory proportional to the "
    "tokens each layer keeps, at that layer's per-token bytes S_p / T0_p. It is the token-proportional figure, "
    "not a hard limit: what the reducer keeps and backward's temporaries put the measurement above it, and bytes "
    "that do not scale with tokens (autocast's weight copies, the attention of a part over the other stream) can "
    "put it a little either side"
)
MIB = 2**20


def fmt(x: float | None, spec: str = ".0f", suffix: str = "") -> str:
    """``x`` formatted by ``spec`` with ``suffix``; `MISSING` for None."""
    return MISSING if x is None else f"{x:{spec}}{suffix}"


def _saving(ratio: float | None) -> str:
    """A memory ratio as the saving it means: 0.62 -> '-38%'."""
    return MISSING if ratio is None else pct(ratio - 1, sign=True, digits=0, suffix="%")


def _rate(s: dict, prefix: str = "") -> str:
    """``<prefix>examples_per_s`` of a setting as ``median [min–max]``."""
    key = f"{prefix}examples_per_s"
    return f"{s[key]:.3g} [{s[f'{key}_min']:.3g}–{s[f'{key}_max']:.3g}]"


def _peak(s: dict) -> str:
    """Peak memory in MiB with the activations' share in brackets."""
    return f"{s['peak_mem_bytes'] / MIB:.0f} ({s['activation_peak_bytes'] / MIB:.0f})"


def _schedule(s: dict | None) -> str:
    if s is None:
        return "none"
    known = {f.name for f in dataclasses.fields(ReducerSchedule)}
    return str(ReducerSchedule(**{k: v for k, v in s.items() if k in known}))


def hardware_line(result: dict) -> str:
    hw, sw, pr = result["hardware"], result["software"], result["protocol"]
    if pr["device"] == "cuda":
        where = f"{hw.get('gpu')} (CUDA {hw.get('cuda')}), {pr['precision']} autocast"
    else:
        flags = "/".join(hw.get("cpu_flags") or []) or "?"
        where = f"{hw['cpu']} ({flags}), {pr['threads']} threads, {pr['precision']}"
        if hw.get("kernels_summary"):
            where += f" ({hw['kernels_summary']})"
    return (
        f"{where}; torch {sw['torch']}, transformers {sw['transformers']}, Python {sw['python']}; "
        f"commit {sw.get('git_commit') or '?'}"
    )


def protocol_line(result: dict) -> str:
    pr = result["protocol"]
    return (
        f"batch {result['batch_size']}, {result['inputs']['images_per_example']} image(s) of "
        f"{result['inputs']['image_size']} px, text padded to {result['inputs']['text_len']} (real lengths "
        f"{min(result['inputs']['text_real_lengths'])}-{max(result['inputs']['text_real_lengths'])}); "
        f"probe + {pr['warmup_rounds']} warm-up round(s) + {pr['rounds']} interleaved timed rounds; "
        f"torch.inference_mode{'; torch.compile(fullgraph=True)' if pr['compiled'] else ''}"
        f"{'; CUDA graph replay' if pr.get('cuda_graph') else ''}"
        f"{'; reduction step ' + pr['reducer_impl'] if pr.get('reducer_impl') else ''}"
        f"{'; ' + str(pr['train_rounds']) + ' interleaved training rounds' if pr.get('train_rounds') else ''}"
    )


def markdown(result: dict) -> str:
    """The full per-run table (every setting, every measured quantity) with the run's context."""
    pr, settings = result["protocol"], result["settings"]
    lines = [
        f"# Bench `{result['name']}`: {result['preset']} + {result['task']} head, random weights",
        "",
        f"- Command: `{result.get('command') or '?'}`",
        f"- Machine: {hardware_line(result)}",
        f"- Protocol: {protocol_line(result)}",
        f"- Memory: {pr['memory_method']}",
        f"- Reducer time: {pr['reducer_time_method']}",
        f"- FLOPs: {pr['flops_method']}; ratio = baseline / setting, the speedup that time proportional to FLOPs "
        "would give; attained = speedup / FLOPs ratio",
        "",
    ]
    header = [
        "setting",
        "schedule",
        "examples/s median [min–max]",
        "speedup",
        "paired speedup median [min–max]",
    ]
    header += ["GFLOPs/example", "FLOPs ratio", "attained", "peak memory MiB (activations)", "reducer time"]
    rows = [
        [
            f"`{s['name']}`",
            _schedule(s["schedule"]),
            _rate(s),
            f"{s['speedup']:.2f}×",
            f"{s['paired_speedup_median']:.2f}× [{s['paired_speedup_min']:.2f}–{s['paired_speedup_max']:.2f}]",
            f"{s['flops_per_example'] / 1e9:.3f}",
            fmt(s["flops_ratio"], ".2f", "×"),
            pct(s["bound_attainment"], suffix="%"),
            _peak(s),
            pct(s["reducer_time_share"], suffix="%"),
        ]
        for s in settings
    ]
    lines += table(header, rows)
    lines += reference_section(result) + launch_section(result) + training_section(result)
    lines += ["", "Tokens entering each layer (image / text; the image count includes the image CLS):", ""]
    rows = [
        [f"`{s['name']}`", *(" ".join(map(str, s["tokens_per_layer"][k])) for k in ("image", "text"))]
        + ["yes" if s["tokens_match_plan"] else "**no**"]
        for s in settings
    ]
    lines += table(["setting", "image tokens", "text tokens", "matches plan()"], rows)
    return "\n".join(lines + _flops_by_part(settings) + _profile_lines(result)) + "\n"


def _flops_by_part(settings: list[dict]) -> list[str]:
    """Markdown: GFLOPs per example by part of the model, baseline beside the released setting."""
    parts = [s for s in settings if s["name"] in ("baseline", "pumer")]
    if not parts or not parts[0].get("flops_by_part"):
        return []
    keys = list(parts[0]["flops_by_part"])
    for s in parts[1:]:
        keys += [k for k in s["flops_by_part"] if k not in keys]
    rows = [[k, *(f"{s['flops_by_part'].get(k, 0) / 1e9:.3f}" for s in parts)] for k in keys]
    return ["", "GFLOPs per example by part:", "", *table(["part", *(f"`{s['name']}`" for s in parts)], rows)]


def _profile_lines(result: dict) -> list[str]:
    """Markdown: where the time goes (``--profile``), top ops and the backbones' ranges."""
    if not result.get("profile"):
        return []
    lines = ["", "Where the time goes (torch.profiler self time, top ops):", ""]
    for name, prof in result["profile"].items():
        top = ", ".join(f"{o['op']} {100 * o['share']:.0f}%" for o in prof["ops"][:8])
        ranges = ", ".join(f"{k} {100 * v['share']:.1f}%" for k, v in prof.get("ranges", {}).items())
        lines.append(
            f"- `{name}` ({prof['total_s']:.3f} s profiled): {top}"
            + (f"; ranges: {ranges}" if ranges else "")
        )
    return lines


def _launch_row(s: dict, base_ops: int, cuda: bool) -> list[str]:
    step = s.get("compiled_step") or {}
    calls = MISSING
    if "kernel_calls_per_step" in step:
        calls = f"{step['kernel_calls_per_step']:.1f} + {step['extern_calls_per_step']:.1f}"
    launches = s.get("launches_per_forward_compiled_step")
    row = [
        f"`{s['name']}`",
        str(s["ops_per_forward"]),
        fmt(s.get("ops_ratio"), ".2f", "×"),
        str(s.get("reduction_steps_per_forward", 0)),
        fmt(s.get("reducer_ops_per_step"), ".1f"),
        fmt(s.get("ops_in_reduce_ranges_per_step"), ".1f"),
        fmt(s.get("kernels_per_step"), ".1f"),
        calls,
        f"{launches:.0f} ({launches / base_ops:.2f}×)" if launches else MISSING,
    ]
    if cuda:
        row.append(
            f"{fmt(s.get('kernel_launches_per_forward'))} ({fmt(s.get('reducer_kernel_launches_per_forward'))})"
        )
    return row


def launch_section(result: dict) -> list[str]:
    """Markdown: ops per forward, reducer ops per step, the compiled step's kernels (launch overhead)."""
    settings = result["settings"]
    if settings[0].get("ops_per_forward") is None:
        return []
    pr = result["protocol"]
    cuda = any("kernel_launches_per_forward" in s for s in settings)
    lines = [
        "",
        "Launch overhead: on a GPU every op that does work is about one kernel launch.",
        "",
        f"- Ops: {pr.get('ops_method')}",
        f"- Compiled step: {pr.get('kernels_method')}",
        "",
    ]
    header = ["setting", "ops/forward", "× baseline", "reduction steps", "reducer ops/step"]
    header += [
        "ops in `pumer.reduce`/step",
        "compiled step: kernels/step (inductor)",
        "kernel + extern calls/step",
    ]
    header += ["launches/forward with it"] + (["CUDA launches/forward (in reducer)"] if cuda else [])
    lines += table(header, [_launch_row(s, settings[0]["ops_per_forward"], cuda) for s in settings])
    for s in settings:
        step = s.get("compiled_step") or {}
        if step.get("extern_calls") is not None:
            externs = ", ".join(f"{k} {v}" for k, v in step["extern_calls"].items()) or "none"
            lines.append(
                f"\n`{s['name']}` compiled step: {step['graphs']} graphs, {step['generated_kernels']} generated "
                f"kernels (inductor's count), extern calls left in them: {externs}; compiled in "
                f"{step['compile_s']:.1f} s"
            )
        elif step.get("error"):
            lines.append(f"\n`{s['name']}` compiled step failed: `{step['error']}`")
    released = next((s for s in settings if s["kind"] == "released"), None)
    if released and released.get("extra_ops_by_op"):
        top = ", ".join(f"{k} {v:+d}" for k, v in list(released["extra_ops_by_op"].items())[:15])
        lines.append(f"\nOps the released setting adds per forward, by op: {top}")
    return lines


def training_section(result: dict) -> list[str]:
    """Markdown: training-step memory (with its bound) and throughput (with its FLOPs bound)."""
    settings = result["settings"]
    if "train_peak_mem_bytes" not in settings[0]:
        return []
    pr = result["protocol"]
    lines = [
        "",
        "Training step (what fine-tuning with the reducer on pays).",
        "",
        f"- Memory: {pr['train_memory_method']}",
        f"- Bound: {MEMORY_BOUND_FORMULA}",
        f"- Throughput: {pr.get('train_time_method')}",
        "",
    ]
    header = [
        "setting",
        "train examples/s median [min–max]",
        "speedup (paired)",
        "FLOPs ratio fwd+bwd (bound)",
    ]
    header += ["peak MiB", "activations MiB", "activation memory vs baseline", "bound"]
    header += ["saved for backward vs baseline"]
    rows = []
    for s in settings:
        timed = "train_examples_per_s" in s
        ratio, bound = s["train_activation_mem_ratio"], s["train_activation_mem_bound"]
        rows.append(
            [
                f"`{s['name']}`",
                _rate(s, "train_") if timed else MISSING,
                f"{s['train_speedup']:.2f}× ({s['train_paired_speedup_median']:.2f}×)" if timed else MISSING,
                fmt(s.get("train_flops_ratio"), ".2f", "×"),
                f"{s['train_peak_mem_bytes'] / MIB:.0f}",
                f"{s['train_activation_peak_bytes'] / MIB:.0f}",
                f"{fmt(ratio, '.3f', '×')} ({_saving(ratio)})",
                f"{fmt(bound, '.3f', '×')} ({_saving(bound)})",
                fmt(s.get("train_saved_ratio"), ".3f", "×"),
            ]
        )
    return lines + table(header, rows)


def reference_section(result: dict) -> list[str]:
    """Markdown: the run's precision against the fp32 baseline measured in the same rounds."""
    ref = result.get("fp32_reference")
    if not ref:
        return []
    pr = result["protocol"]
    lines = [
        "",
        f"{pr['precision']} against fp32 (the fp32 baseline timed in the same interleaved rounds; the training step "
        f"runs {pr['train_precision']} autocast over fp32 weights against fp32):",
        "",
        f"- Baseline inference: fp32 {ref['examples_per_s']:.3g} examples/s; {pr['precision']} "
        f"**{ref['baseline_speedup']:.2f}x** that (paired {ref['baseline_paired_speedup_median']:.2f}x "
        f"[{ref['baseline_paired_speedup_min']:.2f}–{ref['baseline_paired_speedup_max']:.2f}]); peak memory "
        f"{ref['peak_mem_bytes'] / MIB:.0f} MiB in fp32",
    ]
    if "train_baseline_speedup" in ref:
        lines.append(
            f"- Baseline training step: fp32 {ref['train_examples_per_s']:.3g} examples/s; {pr['train_precision']} "
            f"**{ref['train_baseline_speedup']:.2f}x** that (paired {ref['train_baseline_paired_speedup_median']:.2f}x)"
        )
    if "train_activation_ratio" in ref:
        lines.append(
            f"- Baseline training activations: fp32 {ref['train_activation_peak_bytes'] / MIB:.0f} MiB; "
            f"{pr['train_precision']} **{ref['train_activation_ratio']:.2f}x** that"
        )
    for name, steps in ref.get("token_agreement", {}).items():
        kept = ", ".join(pct(st["kept_agreement"], suffix="%") for st in steps)
        merged = ", ".join(pct(st["merged_pairs_shared"], suffix="%") for st in steps)
        lines.append(
            f"- Same answers (`{name}`, first backbone pass, per reduction step): image tokens kept or pruned as in fp32 "
            f"{kept}; fp32's merged pairs merged too {merged}; text maps equal "
            f"{', '.join('yes' if st['text_maps_equal'] else 'no' for st in steps)}"
        )
    header = ["setting", "× fp32 baseline (inference)", "× fp32 baseline (training step)"]
    header += ["training activations × fp32 baseline"]
    rows = [
        [f"`{s['name']}`", f"{s['speedup_vs_fp32_baseline']:.2f}×"]
        + [
            fmt(s.get(k), ".2f", "×")
            for k in ("train_speedup_vs_fp32_baseline", "train_activation_ratio_vs_fp32_baseline")
        ]
        for s in result["settings"]
        if "speedup_vs_fp32_baseline" in s
    ]
    return lines + [""] + table(header, rows)


def reference_summary(result: dict) -> str | None:
    """One console line: the run's baseline (and training step) against the fp32 baseline."""
    ref = result.get("fp32_reference")
    if not ref:
        return None
    pr = result["protocol"]
    line = (
        f"  {pr['precision']} baseline {ref['baseline_speedup']:.2f}x the fp32 baseline "
        f"(paired {ref['baseline_paired_speedup_median']:.2f}x, fp32 {ref['examples_per_s']:.3g} ex/s)"
    )
    if "train_baseline_speedup" in ref:
        line += f"; training step ({pr['train_precision']}) {ref['train_baseline_speedup']:.2f}x"
    if "train_activation_ratio" in ref:
        line += f", activations {ref['train_activation_ratio']:.2f}x"
    return line


def summary(result: dict) -> str:
    """A few console lines: throughput, speedup, bound and reducer share per setting."""
    out = [f"== {result['name']} ({hardware_line(result)})"]
    for s in result["settings"]:
        out.append(
            f"  {s['name']:>14}: {s['examples_per_s']:8.3g} ex/s  speedup {s['speedup']:5.2f}x "
            f"(paired {s['paired_speedup_median']:.2f}x, best {s['speedup_best']:.2f}x)  FLOPs ratio {fmt(s['flops_ratio'], '5.2f', 'x')}  "
            f"attained {pct(s['bound_attainment'], suffix='%'):>6}  peak {s['peak_mem_bytes'] / MIB:7.0f} MiB  "
            f"reducer {pct(s['reducer_time_share'], suffix='%')}"
        )
        extra = []
        if s.get("ops_per_forward") is not None:
            extra.append(
                f"ops/forward {s['ops_per_forward']}, reducer ops/step {fmt(s.get('reducer_ops_per_step'), '.1f')}"
            )
        if s.get("kernels_per_step") is not None:
            extra.append(f"compiled step {s['kernels_per_step']:.1f} kernels/step")
        if "train_activation_mem_ratio" in s:
            extra.append(
                f"train activations {_saving(s['train_activation_mem_ratio'])} (bound "
                f"{_saving(s['train_activation_mem_bound'])})"
            )
        if "train_speedup" in s:
            extra.append(
                f"train {s['train_speedup']:.2f}x (paired {s['train_paired_speedup_median']:.2f}x, FLOPs ratio "
                f"{fmt(s.get('train_flops_ratio'), '.2f', 'x')})"
            )
        if extra:
            out.append(" " * 18 + "; ".join(extra))
    reference = reference_summary(result)
    if reference:
        out.append(reference)
    return "\n".join(out)


def write_result(result: dict, out_dir: Path, plot: bool = True) -> list[Path]:
    """``<name>.json``, ``<name>.md`` and (with ``plot``) ``<name>.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    stem = out_dir / result["name"]
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text(markdown(result))
    if plot:
        paths.append(stem.with_suffix(".png"))
        plot_result(result, paths[-1], hardware_line(result))
    return paths


def write_batch_sweep(results: list[dict], out_dir: Path, plot: bool = True) -> list[Path]:
    """Throughput and speedup against batch size, one line per setting (``<exp>_..._batch_sweep.*``)."""
    first = results[0]
    stem = Path(out_dir) / (first["name"].replace(f"_b{first['batch_size']}", "", 1) + "_batch_sweep")
    batches = [r["batch_size"] for r in results]
    names = [s["name"] for s in first["settings"]]
    by_setting = {
        name: {r["batch_size"]: next(s for s in r["settings"] if s["name"] == name) for r in results}
        for name in names
    }
    lines = [
        f"# Batch-size sweep: {first['exp']} ({hardware_line(first)})",
        "",
        "examples/s (speedup over the baseline at the same batch size)",
        "",
    ]
    rows = [
        [f"`{name}`", *(f"{by[b]['examples_per_s']:.3g} ({by[b]['speedup']:.2f}×)" for b in batches)]
        for name, by in by_setting.items()
    ]
    lines += table(["setting", *(f"batch {b}" for b in batches)], rows)
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    summary_json = {
        "exp": first["exp"],
        "batch_sizes": batches,
        "files": [r["name"] + ".json" for r in results],
        "settings": {
            name: {
                str(b): {
                    k: by_setting[name][b].get(k)
                    for k in (
                        "examples_per_s",
                        "speedup",
                        "flops_ratio",
                        "peak_mem_bytes",
                        "reducer_time_share",
                    )
                }
                for b in batches
            }
            for name in names
        },
    }
    paths[0].write_text(json.dumps(summary_json, indent=1) + "\n")
    paths[1].write_text("\n".join(lines) + "\n")
    if plot:
        paths.append(stem.with_suffix(".png"))
        plot_batch_sweep(by_setting, batches, f"{first['exp']}: {hardware_line(first)}", paths[-1])
    return paths


def readme_table(results: list[dict], settings: list[str] | None = None) -> str:
    """The combined results table: one row per experiment and setting, then the command and machine."""
    header = ["experiment", "setting", "examples/s median [min–max]", "speedup (paired)", "GFLOPs/ex"]
    header += ["FLOPs ratio", "attained", "peak memory MiB (activations)", "reducer time", "reducer ops/step"]
    header += ["training speedup (FLOPs ratio)", "training activations (bound)", "image tokens per layer"]
    rows = [
        [
            f"{r['exp']} b{r['batch_size']}",
            f"`{s['name']}`",
            _rate(s),
            f"{s['speedup']:.2f}× ({s['paired_speedup_median']:.2f}×)",
            f"{s['flops_per_example'] / 1e9:.2f}",
            fmt(s["flops_ratio"], ".2f", "×"),
            pct(s["bound_attainment"], suffix="%"),
            _peak(s),
            pct(s["reducer_time_share"], suffix="%"),
            fmt(s.get("reducer_ops_per_step")),
            f"{s['train_speedup']:.2f}× ({fmt(s.get('train_flops_ratio'), '.2f', '×')})"
            if "train_speedup" in s
            else MISSING,
            f"{_saving(s['train_activation_mem_ratio'])} ({_saving(s['train_activation_mem_bound'])})"
            if "train_activation_mem_bound" in s
            else MISSING,
            " ".join(map(str, s["tokens_per_layer"]["image"])),
        ]
        for r in results
        for s in r["settings"]
        if settings is None or s["name"] in settings
    ]
    lines = [*table(header, rows), ""]
    seen = set()
    for r in results:
        key = (r.get("command"), hardware_line(r))
        if key not in seen:
            seen.add(key)
            lines.append(
                f"- `{r['exp']}`: `{r.get('command') or '?'}`; {hardware_line(r)}; {protocol_line(r)}"
            )
    return "\n".join(lines) + "\n"


def load(paths: list[str | Path]) -> list[dict]:
    out = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        if "settings" not in data or not isinstance(data["settings"], list):
            raise ValueError(f"{p} is not a bench result (no top-level 'settings' list)")
        out.append(data)
    return out
