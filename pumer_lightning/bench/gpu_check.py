"""The summary of `scripts/gpu_check.sh`: every run it made, in one table, against the GPU targets of docs/bench.md#gpu.

    python -m pumer_lightning.bench.gpu_check results/bench/gpu [--stages results/bench/gpu/stages.tsv]

Reads every bench JSON in the directory (not the batch-sweep summaries), joins the batch sweeps the script ran
in two calls (batch 32 and 128 with the other modes, 1, 8 and 256 afterwards) into one sweep per experiment and
mode (``*_batch_sweep.{json,md,png}``), and writes ``summary.md`` and ``summary.json``: one row per run and
setting, then the targets (speedup of the path users get, reducer share) with the figures that decide them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from pumer_lightning.command import Command, flag
from pumer_lightning.lab.report import pct, table

from .report import fmt, hardware_line, write_batch_sweep

# the GPU targets (docs/bench.md#gpu): fp16 via the path users get (half weights, graph capture, default reduction step)
SPEEDUP_TARGETS = {("vilt_nlvr2", 32): 1.6, ("vilt_nlvr2", 128): 1.65, ("meter_nlvr2", 32): 1.3}
REDUCER_SHARE_TARGET = 0.05
RELEASED = "pumer"


def mode_of(result: dict) -> str:
    """How a run executed the model: precision, graph capture, compiled forward, reduction step."""
    pr = result["protocol"]
    parts = [pr["precision"]]
    if pr.get("cuda_graph"):
        parts.append("CUDA graph")
    if pr.get("compiled"):
        parts.append("compiled forward")
    parts.append(f"reducer {pr.get('reducer_impl') or 'n/a'}")
    return ", ".join(parts)


def is_user_path(result: dict) -> bool:
    """The path `python -m pumer_lightning test|predict` takes on a GPU: half weights, graph-captured forward,
    the backbone's default reduction step (auto: compiled on CUDA)."""
    pr = result["protocol"]
    return (
        pr["device"] == "cuda"
        and pr["precision"].endswith("-true")
        and bool(pr.get("cuda_graph"))
        and pr.get("reducer_impl") in ("auto", "compiled")
    )


def load_runs(out_dir: Path) -> list[dict]:
    runs = []
    for path in sorted(Path(out_dir).glob("*.json")):
        if path.name.endswith("_batch_sweep.json") or path.name.startswith("summary"):
            continue
        data = json.loads(path.read_text())
        if isinstance(data.get("settings"), list):
            data["_file"] = path.name
            runs.append(data)
    return runs


def join_sweeps(runs: list[dict], out_dir: Path, plot: bool = True) -> list[Path]:
    """One batch sweep per experiment and mode with every batch size measured (at least three)."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        key = re.sub(r"_b\d+(?=_|$)", "", r["name"], count=1)
        groups.setdefault(key, []).append(r)
    paths = []
    for group in groups.values():
        batches = {r["batch_size"]: r for r in group}
        if len(batches) < 3:
            continue
        ordered = [batches[b] for b in sorted(batches)]
        names = [s["name"] for s in ordered[0]["settings"]]
        if all([s["name"] for s in r["settings"]] == names for r in ordered):
            paths += write_batch_sweep(ordered, out_dir, plot=plot)
    return paths


def _setting(result: dict, name: str) -> dict | None:
    return next((s for s in result["settings"] if s["name"] == name), None)


def _run_row(r: dict) -> dict | None:
    """The figures of one run's released setting against its baseline (None: the run has no released setting)."""
    s, base = _setting(r, RELEASED), _setting(r, "baseline")
    if s is None:
        return None
    step = s.get("compiled_step") or {}
    return {
        "file": r["_file"],
        "exp": r["exp"],
        "batch": r["batch_size"],
        "mode": mode_of(r),
        "user_path": is_user_path(r),
        "speedup": s["speedup"],
        "paired_speedup": s["paired_speedup_median"],
        "flops_ratio": s["flops_ratio"],
        "examples_per_s": s["examples_per_s"],
        "baseline_examples_per_s": base["examples_per_s"],
        "reducer_time_share": s.get("reducer_time_share"),
        "ops_per_forward": s.get("ops_per_forward"),
        "reducer_ops_per_step": s.get("reducer_ops_per_step"),
        "kernels_per_step": s.get("kernels_per_step"),
        "kernel_launches_per_forward": s.get("kernel_launches_per_forward"),
        "baseline_kernel_launches_per_forward": base.get("kernel_launches_per_forward"),
        "train_speedup": s.get("train_speedup"),
        "train_flops_ratio": s.get("train_flops_ratio"),
        "train_activation_mem_ratio": s.get("train_activation_mem_ratio"),
        "train_activation_mem_bound": s.get("train_activation_mem_bound"),
        "peak_mem_ratio": s.get("peak_mem_ratio"),
        "compile_s": step.get("compile_s"),
        "extern_calls": step.get("extern_calls"),
    }


def _of(rows: list[dict], exp: str) -> list[dict]:
    return [x for x in rows if x["exp"].removeprefix("tiny_") == exp]


def _target(text: str, best: dict | None, key: str, met) -> dict:
    return {
        "target": text,
        "measured": best[key] if best else None,
        "file": best["file"] if best else None,
        "met": met(best[key]) if best else None,
    }


def targets_of(rows: list[dict]) -> list[dict]:
    """The GPU targets against the rows: the speedups of the path users get, and the reducer's share (the
    compiled reduction step with half weights first, else any run that measured it)."""
    targets = []
    for (exp, batch), want in SPEEDUP_TARGETS.items():
        got = [x for x in _of(rows, exp) if x["batch"] == batch and x["user_path"]]
        text = f"{exp} released, batch {batch}, path users get: speedup >= {want}x"
        targets.append(_target(text, got[0] if got else None, "speedup", lambda v, want=want: v >= want))
    for exp in ("vilt_nlvr2", "meter_nlvr2"):
        measured = [x for x in _of(rows, exp) if x["reducer_time_share"] is not None]
        got = [x for x in measured if "reducer compiled" in x["mode"] and "-true" in x["mode"]] + measured
        text = f"{exp} released: reducer share of GPU time <= {REDUCER_SHARE_TARGET:.0%}"
        targets.append(
            _target(text, got[0] if got else None, "reducer_time_share", lambda v: v <= REDUCER_SHARE_TARGET)
        )
    return targets


def _target_lines(runs: list[dict], targets: list[dict]) -> list[str]:
    first = runs[0] if runs else None
    tiny = any(r.get("tiny") for r in runs)
    lines = [
        "# GPU check",
        "",
        f"- Machine: {hardware_line(first) if first else 'no results'}",
        "- Tiny presets on this machine: a smoke run of the script, not figures."
        if tiny
        else "- Full-size models, random weights, released settings against the unreduced model.",
        "",
        "## Targets",
        "",
    ]
    rows = []
    for t in targets:
        share = "share" in t["target"]
        measured = pct(t["measured"], suffix="%") if share else fmt(t["measured"], ".2f", "x")
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        rows.append([t["target"], measured, met, t["file"] or "-"])
    return lines + table(["target", "measured", "met", "from"], rows)


def _run_lines(rows: list[dict]) -> list[str]:
    lines = [
        "",
        "## Every run (released setting against the baseline in the same process)",
        "",
    ]
    header = ["experiment", "batch", "mode", "examples/s (baseline)", "speedup (paired)", "FLOPs ratio"]
    header += ["reducer share", "reducer ops/step (eager)", "compiled step kernels/step"]
    header += [
        "launches/forward (baseline)",
        "training speedup (FLOPs ratio)",
        "training activations (bound)",
    ]
    cells = [
        [
            x["exp"],
            x["batch"],
            x["mode"] + (" (users)" if x["user_path"] else ""),
            f"{x['examples_per_s']:.4g} ({x['baseline_examples_per_s']:.4g})",
            f"{x['speedup']:.2f}x ({x['paired_speedup']:.2f}x)",
            fmt(x["flops_ratio"], ".2f", "x"),
            pct(x["reducer_time_share"], suffix="%"),
            fmt(x["reducer_ops_per_step"]),
            fmt(x["kernels_per_step"], ".1f"),
            f"{fmt(x['kernel_launches_per_forward'])} ({fmt(x['baseline_kernel_launches_per_forward'])})",
            f"{fmt(x['train_speedup'], '.2f', 'x')} ({fmt(x['train_flops_ratio'], '.2f', 'x')})",
            f"{fmt(x['train_activation_mem_ratio'], '.3f')} ({fmt(x['train_activation_mem_bound'], '.3f')})",
        ]
        for x in rows
    ]
    lines += table(header, cells)
    externs = [x for x in rows if x["extern_calls"] is not None]
    if externs:
        lines += ["", "Extern calls the compiled reduction steps leave (per forward's compiled graphs):", ""]
        for x in externs:
            calls = ", ".join(f"{k} {v}" for k, v in x["extern_calls"].items()) or "none"
            lines.append(
                f"- {x['exp']} b{x['batch']} ({x['mode']}): {calls}; compiled in {x['compile_s']:.1f} s"
            )
    return lines


def summarize(runs: list[dict], stages: list[dict] | None = None) -> tuple[str, dict]:
    """``summary.md`` and ``summary.json``: the targets, one row per run (its released setting), the stages."""
    ordered = sorted(runs, key=lambda r: (r["exp"], mode_of(r), r["batch_size"]))
    rows = [row for row in map(_run_row, ordered) if row is not None]
    targets = targets_of(rows)
    lines = _target_lines(runs, targets) + _run_lines(rows)
    if stages:
        lines += ["", "## Stages of the script", ""]
        lines += table(
            ["stage", "status", "seconds"], [[st["stage"], st["status"], st["seconds"]] for st in stages]
        )
    return "\n".join(lines) + "\n", {"targets": targets, "runs": rows, "stages": stages or []}


def read_stages(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            out.append({"stage": parts[0], "status": parts[1], "seconds": parts[2]})
    return out


@dataclass
class GpuSummaryArgs:
    """The summary of a scripts/gpu_check.sh directory."""

    out: Path = field(metadata=flag(positional=True))
    """the directory scripts/gpu_check.sh wrote to"""
    stages: Path | None = None
    """stages.tsv (default: <out>/stages.tsv)"""
    plot: bool = True
    """the batch sweeps' plots"""


def write_summary(args: GpuSummaryArgs) -> None:
    """Join the sweeps, write ``summary.md`` and ``summary.json`` and print the summary."""
    runs = load_runs(args.out)
    sweeps = join_sweeps(runs, args.out, plot=args.plot)
    text, data = summarize(runs, read_stages(args.stages or args.out / "stages.tsv"))
    (args.out / "summary.md").write_text(text)
    (args.out / "summary.json").write_text(json.dumps(data, indent=1) + "\n")
    print(text, end="")
    print("wrote " + ", ".join(str(p) for p in [args.out / "summary.md", args.out / "summary.json", *sweeps]))


COMMAND = Command(
    GpuSummaryArgs, write_summary, prog="python -m pumer_lightning.bench.gpu_check", description=__doc__
)


def main(argv: list[str] | None = None) -> None:
    """``python -m pumer_lightning.bench.gpu_check`` (``pumer gpu-summary``)."""
    COMMAND.main(argv)


if __name__ == "__main__":
    main()
