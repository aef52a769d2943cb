"""The study's records and reports: the adaptation protocol's ``<out>/shapes[_<task>][_<budget>].json`` (schema
``pumer-lightning/study/v2``) and the paper protocol's ``<out>/paper_<task>[_<budget>].json`` (schema
``pumer-lightning/study/paper/v1``), each with its ``.md`` (the tables, also printed) and ``.png`` (accuracy vs
FLOPs). `markdown`, `paper_markdown` and `plot` read only the record, so a committed record renders again as it
did."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pumer_lightning.lab.machine import machine_info
from pumer_lightning.lab.report import pct, record_header, table

from .config import TASK_TEXT, TYPES, StudyConfig, log

SCHEMA = "pumer-lightning/study/v2"
PROG = "python -m pumer_lightning.study"
ADAPTATION = (
    "adaptation (fine-tunes continue from the already fine-tuned baseline for a few steps; docs/study.md: the "
    "paper protocol, fine-tuning the pre-trained checkpoint, is the headline)"
)


def run_fields(st: Any, types: tuple[str, ...]) -> dict[str, Any]:
    """The fields of a record that say what ran where: task, metric, hardware and software."""
    cfg, machine = st.cfg, machine_info(st.device)
    return {
        "task": TASK_TEXT[cfg.task] + ", types " + ", ".join(types),
        "metric": "accuracy" if cfg.task == "nlvr2" else "VQA score",
        "hardware": {**machine["hardware"], "device": str(st.device)},
        "software": machine["software"],
    }


def study_record(
    cfg: StudyConfig, st: Any, trained: Any, part: dict[str, Any], wall_seconds: float
) -> dict[str, Any]:
    """The study's JSON record: configuration, machine, what the evaluation found (``part``: every setting's row,
    comparisons, targets), timings."""
    return {
        **record_header(SCHEMA, PROG),
        "config": {**dataclasses.asdict(cfg), "steps": dataclasses.asdict(cfg.steps)},
        **run_fields(st, TYPES),
        "pretrain_vqa_val_score": trained.pretrain_val_score,
        **part,
        "train_seconds": st.timings,
        "cached_stages_train_seconds": st.cached_timings,
        "wall_seconds": wall_seconds,
    }


def write(result: dict[str, Any], out: Path, name: str, text: str, title: str | None = None) -> None:
    """``<out>/<name>[_<budget>].{json,md,png}`` of a record and its Markdown ``text``, which is printed too."""
    out.mkdir(parents=True, exist_ok=True)
    budget = result["config"]["budget"]
    stem = name + ("" if budget == "default" else f"_{budget}")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(text + "\n")
    plot(result, out / f"{stem}.png", title)
    log(f"wrote {out / stem}.json, .md, .png in {result['wall_seconds'] / 60:.1f} min")
    print(text)


def write_report(result: dict[str, Any], out: Path) -> None:
    """``<out>/shapes[_<task>][_<budget>].{json,md,png}``, and the tables on stdout."""
    task = result["config"]["task"]
    write(result, out, "shapes" + ("" if task == "nlvr2" else f"_{task}"), markdown(result))


# ---------------------------------------------------------------------------------------------- markdown
def acc(s: dict[str, float]) -> str:
    """``mean ± SE`` in percent of a score's ``acc`` and ``se``."""
    return pct(s["acc"], s["se"])


def _stage_times(r: dict[str, Any]) -> str:
    parts = [f"{k} {v / 60:.1f} min" for k, v in r["train_seconds"].items()]
    for k, v in r.get("cached_stages_train_seconds", {}).items():
        parts.append(f"{k} {'time not recorded' if v is None else f'{v / 60:.1f} min'} (cached)")
    return f"; training time by stage: {', '.join(parts)}" if parts else ""


def _training_text(r: dict[str, Any]) -> str:
    steps = r["config"]["steps"]
    if r["config"]["task"] == "nlvr2":
        text = (
            f"Pre-trained on shapes VQA from scratch for {steps['pretrain_steps']} steps (validation VQA score "
            f"{r['pretrain_vqa_val_score']:.3f}), then fine-tuned unreduced on NLVR2 for {steps['baseline_steps']} "
            "steps: the baseline."
        )
    else:
        text = f"Trained unreduced from scratch for {steps['pretrain_steps']} steps: the baseline."
    seeds = r.get("seeds", [r["config"]["seed"]])
    return text + (
        f" Every fine-tuning run continues from the baseline for {steps['finetune_steps']} steps, once per seed "
        f"({', '.join(map(str, seeds))}: the order of the training data; every preset has dropout 0)."
    )


def _header(r: dict[str, Any]) -> list[str]:
    cfg, hw = r["config"], r["hardware"]
    lines = [
        f"# PuMer accuracy study on the shapes world ({cfg['budget']} budget)",
        "",
        f"- Protocol: **{ADAPTATION}**.",
        f"- Command: `{r['command']}`; {hw['device']} ({hw['name']}, {hw['threads']} threads), wall time "
        f"{r['wall_seconds'] / 60:.1f} min" + _stage_times(r),
        f"- Task: {r['task']}; metric: {r['metric']}; model `{cfg['preset']}`. " + _training_text(r),
        f"- Learned types: **{', '.join(r['learned_types']) or 'none'}** ({r['learned_rule']}). Accuracy ± one "
        f"standard error on {r['settings'][0]['all']['n']} test examples.",
    ]
    if "se_rule" in r:
        lines += [
            f"- Fine-tuned rows and comparisons: {r['se_rule']}.",
            f"- Texts padded: `{r['text_padding']}` (`max_length`: every text to max_text_len = "
            f"{cfg['max_text_len']} tokens, as the official code pads to 40; FLOPs include the pads, as there).",
        ]
    return lines


def settings_table(r: dict[str, Any], rows: list[dict[str, Any]] | None = None) -> list[str]:
    """One line per setting (``rows``, default every row of the record): accuracy, FLOPs and speed."""
    settings = r["settings"] if rows is None else rows
    types = sorted({t for row in settings for t in row["by_type"]})
    header = ["setting", "weights", "seeds", "reducer at test", "learned types %", "all %"]
    header += [f"{t} %" for t in types] + ["GFLOPs/ex", "FLOPs ratio", "speedup"]
    rows = []
    for row in settings:
        seeds = row.get("seeds")
        cells = [f"`{row['name']}`", row["weights"], len(seeds) if seeds else "-", row["schedule"]]
        cells += [f"**{acc(row['learned'])}**", acc(row["all"])]
        cells += [acc(row["by_type"][t]) if t in row["by_type"] else "" for t in types]
        cells += [f"{row['gflops_per_example']:.3f}", f"{row['flops_ratio']:.2f}×", f"{row['speedup']:.2f}×"]
        rows.append(cells)
    return table(header, rows)


def _policy_lines(r: dict[str, Any]) -> list[str]:
    if "policy_choice" not in r:
        return []
    pc = r["policy_choice"]
    lines = ["", f"Text-merge policy chosen on validation: **{pc['chosen']}** (rule: {pc['rule']}).", ""]
    header = ["policy", "fine-tuned validation % (learned)", "training-free validation % (learned)"]
    return lines + table(
        header, [[p, acc(c["ft_val"]), acc(c["free_val"])] for p, c in pc["validation"].items()]
    )


def comparison_lines(r: dict[str, Any]) -> list[str]:
    lines = ["", "Paired differences on the learned types (same test examples; ± one standard error):", ""]
    rows = []
    for name, c in r["comparisons"].items():
        per = ", ".join(pct(x, sign=True) for x in c.get("per_seed", [c["diff"]]))
        se = f"{pct(c.get('se_seeds', 0.0))} / {pct(c.get('se_sample', c['se']))}"
        rows.append([name, pct(c["diff"], c["se"], sign=True), c.get("seeds", 1), per, se])
    return lines + table(
        ["comparison", "difference (points)", "seeds", "per seed", "SE seeds / sample"], rows
    )


def placement_lines(r: dict[str, Any]) -> list[str]:
    """The pruning control by placement (``StudyConfig.placement_keep``) as a table of its own."""
    by = {row["name"]: row for row in r["settings"]}
    comps = [c for name, c in r["comparisons"].items() if name.startswith("placement_block")]
    if not comps:
        return []
    keep = r["config"]["placement_keep"]
    lines = [
        "",
        f"The pruning control by placement: training-free at keep {keep:g} (same merge and text settings), the "
        "reducer at one block only (not the last: in ViLT a reducer there changes nothing the head reads):",
        "",
    ]
    header = [
        "reducer at block",
        "text-informed % (learned)",
        "random % (learned)",
        "random minus text (points)",
    ]
    rows = [
        [c["a"].rpartition("@block")[2], acc(by[c["b"]]["learned"]), acc(by[c["a"]]["learned"])]
        + [pct(c["diff"], c["se"], sign=True)]
        for c in comps
    ]
    return lines + table(header, rows)


def _loss_lines(r: dict[str, Any]) -> list[str]:
    if not r.get("loss_check"):
        return []
    lines = [
        "",
        "Validation loss (the loss fine-tuning minimises) and score on the learned types, mean over seeds:",
        "",
    ]
    rows = [
        [c["weights"], c["reducer"], c["seeds"], f"{c['loss']:.3f}", pct(c["score"], c["score_se"])]
        for c in r["loss_check"]
    ]
    return lines + table(["weights", "reducer", "seeds", "loss", "score %"], rows)


def target_lines(r: dict[str, Any]) -> list[str]:
    if not r.get("targets"):
        return []
    lines = ["", "Targets:", ""]
    for t in r["targets"].values():
        seeds = f" over {t['seeds']} seeds" if "seeds" in t else ""
        met = "MET" if t["met"] else "MISSED"
        lines.append(f"- {met}: {t['target']}: {pct(t['value'], t['se'], sign=True, scale=1)} points{seeds}")
    return lines


def markdown(r: dict[str, Any]) -> str:
    """The report of a study record: the run, every setting, the policy choice, the comparisons, the placement
    control, the loss check and the targets."""
    lines = [*_header(r), "", *settings_table(r), *_policy_lines(r), *comparison_lines(r)]
    lines += [*placement_lines(r), *_loss_lines(r), *target_lines(r)]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path, title: str | None = None) -> None:
    """Test accuracy on the learned types against GFLOPs per example, one point per setting; the command that
    reproduces it at the foot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"training-free": "o", "fine-tuned": "s"}
    for row in r["settings"]:
        if "@block" in row["name"]:  # the placement control: a diagnostic with its own table
            continue
        name, x, y = row["name"], row["gflops_per_example"], 100 * row["learned"]["acc"]
        color = (
            "tab:red"
            if "random" in name
            else ("tab:gray" if name in ("baseline", "ft_control", "arm:baseline") else "tab:blue")
        )
        color = "tab:orange" if "cls" in name else color
        ax.errorbar(x, y, yerr=100 * row["learned"]["se"], fmt=styles[row["stage"]], color=color, capsize=2)
        ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("GFLOPs per example")
    ax.set_ylabel(f"test accuracy on learned types ({', '.join(r['learned_types']) or 'all'}) %")
    ax.set_title(
        title or "accuracy vs FLOPs (o training-free, s fine-tuned; red random, orange CLS pruning)",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    fig.text(0.01, 0.005, f"reproduce: {r['command']}", fontsize=6, color="dimgray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- the paper protocol
PAPER_SCHEMA = "pumer-lightning/study/paper/v1"
PROTOCOL = (
    "paper (every arm fine-tunes the same pre-trained checkpoint, which saw no task labels: the baseline with the "
    "reducers off, PuMer with them on; docs/study.md#paper-protocol-the-headline)"
)


def paper_args(cfg: Any) -> list[str]:
    """The arguments that reproduce one task's report (``python -m pumer_lightning.study`` + these)."""
    args = ["--protocol", "paper", "--task", cfg.task, "--budget", cfg.budget]
    return args + ([] if cfg.long_arm == "auto" else ["--long-arm", cfg.long_arm])


def paper_record(st: Any, start: Any, part: dict[str, Any], wall_seconds: float) -> dict[str, Any]:
    """One task's JSON record: the run, the pre-trained start, the recipe, the choices, every row and verdict."""
    cfg = st.cfg
    return {
        **record_header(PAPER_SCHEMA, PROG, paper_args(cfg)),
        "protocol": PROTOCOL,
        "config": dataclasses.asdict(cfg),
        "budget": dataclasses.asdict(cfg.paper),
        "recipe": dataclasses.asdict(cfg.recipe),
        **run_fields(st, cfg.recipe.types),
        "pretrained": {
            "path": str(start.path),
            "command": start.command,
            "key": start.key,
            "made_now": start.made_now,
            "seconds": start.seconds,
            "figures": start.figures,
        },
        **part,
        "trained_now": dict(st.timings),
        "wall_seconds": wall_seconds,
    }


def write_paper_report(result: dict[str, Any], out: Path) -> None:
    """``<out>/paper_<task>[_<budget>].{json,md,png}``, and the tables on stdout."""
    title = "paper protocol: accuracy vs FLOPs (o training-free, s fine-tuned arms)"
    write(result, out, f"paper_{result['config']['task']}", paper_markdown(result), title)


def paper_header(r: dict[str, Any]) -> list[str]:
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


def paper_markdown(r: dict[str, Any]) -> str:
    """The report of a paper-protocol record."""
    free = [x for x in r["settings"] if not x["name"].startswith("arm:")]
    lines = [*paper_header(r), "", "The arms (test, read once after every choice):", "", *arms_table(r)]
    lines += [*choice_lines(r), "", "Training-free, on each seed's baseline (mean over the seeds):", ""]
    lines += [*settings_table(r, free), *comparison_lines(r), *placement_lines(r), *target_lines(r)]
    return "\n".join(lines)
