"""The result of a ``make tune`` run as plain data (what ``<name>.json`` holds), with the report's sentences."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pumer_lightning.lab.report import pct

from .report import yaml_fragment
from .tuner import Point, Tuner


def drop_text(figures: dict[str, Any]) -> str:
    """The drop against the unreduced model with its standard error, in points (``+0.3 ± 0.5``)."""
    return pct(figures["drop"], figures["drop_se"], sign=True, scale=1)


def point_record(point: Point, finalist: bool, front: bool) -> dict[str, Any]:
    """One evaluated point: schedule, role, accuracy per rung (shortest prefix first), timings, check."""
    return {
        "key": point.key,
        "label": point.label,
        "role": point.role,
        "generation": point.generation,
        "schedule": dataclasses.asdict(point.schedule) if point.schedule is not None else None,
        "accuracy": [{"batches": n, **point.accuracy[n]} for n in sorted(point.accuracy)],
        "timing": point.timing,
        "check": point.check,
        "finalist": finalist,
        "on_front": front,
    }


def recommendation(tuner: Tuner, chosen: Point, info: dict[str, Any], out: Path) -> dict[str, Any]:
    """The chosen schedule, its figures, the sentence that explains it and the YAML fragment."""
    st, metric = tuner.s, info["metric"]
    top, timing = chosen.at(), chosen.timing.get("playoff") or chosen.timing["final"]
    reference = next(p for p in tuner.points if p.role == "reference")
    margin = f" plus {st.z:g} standard error{'s' if st.z != 1 else ''}" if st.z else ""
    rule = (
        f"among the finalists whose drop against the unreduced model on `{st.split}`{margin} is at most "
        f"{st.max_drop:g} point{'s' if st.max_drop != 1 else ''}, the {st.playoff} fastest were timed again "
        f"together with the experiment's schedule and the unreduced model ({st.playoff_rounds} interleaved "
        "rounds); this is the fastest of them there"
    )
    if chosen.schedule is None:
        text = f"**No reduction** (`layers: []`): no reduced schedule beat the unreduced model ({rule})."
    else:
        text = (
            f"**{chosen.label}**: {st.split} {metric} {pct(top['value'], suffix='%')} ± {pct(top['se'])} against "
            f"{pct(reference.at()['value'], suffix='%')} unreduced (drop {drop_text(top)} points), "
            f"{timing['examples_per_sec']:.0f} examples/s, **{timing['speedup']:.2f}x** the unreduced model "
            f"(spread {timing['spread']:.2f}x), {timing['gflops_per_example']:.4g} GFLOPs per example. The rule: "
            f"{rule}."
        )
    own = next((p for p in tuner.points if p.role == "experiment"), None)
    if own is not None and own.timing.get("playoff") and own is not chosen:
        text += (
            f" The experiment's schedule ({own.label}): drop {drop_text(own.at())} points, "
            f"{own.timing['playoff']['speedup']:.2f}x in the same "
            "session."
        )
    path = out / f"{info['name']}.yaml"
    comments = [
        f"make tune {info['name']}: {chosen.label}",
        f"the fastest schedule whose drop against the unreduced model on {st.split}{margin} is at most "
        f"{st.max_drop:g} point(s); "
        f"checkpoint {info['checkpoint']}",
        f'use: make exp EXP={info["name"]} ARGS="--config={path}"',
        f"  or: python -m pumer_lightning fit {' '.join('-c ' + f for f in info['files'])} -c {path}",
    ]
    return {
        "key": chosen.key,
        "label": chosen.label,
        "role": chosen.role,
        "text": text,
        "path": str(path),
        "yaml": yaml_fragment(chosen.schedule, comments),
        "accuracy": top,
        "timing": timing,
        "max_drop": st.max_drop,
        "z": st.z,
    }


def playoff_record(tuner: Tuner, members: list[Point], chosen: Point) -> list[dict[str, Any]]:
    """The playoff session's rows, fastest first."""
    rows = [
        {
            "key": p.key,
            "label": p.label,
            "role": p.role,
            "chosen": p is chosen,
            "contender": p.key in tuner.contenders,
            "accuracy": p.at(),
            "timing": p.timing["playoff"],
        }
        for p in members
    ]
    return sorted(rows, key=lambda r: -r["timing"]["speedup"])


def check_record(tuner: Tuner, checked: list[Point], chosen: Point) -> dict[str, Any] | None:
    """The check split's rows and verdict: does the recommendation keep within the budget there, and is it at
    least as fast as the experiment's schedule?"""
    if not checked:
        return None
    names = {"reference": "unreduced", "experiment": "experiment's schedule"}
    rows = []
    for point in checked:
        variant = "recommended" if point is chosen else names.get(point.role, point.role)
        if point is chosen and point.role != "candidate":
            variant = f"recommended (= {names[point.role]})"
        rows.append(
            {
                "variant": variant,
                "label": point.label,
                "accuracy": point.check,
                "timing": point.timing["check"],
            }
        )
    return {
        "split": tuner.s.check_split,
        "examples": chosen.check["n"],
        "rounds": tuner.s.playoff_rounds,
        "rows": rows,
        "verdict": verdict(tuner, checked, chosen),
    }


def verdict(tuner: Tuner, checked: list[Point], chosen: Point) -> str:
    """Sentences on the check split: the drop against the budget (point estimate, then within one SE), and the
    speed against the experiment's schedule in the same session."""
    split, budget = tuner.s.check_split, tuner.s.max_drop
    drop, se, shown = chosen.check["drop"], chosen.check["drop_se"], drop_text(chosen.check)
    if drop <= budget:
        keeps = f"keeps within the {budget:g}-point budget (drop {shown} points)"
    elif drop - se <= budget:
        keeps = f"keeps within the {budget:g}-point budget at one standard error (drop {shown})"
    else:
        keeps = f"**misses** the {budget:g}-point budget (drop {shown} points)"
    text = f"**On {split}** the recommendation {keeps}; it was {drop_text(chosen.at())} on {tuner.s.split}"
    own = next((p for p in checked if p.role == "experiment"), None)
    if own is None or own is chosen:
        return text + (" and is the experiment's own schedule." if own is chosen else ".")
    mine, theirs = chosen.timing["check"], own.timing["check"]
    ratio = mine["speedup"] / theirs["speedup"]
    noise = max(mine["spread"], theirs["spread"])
    faster = "at least as fast as" if ratio >= 1 else "**slower** than"
    text = (
        f"{text}, and is {faster} the experiment's schedule: {mine['speedup']:.2f}x vs {theirs['speedup']:.2f}x "
        f"the unreduced model ({ratio:.2f}x; round-to-round spread up to {noise:.2f}x in that session; "
        f"{mine['gflops_per_example']:.4g} vs {theirs['gflops_per_example']:.4g} GFLOPs per example); the "
        f"experiment's schedule drops {drop_text(own.check)} points there."
    )
    if ratio < 1:
        a, b = chosen.timing.get("playoff", {}), own.timing.get("playoff", {})
        before = f"{a['speedup']:.2f}x vs {b['speedup']:.2f}x in the validation playoff; " if a and b else ""
        within = "within" if 1 / ratio < noise else "beyond"
        flops = (
            "it does more FLOPs per example"
            if mine["gflops_per_example"] > theirs["gflops_per_example"]
            else "it does fewer FLOPs, so the reducer's own work costs it the difference"
        )
        text += (
            f" Why: {before}the {100 * (1 - ratio):.0f}% difference here is {within} the round-to-round noise "
            f"of the session, and {flops}."
        )
    return text


def se_note(points: list[Point]) -> str:
    kinds = {p.at()["se_kind"] for p in points if p.accuracy}
    if kinds == {"per-example"}:
        return (
            "per example (the standard deviation of the task's per-example scores over sqrt(n)); drops are "
            "paired example by example against the unreduced model."
        )
    return (
        "binomial, sqrt(p (1 - p) / n), for the points whose per-example scores were not available; drops "
        "from the two standard errors."
    )


def assemble(
    tuner: Tuner, info: dict[str, Any], outcome: dict[str, Any], out: Path, command: str
) -> dict[str, Any]:
    """Everything ``<name>.json`` holds."""
    finalists = {p.key: front for p, front in zip(outcome["finalists"], outcome["front"])}
    st, ev, cache = tuner.s, tuner.ev, tuner.cache
    return {
        "name": info["name"],
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": info["environment"],
        "experiment": {
            "config_files": info["files"],
            "overrides": info["overrides"],
            "checkpoint": info["checkpoint"],
            "task": info["task"],
            "metric": info["metric"],
            "preset": info["preset"],
            "schedule": str(info["own"]) if info["own"] is not None else "off",
        },
        "settings": {
            **dataclasses.asdict(st),
            "batch_size": ev.batch_size,
            "timing_batches": ev.timing_batches,
            "split_examples": ev.split_examples(st.split, ev.split_batches(st.split)),
        },
        "space": tuner.space.describe(),
        "rungs": tuner.rungs,
        "points": [point_record(p, p.key in finalists, finalists.get(p.key, False)) for p in tuner.points],
        "recommendation": recommendation(tuner, outcome["chosen"], info, out),
        "playoff": playoff_record(tuner, outcome["playoff"], outcome["chosen"]),
        "check": check_record(tuner, outcome["checked"], outcome["chosen"]),
        "se_note": se_note(tuner.points),
        "cache": {
            "path": str(cache.path),
            "hits": cache.hits,
            "misses": cache.misses,
            "evaluations": ev.evaluations,
            "timing_sessions": ev.timing_sessions,
        },
        "hparams_dir": str(Path(info["run_dir"]) / "tune" / "hparams"),
    }
