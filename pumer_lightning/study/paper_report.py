"""The paper protocol's record and report: ``<out>/paper_<task>[_<budget>].json`` (schema
``pumer-lightning/study/paper/v1``), ``.md`` and ``.png``. `markdown` and the plot read only the record."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pumer_lightning.lab.machine import machine_info
from pumer_lightning.lab.report import pct, record_header, table
from pumer_lightning.lab.stats import SE_RULE

from .config import TASK_TEXT, log
from .report import LEARNED_RULE, acc, comparison_lines, placement_lines, plot, settings_table, target_lines

SCHEMA = "pumer-lightning/study/paper/v1"
PROG = "python -m pumer_lightning.study"
PROTOCOL = (
    "paper (every arm fine-tunes the same pre-trained checkpoint, which saw no task labels: the baseline with the "
    "reducers off, PuMer with them on; docs/study.md#paper-protocol-the-headline)"
)


def command(cfg: Any) -> list[str]:
    """The arguments that reproduce one task's report (``python -m pumer_lightning.study`` + these)."""
    args = ["--protocol", "paper", "--task", cfg.task, "--budget", cfg.budget]
    return args + ([] if cfg.long_arm == "auto" else ["--long-arm", cfg.long_arm])


def paper_record(st: Any, start: Any, part: dict[str, Any], wall_seconds: float) -> dict[str, Any]:
    """One task's JSON record: the run, the pre-trained start, the recipe, the choices, every row and verdict."""
    cfg = st.cfg
    machine = machine_info(st.device)
    return {
        **record_header(SCHEMA, PROG, command(cfg)),
        "protocol": PROTOCOL,
        "config": dataclasses.asdict(cfg),
        "budget": dataclasses.asdict(cfg.paper),
        "recipe": dataclasses.asdict(cfg.recipe),
        "task": TASK_TEXT[cfg.task] + ", types " + ", ".join(cfg.recipe.types),
        "metric": "accuracy" if cfg.task == "nlvr2" else "VQA score",
        "hardware": {**machine["hardware"], "device": str(st.device)},
        "software": machine["software"],
        "pretrained": {
            "path": str(start.path),
            "command": start.command,
            "key": start.key,
            "made_now": start.made_now,
            "seconds": start.seconds,
            "figures": start.figures,
        },
        "learned_rule": LEARNED_RULE.format(z=cfg.learned_z),
        "seeds": list(cfg.seeds),
        "text_padding": cfg.text_padding,
        "se_rule": SE_RULE,
        **part,
        "trained_now": dict(st.timings),
        "wall_seconds": wall_seconds,
    }


def write_paper_report(result: dict[str, Any], out: Path) -> None:
    """``<out>/paper_<task>[_<budget>].{json,md,png}``, and the tables on stdout."""
    cfg = result["config"]
    out.mkdir(parents=True, exist_ok=True)
    stem = f"paper_{cfg['task']}" + ("" if cfg["budget"] == "default" else f"_{cfg['budget']}")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(result) + "\n")
    plot(
        result,
        out / f"{stem}.png",
        title="paper protocol: accuracy vs FLOPs (o training-free, s fine-tuned arms)",
    )
    log(f"wrote {out / stem}.json, .md, .png in {result['wall_seconds'] / 60:.1f} min")
    print(markdown(result))


def header(r: dict[str, Any]) -> list[str]:
    cfg, hw, pre, rec = r["config"], r["hardware"], r["pretrained"], r["recipe"]
    figs = ", ".join(f"{k} {100 * v:.1f}%" for k, v in pre["figures"].items() if k.endswith("_acc"))
    made = "made in this run" if pre["made_now"] else "from the cache"
    trained = (
        ", ".join(f"{k} {v / 60:.1f} min" for k, v in r["trained_now"].items()) or "nothing (all cached)"
    )
    return [
        f"# PuMer accuracy study, paper protocol: {r['task'].split(' (')[0]} ({cfg['budget']} budget)",
        "",
        f"- Protocol: **{r['protocol']}**.",
        f"- Command: `{r['command']}`; {hw['device']} ({hw['name']}, {hw['threads']} threads), wall time "
        f"{r['wall_seconds'] / 60:.1f} min; trained in this run: {trained}.",
        f"- Task: {r['task']}; metric: {r['metric']}; model `{cfg['preset']}`.",
        f"- Pre-trained start ({made}; {pre['seconds'] / 60:.1f} min when made): `{pre['command']}`; validation "
        f"{figs or 'figures not recorded'}; it saw no task labels.",
        f"- Recipe (`experiments/{rec['experiment']}.yaml`): N = {r['n_steps']} steps of {cfg['batch_size']}, lr "
        f"{rec['lr']:g}, head {rec['head_mult']:g}x, texts padded to {cfg['max_text_len']}; seeds "
        f"{', '.join(map(str, r['seeds']))} (data order and the new head's initialisation; dropout 0).",
        f"- Learned types: **{', '.join(r['learned_types']) or 'none'}** ({r['learned_rule']}).",
        f"- Rows and comparisons: {r['se_rule']}.",
    ]


def arms_table(r: dict[str, Any]) -> list[str]:
    comps = r["comparisons"]
    header = ["arm", "what", "steps", "seeds", "validation % (learned)", "test % (learned)", "minus baseline"]
    header += ["train min/seed", "train examples/s", "FLOPs ratio"]
    rows = []
    for row in (x for x in r["settings"] if x["name"].startswith("arm:")):
        arm = row["weights"]
        diff = comps.get(f"{arm}_minus_baseline")
        secs = [s for s in row["train_seconds"] if s]
        mins = f"{sum(secs) / len(secs) / 60:.1f}" if secs else "n/a"
        speed = f"{row['train_examples_per_s']:.0f}" if row["train_examples_per_s"] else "n/a"
        chosen = " **(chosen)**" if arm == r["chosen_arm"]["arm"] else ""
        rows.append(
            [f"`{arm}`{chosen}", row["description"], row["steps"], len(row["seeds"])]
            + [acc(r["arms_validation"][arm]), f"**{acc(row['learned'])}**"]
            + [
                pct(diff["diff"], diff["se"], sign=True) if diff else "-",
                mins,
                speed,
                f"{row['flops_ratio']:.2f}×",
            ]
        )
    return table(header, rows)


def choice_lines(r: dict[str, Any]) -> list[str]:
    gaps = ", ".join(f"{a} {pct(g, sign=True)}" for a, g in r["long_arm"]["validation_gaps"].items())
    ran = "ran" if r["long_arm"]["ran"] else "not run"
    return [
        "",
        f"Chosen on validation before test: text-merge policy **{r['policy_choice']['chosen']}** "
        f"({r['policy_choice']['rule']}); the 2N arm **{ran}** (setting `{r['long_arm']['setting']}`; "
        f"{r['long_arm']['rule']}; validation gaps to the baseline: {gaps}); the arm **{r['chosen_arm']['arm']}** "
        f"({r['chosen_arm']['rule']}).",
    ]


def markdown(r: dict[str, Any]) -> str:
    """The report of a paper-protocol record."""
    free = [x for x in r["settings"] if not x["name"].startswith("arm:")]
    lines = [*header(r), "", "The arms (test, read once after every choice):", "", *arms_table(r)]
    lines += [*choice_lines(r), "", "Training-free, on each seed's baseline (mean over the seeds):", ""]
    lines += [*settings_table(r, free), *comparison_lines(r), *placement_lines(r), *target_lines(r)]
    return "\n".join(lines)
