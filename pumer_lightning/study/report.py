"""The study's record and report: ``<out>/shapes[_<task>][_<budget>].json`` (schema ``pumer-lightning/study/v2``),
``.md`` (the tables, also printed) and ``.png`` (accuracy vs FLOPs). `markdown` and `plot` read only the record,
so a committed record renders again as it did."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pumer_lightning.lab.machine import machine_info
from pumer_lightning.lab.report import pct, record_header, table
from pumer_lightning.lab.stats import SE_RULE

from .config import TASK_TEXT, TYPES, StudyConfig, log

SCHEMA = "pumer-lightning/study/v2"
ADAPTATION = (
    "adaptation (fine-tunes continue from the already fine-tuned baseline for a few steps; docs/study.md: the "
    "paper protocol, fine-tuning the pre-trained checkpoint, is the headline)"
)
LEARNED_RULE = (
    "a type is learned when the baseline's validation score on it exceeds chance (always giving the type's "
    "best single answer: 0.5 for the balanced true/false statements) by more than {z:g} standard errors; "
    "decided on the validation split before any test figure"
)


def study_record(cfg: StudyConfig, st: Any, trained: Any, res: Any, wall_seconds: float) -> dict[str, Any]:
    """The study's JSON record: configuration, machine, every setting's row, comparisons, targets, timings."""
    machine = machine_info(st.device)
    return {
        **record_header(SCHEMA, "python -m pumer_lightning.study"),
        "config": {**dataclasses.asdict(cfg), "steps": dataclasses.asdict(cfg.steps)},
        "task": TASK_TEXT[cfg.task] + ", types " + ", ".join(TYPES),
        "metric": "accuracy" if cfg.task == "nlvr2" else "VQA score",
        "hardware": {**machine["hardware"], "device": str(st.device)},
        "software": machine["software"],
        "pretrain_vqa_val_score": trained.pretrain_val_score,
        "learned_rule": LEARNED_RULE.format(z=cfg.learned_z),
        "validation": res.validation,
        "learned_types": list(res.learned),
        "seeds": list(cfg.seeds),
        "text_padding": cfg.text_padding,
        "policy_choice": res.policy_choice,
        "se_rule": SE_RULE,
        "settings": res.settings,
        "comparisons": res.comparisons,
        "targets": res.targets,
        "loss_check": res.loss_check,
        "train_seconds": st.timings,
        "cached_stages_train_seconds": st.cached_timings,
        "wall_seconds": wall_seconds,
    }


def write_report(result: dict[str, Any], out: Path) -> None:
    """``<out>/shapes[_<task>][_<budget>].{json,md,png}``, and the tables on stdout."""
    cfg = result["config"]
    out.mkdir(parents=True, exist_ok=True)
    stem = "shapes" + ("" if cfg["task"] == "nlvr2" else f"_{cfg['task']}")
    stem += "" if cfg["budget"] == "default" else f"_{cfg['budget']}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(result) + "\n")
    plot(result, out / f"{stem}.png")
    log(f"wrote {out / stem}.json, .md, .png in {result['wall_seconds'] / 60:.1f} min")
    print(markdown(result))


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
