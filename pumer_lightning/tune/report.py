"""``make tune``'s outputs: ``<out>/<name>.json`` (every point), ``.md`` (front, recommendation, check), ``.png``
(accuracy vs examples/s and vs FLOPs), ``.yaml`` (the recommended reducer as a configuration fragment) and one
TensorBoard HParams entry per point."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import Any

import yaml

from pumer_lightning.callbacks.hparams import flatten_params
from pumer_lightning.lab.report import pct, table
from pumer_lightning.reduce import ReducerSchedule

from .search import on_front


def reducer_fields(schedule: ReducerSchedule | None) -> dict[str, Any]:
    """Every field of ``schedule`` (the unreduced model: ``layers: []`` and the defaults)."""
    return dataclasses.asdict(schedule if schedule is not None else ReducerSchedule())


def yaml_fragment(schedule: ReducerSchedule | None, comments: list[str]) -> str:
    """The schedule as the configuration fragment the CLI composes over an experiment
    (``-c experiments/base.yaml -c experiments/<name>.yaml -c <fragment>``): ``model.init_args.reducer``."""
    body = yaml.safe_dump(
        {"model": {"init_args": {"reducer": reducer_fields(schedule)}}},
        sort_keys=False,
        default_flow_style=None,
    )
    return "".join(f"# {line}\n" for line in comments) + body


def _columns(split: str, metric: str) -> list[str]:
    """The figure columns every table of the report has, after its label columns."""
    return [
        f"{split} {metric} ± SE",
        "drop ± SE (points)",
        "examples/s",
        "speed-up (spread)",
        "GFLOPs/example",
    ]


def _figures(accuracy: dict[str, Any], timing: dict[str, Any]) -> list[str]:
    """The cells of `_columns`: accuracy ± SE, drop ± SE in points, examples/s, speed-up (spread), GFLOPs."""
    cells = [
        pct(accuracy.get("value"), accuracy.get("se")),
        pct(accuracy.get("drop"), accuracy.get("drop_se"), sign=True, scale=1),
    ]
    if not timing:
        return [*cells, "n/a", "n/a", "n/a"]
    return [
        *cells,
        f"{timing['examples_per_sec']:.0f}",
        f"{timing['speedup']:.2f}x ({timing['spread']:.2f}x)",
        f"{timing['gflops_per_example']:.4g}",
    ]


def _cached(*figures: dict[str, Any]) -> str:
    flags = [f.get("cached") for f in figures if f]
    return "yes" if flags and all(flags) else ("partly" if any(flags) else "no")


def front_table(result: dict[str, Any]) -> list[str]:
    """The finalists (whole search split, final timing), the front first, fastest first."""
    metric, split = result["experiment"]["metric"], result["settings"]["split"]
    rows = [p for p in result["points"] if p["finalist"]]
    rows.sort(key=lambda p: (not p["on_front"], -p["timing"]["final"]["speedup"]))
    header = ["schedule", "role", *_columns(split, metric), "front", "from cache"]
    cells = []
    for p in rows:
        top, final = p["accuracy"][-1], p["timing"]["final"]
        mark = "**yes**" if p["on_front"] else "no"
        cells.append([p["label"], p["role"], *_figures(top, final), mark, _cached(top, final)])
    return table(header, cells)


def check_lines(result: dict[str, Any]) -> list[str]:
    """The check split's table and its verdict (drop within budget, at least as fast as the experiment's)."""
    check = result.get("check")
    if not check:
        return ["No check split (`--check-split none`).", ""]
    metric, split = result["experiment"]["metric"], check["split"]
    lines = [
        f"Never used to choose: the recommendation, the experiment's schedule and the unreduced model on the whole "
        f"{split} split ({check['examples']} examples), drops paired example by example, timed in one session "
        f"({check['rounds']} interleaved rounds).",
        "",
    ]
    header = ["variant", "schedule", *_columns(split, metric), "from cache"]
    cells = []
    for row in check["rows"]:
        acc, timing = row["accuracy"], row["timing"]
        cells.append([row["variant"], row["label"], *_figures(acc, timing), _cached(acc, timing)])
    lines += [*table(header, cells), "", check["verdict"], ""]
    return lines


def markdown(result: dict[str, Any]) -> str:
    """The report: the run, the recommendation with its YAML, the check split, the front, the search."""
    exp, st, rec = result["experiment"], result["settings"], result["recommendation"]
    env, cache = result["environment"], result["cache"]
    lines = [
        f"# make tune {result['name']}",
        "",
        f"- command: `{result['command']}`",
        f"- checkpoint: `{exp['checkpoint']}`; task `{exp['task']}` ({exp['metric']}), backbone `{exp['preset']}`, "
        f"experiment's schedule: {exp['schedule']}",
        f"- search split `{st['split']}` ({st['split_examples']} examples); device {env['device']}; batch size "
        f"{st['batch_size']} x {st['timing_batches']} timing batches; {env['threads']} threads",
        f"- machine: {env['machine']}; torch {env['torch']}; commit {env['commit']}",
        f"- wall time {result['wall_s'] / 60:.1f} min ({result['stage_text']}); measured now: "
        f"{cache['evaluations']} evaluations, {cache['timing_sessions']} timing sessions; from the cache: "
        f"{cache['hits']['accuracy']} accuracy and {cache['hits']['timing']} timing figures (`{cache['path']}`)",
        "",
        f"## Recommendation for `--max-drop {st['max_drop']:g}`",
        "",
        rec["text"],
        "",
        *playoff_lines(result),
        "```yaml",
        rec["yaml"].rstrip(),
        "```",
        "",
        f'Use it: `make exp EXP={result["name"]} ARGS="--config={rec["path"]}"`, or add `-c {rec["path"]}` after '
        f"the experiment's files on `python -m pumer_lightning fit|validate|test`.",
        "",
        f"## Check on the {result['check']['split'] if result.get('check') else 'test'} split",
        "",
        *check_lines(result),
        f"## Pareto front on `{st['split']}` (the finalists; accuracy vs examples/s)",
        "",
        *front_table(result),
        "",
        *search_lines(result),
    ]
    return "\n".join(lines) + "\n"


def playoff_lines(result: dict[str, Any]) -> list[str]:
    """The playoff session: the contenders, the experiment's schedule and the unreduced model, fastest first."""
    metric, split = result["experiment"]["metric"], result["settings"]["split"]
    playoff = f"playoff ({result['settings']['playoff_rounds']} rounds, one session)"
    header = [playoff, *_columns(split, metric), "from cache"]
    cells = []
    for row in result["playoff"]:
        label = f"**{row['label']}** (recommended)" if row["chosen"] else f"{row['label']} ({row['role']})"
        cells.append([label, *_figures(row["accuracy"], row["timing"]), _cached(row["timing"])])
    return [*table(header, cells), ""]


def search_lines(result: dict[str, Any]) -> list[str]:
    """How the search went: the space, the rungs, the standard errors and timing notes."""
    st, space = result["settings"], result["space"]
    generation0 = sum(1 for p in result["points"] if p["generation"] == 0)
    fixed = sum(1 for p in result["points"] if p["role"] != "candidate")
    lines = [
        "## The search",
        "",
        f"Successive halving (eta {st['eta']}) over {generation0} schedules: the unreduced model, the "
        f"experiment's schedule and {generation0 - fixed} sampled from a space of {space['size']} combinations "
        f"(seed {st['seed']}): layers {space['layers']}, keep {_values(space['keep_ratio'])}, merge "
        f"{_values(space['merge_ratio'])}, text merge {_values(space['text_merge_ratio'])}, policy "
        f"{space['text_merge_policy']}, importance {space['importance']}. Every point was timed first "
        f"({st['rounds']} interleaved rounds per session, always with the unreduced model), then the best "
        f"1/{st['eta']} by Pareto rank on ({st['split']} accuracy, speed) went on to the next, longer prefix:",
        "",
        *table(
            ["generation", "examples", "schedules scored", "from cache"],
            [[r["generation"], r["examples"], r["points"], r["cached"]] for r in result["rungs"]],
        ),
    ]
    lines += [
        "",
        f"Generation 0 is the sample; {len(result['points']) - generation0} more schedules came from later "
        "generations: each mutates (one or two fields by one step) the "
        f"{st['parents']} front points whose drop is nearest the budget, the current recommendation first, into "
        f"{st['children']} new schedules that go through the same halving. Each generation's finalists were timed "
        f"again with {st['final_rounds']} rounds in one session. Standard errors: "
        f"{result['se_note']} Speed-ups are ratios of median times to the unreduced model's in the same "
        "session; the spread is the slowest over the fastest round of that setting.",
        "",
        f"Every evaluated point (schedule, role, largest prefix scored, accuracy, screening speed-up) is in "
        f"`{result['name']}.json`; TensorBoard: `tensorboard --logdir {result['hparams_dir']}` (HParams tab).",
    ]
    return lines


def _values(values: list[float]) -> str:
    if len(values) > 3:
        return f"{values[0]:g}..{values[-1]:g} ({len(values)} values)"
    return ", ".join(f"{v:g}" for v in values)


def _xy(point: dict[str, Any], key: str) -> tuple[float, float, float]:
    """(x, accuracy %, SE %) of a point: ``key`` of its final timing (screening when it has none)."""
    timing = point["timing"].get("final") or point["timing"].get("screen")
    top = point["accuracy"][-1]
    return timing[key], 100 * top["value"], 100 * top["se"]


def _panel(ax: Any, result: dict[str, Any], key: str, better: float) -> None:
    """Every point at its longest prefix (grey when it stopped early), finalists with SEs, the front of this
    panel's axes (``better`` = +1: larger x is better, -1: smaller), the recommendation."""
    styles = {"reference": ("s", "black"), "experiment": ("D", "tab:orange"), "candidate": ("o", "tab:blue")}
    for p in result["points"]:
        x, y, se = _xy(p, key)
        marker, color = styles[p["role"]]
        ax.errorbar(
            x,
            y,
            yerr=se if p["finalist"] else None,
            fmt=marker,
            ms=5,
            capsize=2,
            color=color if p["finalist"] else "lightgray",
            zorder=3 if p["finalist"] else 1,
        )
    finalists = [p for p in result["points"] if p["finalist"]]
    values = [(_xy(p, key)[1], better * _xy(p, key)[0]) for p in finalists]
    front = sorted((_xy(p, key) for p, on in zip(finalists, on_front(values)) if on), key=lambda v: v[0])
    ax.plot(
        [v[0] for v in front], [v[1] for v in front], "-", color="tab:blue", alpha=0.5, label="Pareto front"
    )
    rec = next(p for p in result["points"] if p["key"] == result["recommendation"]["key"])
    x, y, _ = _xy(rec, key)
    ax.plot(x, y, "*", color="tab:red", ms=16, label="recommended", zorder=4)
    ax.grid(alpha=0.3)


def plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy vs speed (left: speed-up over the unreduced model in the same timing session, with the unreduced
    model's examples/s on the top axis) and vs GFLOPs per example (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    _panel(axes[0], result, "speedup", 1.0)
    _panel(axes[1], result, "gflops_per_example", -1.0)
    reference = next(p for p in result["points"] if p["role"] == "reference")
    rate = (reference["timing"].get("final") or reference["timing"]["screen"])["examples_per_sec"]
    top = axes[0].secondary_xaxis("top", functions=(lambda s: s * rate, lambda r: r / rate))
    top.set_xlabel(
        f"examples/s (batch {result['settings']['batch_size']}, {result['environment']['device']})"
    )
    axes[0].set_xlabel("speed-up over the unreduced model (same timing session)")
    axes[1].set_xlabel("GFLOPs per example")
    axes[0].set_ylabel(f"{result['settings']['split']} {result['experiment']['metric']} (%)")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(
        f"make tune {result['name']}: blue = finalists (whole split, ± SE), grey = stopped on a shorter prefix; "
        "black square = unreduced, orange diamond = experiment's schedule",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_hparams(result: dict[str, Any], log_dir: Path) -> None:
    """One HParams entry per evaluated point under ``log_dir`` (rewritten on every run), reducer fields flattened
    as in the training runs' HParams tab (``reducer/keep_ratio``)."""
    from torch.utils.tensorboard import SummaryWriter

    if log_dir.is_dir():
        shutil.rmtree(log_dir)
    writer = SummaryWriter(log_dir=str(log_dir))
    for index, p in enumerate(result["points"]):
        top = p["accuracy"][-1]
        timing = p["timing"].get("final") or p["timing"].get("screen")
        params = flatten_params({"reducer": p["schedule"] or reducer_fields(None)})
        params.update({"tune/role": p["role"], "tune/schedule": p["label"], "tune/examples": top["n"]})
        metrics = {
            "tune/accuracy": top["value"],
            "tune/accuracy_se": top["se"],
            "tune/drop": top["drop"],
            "tune/drop_se": top["drop_se"],
            "tune/examples_per_sec": timing["examples_per_sec"],
            "tune/speedup": timing["speedup"],
            "tune/gflops_per_example": timing["gflops_per_example"],
            "tune/finalist": float(p["finalist"]),
            "tune/on_front": float(p["on_front"]),
        }
        writer.add_hparams(
            params, {k: v for k, v in metrics.items() if _finite(v)}, run_name=f"point_{index:03d}"
        )
    writer.close()


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def write_outputs(result: dict[str, Any], out: Path) -> dict[str, Path]:
    """``<out>/<name>.{json,md,png,yaml}``; returns the paths."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"{result['name']}.{ext}" for ext in ("json", "md", "png", "yaml")}
    paths["yaml"].write_text(result["recommendation"]["yaml"])
    paths["json"].write_text(json.dumps(result, indent=1, default=str) + "\n")
    paths["md"].write_text(markdown(result))
    plot(result, paths["png"])
    return paths
