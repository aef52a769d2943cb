"""Bench outputs: JSON, a Markdown table, a PNG plot, and a combined table of several runs.

The combined table (docs/bench.md) is printed by ``python -m pumer_lightning.bench.table <json files>``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pumer_lightning.reduce import ReducerSchedule

from .precision import reference_section, reference_summary

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


def _fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, spec: str = ".0f") -> str:
    return "n/a" if x is None else f"{x:{spec}}"


def _saving(ratio: float | None) -> str:
    """A memory ratio as the saving it means: 0.62 -> '-38%'."""
    return "n/a" if ratio is None else f"{100 * (ratio - 1):+.0f}%"


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
    lines = [
        f"# Bench `{result['name']}`: {result['preset']} + {result['task']} head, random weights",
        "",
        f"- Command: `{result.get('command') or '?'}`",
        f"- Machine: {hardware_line(result)}",
        f"- Protocol: {protocol_line(result)}",
        f"- Memory: {result['protocol']['memory_method']}",
        f"- Reducer time: {result['protocol']['reducer_time_method']}",
        f"- FLOPs: {result['protocol']['flops_method']}; ratio = baseline / setting, the speedup that time "
        "proportional to FLOPs would give; attained = speedup / FLOPs ratio",
        "",
        "| setting | schedule | examples/s median [min–max] | speedup | paired speedup median [min–max] "
        "| GFLOPs/example | FLOPs ratio | attained | peak memory MiB (activations) | reducer time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result["settings"]:
        lines.append(
            f"| `{s['name']}` | {_schedule(s['schedule'])} "
            f"| {s['examples_per_s']:.3g} [{s['examples_per_s_min']:.3g}–{s['examples_per_s_max']:.3g}] "
            f"| {s['speedup']:.2f}× "
            f"| {s['paired_speedup_median']:.2f}× [{s['paired_speedup_min']:.2f}–{s['paired_speedup_max']:.2f}] "
            f"| {s['flops_per_example'] / 1e9:.3f} | {_fmt(s['flops_ratio'], '.2f', '×')} "
            f"| {_pct(s['bound_attainment'])} "
            f"| {s['peak_mem_bytes'] / MIB:.0f} ({s['activation_peak_bytes'] / MIB:.0f}) "
            f"| {_pct(s['reducer_time_share'])} |"
        )
    lines += reference_section(result)
    lines += launch_section(result)
    lines += training_section(result)
    lines += ["", "Tokens entering each layer (image / text; the image count includes the image CLS):", ""]
    lines += ["| setting | image tokens | text tokens | matches plan() |", "|---|---|---|---|"]
    for s in result["settings"]:
        tok = s["tokens_per_layer"]
        lines.append(
            f"| `{s['name']}` | {' '.join(map(str, tok['image']))} | {' '.join(map(str, tok['text']))} "
            f"| {'yes' if s['tokens_match_plan'] else '**no**'} |"
        )
    parts = [s for s in result["settings"] if s["name"] in ("baseline", "pumer")]
    if parts and parts[0].get("flops_by_part"):
        keys = list(parts[0]["flops_by_part"])
        for s in parts[1:]:
            keys += [k for k in s["flops_by_part"] if k not in keys]
        lines += ["", "GFLOPs per example by part:", ""]
        lines.append("| part | " + " | ".join(f"`{s['name']}`" for s in parts) + " |")
        lines.append("|---|" + "---|" * len(parts))
        for k in keys:
            vals = " | ".join(f"{s['flops_by_part'].get(k, 0) / 1e9:.3f}" for s in parts)
            lines.append(f"| {k} | {vals} |")
    if result.get("profile"):
        lines += ["", "Where the time goes (torch.profiler self time, top ops):", ""]
        for name, prof in result["profile"].items():
            top = ", ".join(f"{o['op']} {100 * o['share']:.0f}%" for o in prof["ops"][:8])
            ranges = ", ".join(f"{k} {100 * v['share']:.1f}%" for k, v in prof.get("ranges", {}).items())
            lines.append(
                f"- `{name}` ({prof['total_s']:.3f} s profiled): {top}"
                + (f"; ranges: {ranges}" if ranges else "")
            )
    return "\n".join(lines) + "\n"


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
        "| setting | ops/forward | × baseline | reduction steps | reducer ops/step | ops in `pumer.reduce`/step "
        "| compiled step: kernels/step (inductor) | kernel + extern calls/step | launches/forward with it "
        + ("| CUDA launches/forward (in reducer) " if cuda else "")
        + "|",
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if cuda else ""),
    ]
    for s in settings:
        step = s.get("compiled_step") or {}
        calls = (
            f"{step['kernel_calls_per_step']:.1f} + {step['extern_calls_per_step']:.1f}"
            if "kernel_calls_per_step" in step
            else "n/a"
        )
        launches = s.get("launches_per_forward_compiled_step")
        row = (
            f"| `{s['name']}` | {s['ops_per_forward']} | {_fmt(s.get('ops_ratio'), '.2f', '×')} "
            f"| {s.get('reduction_steps_per_forward', 0)} | {_num(s.get('reducer_ops_per_step'), '.1f')} "
            f"| {_num(s.get('ops_in_reduce_ranges_per_step'), '.1f')} | {_num(s.get('kernels_per_step'), '.1f')} "
            f"| {calls} | "
            + (f"{launches:.0f} ({launches / settings[0]['ops_per_forward']:.2f}×)" if launches else "n/a")
            + " |"
        )
        if cuda:
            row += (
                f" {_num(s.get('kernel_launches_per_forward'))} "
                f"({_num(s.get('reducer_kernel_launches_per_forward'))}) |"
            )
        lines.append(row)
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
        "| setting | train examples/s median [min–max] | speedup (paired) | FLOPs ratio fwd+bwd (bound) "
        "| peak MiB | activations MiB | activation memory vs baseline | bound | saved for backward vs baseline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in settings:
        if "train_examples_per_s" in s:
            speed = (
                f"{s['train_examples_per_s']:.3g} [{s['train_examples_per_s_min']:.3g}–"
                f"{s['train_examples_per_s_max']:.3g}] | {s['train_speedup']:.2f}× "
                f"({s['train_paired_speedup_median']:.2f}×)"
            )
        else:
            speed = "n/a | n/a"
        ratio, bound = s["train_activation_mem_ratio"], s["train_activation_mem_bound"]
        lines.append(
            f"| `{s['name']}` | {speed} | {_fmt(s.get('train_flops_ratio'), '.2f', '×')} "
            f"| {s['train_peak_mem_bytes'] / MIB:.0f} | {s['train_activation_peak_bytes'] / MIB:.0f} "
            f"| {_fmt(ratio, '.3f', '×')} ({_saving(ratio)}) | {_fmt(bound, '.3f', '×')} ({_saving(bound)}) "
            f"| {_fmt(s.get('train_saved_ratio'), '.3f', '×')} |"
        )
    return lines


def summary(result: dict) -> str:
    """A few console lines: throughput, speedup, bound and reducer share per setting."""
    out = [f"== {result['name']} ({hardware_line(result)})"]
    for s in result["settings"]:
        out.append(
            f"  {s['name']:>14}: {s['examples_per_s']:8.3g} ex/s  speedup {s['speedup']:5.2f}x "
            f"(paired {s['paired_speedup_median']:.2f}x, best {s['speedup_best']:.2f}x)  FLOPs ratio {_fmt(s['flops_ratio'], '5.2f', 'x')}  "
            f"attained {_pct(s['bound_attainment']):>6}  peak {s['peak_mem_bytes'] / MIB:7.0f} MiB  "
            f"reducer {_pct(s['reducer_time_share'])}"
        )
        extra = []
        if s.get("ops_per_forward") is not None:
            extra.append(
                f"ops/forward {s['ops_per_forward']}, reducer ops/step {_num(s.get('reducer_ops_per_step'), '.1f')}"
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
                f"{_fmt(s.get('train_flops_ratio'), '.2f', 'x')})"
            )
        if extra:
            out.append(" " * 18 + "; ".join(extra))
    reference = reference_summary(result)
    if reference:
        out.append(reference)
    return "\n".join(out)


def plot_result(result: dict, path: Path) -> None:
    """Speedup against the FLOPs ratio for every setting, and the keep-ratio sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = result["settings"]
    training = "train_activation_mem_ratio" in settings[0]
    if training:
        fig, axes = plt.subplots(2, 2, figsize=(12, 9.6))
        (ax1, ax2), (ax3, ax4) = axes
    else:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    values = [v for s in settings for v in (s["flops_ratio"], s["speedup"]) if v is not None]
    low, top = min([*values, 1.0]) * 0.92, max([*values, 1.0]) * 1.12
    ax1.plot([low, top], [low, top], color="grey", lw=1, ls="--", label="speedup = FLOPs ratio")
    colors = {"baseline": "black", "released": "tab:red", "ablation": "tab:blue", "sweep": "tab:green"}
    for s in settings:
        y = s["speedup"]
        err = [[max(y - s["paired_speedup_min"], 0)], [max(s["paired_speedup_max"] - y, 0)]]
        ax1.errorbar(
            s["flops_ratio"], y, yerr=err, fmt="o", color=colors.get(s["kind"], "tab:gray"), capsize=3
        )
        ax1.annotate(s["name"], (s["flops_ratio"], y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax1.set_xlim(low, top)
    ax1.set_ylim(low, top)  # paired ranges beyond the frame are clipped
    ax1.set_xlabel("FLOPs ratio (baseline / setting)")
    ax1.set_ylabel("speedup (examples/s over baseline)")
    ax1.set_title("speedup vs FLOPs bound (bars: paired range)")
    ax1.legend(loc="upper left", fontsize=8)
    ax1.grid(alpha=0.3)

    sweep = sorted(
        (s for s in settings if s["kind"] in ("sweep", "released")), key=lambda s: s["schedule"]["keep_ratio"]
    )
    if len(sweep) >= 2:
        keeps = [s["schedule"]["keep_ratio"] for s in sweep]
        ax2.plot(keeps, [s["speedup"] for s in sweep], "o-", color="tab:green", label="speedup")
        ax2.plot(keeps, [s["flops_ratio"] for s in sweep], "s--", color="tab:purple", label="FLOPs ratio")
        for s, k in zip(sweep, keeps):
            if s["kind"] == "released":
                ax2.annotate(
                    "released", (k, s["speedup"]), textcoords="offset points", xytext=(5, 5), fontsize=8
                )
        ref = sweep[0]["schedule"]
        ax2.set_title(f"keep-ratio sweep (merge {ref['merge_ratio']:g}, text {ref['text_merge_ratio']:g})")
        ax2.legend(fontsize=8)
    else:
        ax2.text(
            0.5, 0.5, "no keep-ratio sweep in this run", ha="center", va="center", transform=ax2.transAxes
        )
    ax2.axhline(1.0, color="grey", lw=1, ls=":")
    ax2.set_xlabel("keep ratio (1 - p)")
    ax2.set_ylabel("× baseline")
    ax2.grid(alpha=0.3)
    if training:
        _plot_training(settings, ax3, ax4, colors)
    fig.suptitle(f"{result['name']}: {hardware_line(result)}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_training(settings: list[dict], ax3, ax4, colors: dict) -> None:
    """Training step: speedup against the forward + backward FLOPs ratio; activation memory against its bound."""
    timed = [s for s in settings if "train_speedup" in s and s.get("train_flops_ratio")]
    if timed:
        values = [v for s in timed for v in (s["train_flops_ratio"], s["train_speedup"])]
        low, top = min([*values, 1.0]) * 0.92, max([*values, 1.0]) * 1.12
        ax3.plot([low, top], [low, top], color="grey", lw=1, ls="--", label="speedup = FLOPs ratio")
        for s in timed:
            y = s["train_speedup"]
            err = [[max(y - s["train_paired_speedup_min"], 0)], [max(s["train_paired_speedup_max"] - y, 0)]]
            color = colors.get(s["kind"], "tab:gray")
            ax3.errorbar(s["train_flops_ratio"], y, yerr=err, fmt="o", color=color, capsize=3)
            ax3.annotate(
                s["name"], (s["train_flops_ratio"], y), textcoords="offset points", xytext=(5, 4), fontsize=8
            )
        ax3.set_xlim(low, top)
        ax3.set_ylim(low, top)
        ax3.legend(loc="upper left", fontsize=8)
    ax3.set_xlabel("FLOPs ratio of forward + backward (baseline / setting)")
    ax3.set_ylabel("training-step speedup (forward + backward + AdamW)")
    ax3.set_title("training step: speedup vs FLOPs bound (bars: paired range)")
    ax3.grid(alpha=0.3)

    names = [s["name"] for s in settings]
    x = list(range(len(settings)))
    ax4.bar(
        [i - 0.2 for i in x], [s["train_activation_mem_ratio"] for s in settings], width=0.4, label="measured"
    )
    ax4.bar(
        [i + 0.2 for i in x],
        [s["train_activation_mem_bound"] for s in settings],
        width=0.4,
        color="none",
        edgecolor="tab:purple",
        hatch="//",
        label="bound (memory proportional to tokens)",
    )
    ax4.axhline(1.0, color="grey", lw=1, ls=":")
    ax4.set_xticks(x)
    ax4.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax4.set_ylabel("training activation memory / baseline")
    ax4.set_title("training step: activation memory (forward + backward) vs its bound")
    ax4.legend(fontsize=8)
    ax4.grid(alpha=0.3, axis="y")


def write_result(result: dict, out_dir: Path, plot: bool = True) -> list[Path]:
    """``<name>.json``, ``<name>.md`` and (with ``plot``) ``<name>.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    stem = out_dir / result["name"]
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text(markdown(result))
    if plot:
        paths.append(stem.with_suffix(".png"))
        plot_result(result, paths[-1])
    return paths


def write_batch_sweep(results: list[dict], out_dir: Path, plot: bool = True) -> list[Path]:
    """Throughput and speedup against batch size, one line per setting (``<exp>_..._batch_sweep.*``)."""
    first = results[0]
    stem = Path(out_dir) / (first["name"].replace(f"_b{first['batch_size']}", "", 1) + "_batch_sweep")
    batches = [r["batch_size"] for r in results]
    names = [s["name"] for s in first["settings"]]
    table = {
        name: {r["batch_size"]: next(s for s in r["settings"] if s["name"] == name) for r in results}
        for name in names
    }
    lines = [
        f"# Batch-size sweep: {first['exp']} ({hardware_line(first)})",
        "",
        "examples/s (speedup over the baseline at the same batch size)",
        "",
        "| setting | " + " | ".join(f"batch {b}" for b in batches) + " |",
        "|---|" + "---|" * len(batches),
    ]
    for name in names:
        cells = [
            f"{table[name][b]['examples_per_s']:.3g} ({table[name][b]['speedup']:.2f}×)" for b in batches
        ]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    summary_json = {
        "exp": first["exp"],
        "batch_sizes": batches,
        "files": [r["name"] + ".json" for r in results],
        "settings": {
            name: {
                str(b): {
                    k: table[name][b].get(k)
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
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
        for name in names:
            ax1.plot(batches, [table[name][b]["examples_per_s"] for b in batches], "o-", label=name)
            line = ax2.plot(batches, [table[name][b]["speedup"] for b in batches], "o-", label=name)[0]
            if name != "baseline":
                bound = [table[name][b]["flops_ratio"] for b in batches]
                ax2.plot(batches, bound, ls="--", lw=1, color=line.get_color(), label=f"{name} FLOPs bound")
        ax2.axhline(1.0, color="grey", lw=1, ls=":")
        for ax, label in ((ax1, "examples/s"), (ax2, "speedup over baseline")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        ax2.legend(fontsize=7)
        fig.suptitle(f"{first['exp']}: {hardware_line(first)}", fontsize=8)
        fig.tight_layout()
        paths.append(stem.with_suffix(".png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def readme_table(results: list[dict], settings: list[str] | None = None) -> str:
    """The combined results table: one row per experiment and setting, then the command and machine."""
    lines = [
        "| experiment | setting | examples/s median [min–max] | speedup (paired) | GFLOPs/ex | FLOPs ratio "
        "| attained | peak memory MiB (activations) | reducer time | reducer ops/step "
        "| training speedup (FLOPs ratio) | training activations (bound) | image tokens per layer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for s in r["settings"]:
            if settings is not None and s["name"] not in settings:
                continue
            lines.append(
                f"| {r['exp']} b{r['batch_size']} | `{s['name']}` "
                f"| {s['examples_per_s']:.3g} [{s['examples_per_s_min']:.3g}–{s['examples_per_s_max']:.3g}] "
                f"| {s['speedup']:.2f}× ({s['paired_speedup_median']:.2f}×) "
                f"| {s['flops_per_example'] / 1e9:.2f} | {_fmt(s['flops_ratio'], '.2f', '×')} "
                f"| {_pct(s['bound_attainment'])} "
                f"| {s['peak_mem_bytes'] / MIB:.0f} ({s['activation_peak_bytes'] / MIB:.0f}) "
                f"| {_pct(s['reducer_time_share'])} | {_num(s.get('reducer_ops_per_step'), '.0f')} "
                f"| {_train_speed(s)} | {_train_memory(s)} "
                f"| {' '.join(map(str, s['tokens_per_layer']['image']))} |"
            )
    lines.append("")
    seen = set()
    for r in results:
        key = (r.get("command"), hardware_line(r))
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"- `{r['exp']}`: `{r.get('command') or '?'}`; {hardware_line(r)}; {protocol_line(r)}")
    return "\n".join(lines) + "\n"


def _train_speed(s: dict) -> str:
    if "train_speedup" not in s:
        return "n/a"
    return f"{s['train_speedup']:.2f}× ({_fmt(s.get('train_flops_ratio'), '.2f', '×')})"


def _train_memory(s: dict) -> str:
    if "train_activation_mem_bound" not in s:
        return "n/a"
    return f"{_saving(s['train_activation_mem_ratio'])} ({_saving(s['train_activation_mem_bound'])})"


def load(paths: list[str | Path]) -> list[dict]:
    out = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        if "settings" not in data or not isinstance(data["settings"], list):
            raise ValueError(f"{p} is not a bench result (no top-level 'settings' list)")
        out.append(data)
    return out
