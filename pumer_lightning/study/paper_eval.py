"""The paper protocol's evaluation (docs/study.md#paper-protocol-the-headline): every choice on validation (the
learned types, the text-merge policy, whether the 2N arm runs, the arm), then the test split once: every arm over
seeds, each PuMer arm minus the baseline paired seed by seed, and on the new baselines the adaptation protocol's
training-free stages (PuMer, its ablations, the keep sweep, the pruning control).

The scoring, the training-free settings, the timing and the comparisons are the adaptation protocol's own stages
(`pumer_lightning.study.evaluate`, ``settings``, ``verdicts``), run here on each seed's baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pumer_lightning.lab.stats import over_seeds

from .config import TYPES, log
from .evaluate import EvalData, Scores, eval_data, evaluate_free, learned_from, score, time_settings
from .paper import Arms, PaperConfig, train_arm, train_first_arms
from .settings import free_settings, row
from .train import Study, train_seconds
from .verdicts import Comparer, free_comparisons, keep_comparisons, targets

ARM_TEXT = {
    "baseline": "(a) baseline: reducers off",
    "pumer_real": "(b) PuMer on, text-merge policy real",
    "pumer_pads_first": "(b) PuMer on, text-merge policy pads_first",
    "pumer_distil": "(c) PuMer on (chosen policy), distilled from the seed's baseline",
    "pumer_2n": "(d) PuMer on for 2N steps",
}
POLICY_RULE = (
    "the policy whose PuMer arm scores highest on the validation split (learned types, mean over seeds); ties go "
    "to the first listed"
)
ARM_RULE = (
    "the PuMer arm with the highest validation score (learned types, mean over seeds) among (b) under the chosen "
    "policy, (c) and (d) where it ran; ties go to the fewer training steps"
)
LONG_RULE = (
    "(d) runs when neither (b) under the chosen policy nor (c) is within 1 point of the baseline on validation "
    "(learned types, mean over seeds), and repeats the better of the two for 2N steps"
)


@dataclass
class Choices:
    """What validation decided, before any test figure: learned types, policy, the 2N arm, the chosen arm."""

    validation: dict[str, Any]  #: the baselines' validation score per type (mean over seeds), with chance
    learned: tuple[str, ...]
    val: dict[str, dict[str, Any]]  #: arm -> its validation score on the learned types (over seeds)
    policy: str
    long_arm: dict[str, Any]
    arm: str


def val_of(st: Study, arms: Arms, name: str, data: EvalData) -> list[list[float]]:
    """Arm ``name``'s validation scores, per seed, under the reducer it trained with."""
    return [
        score(st, st.load(p, arms.start, st.cfg.task), data.val, arms.schedules[name], name).scores
        for p in arms.checkpoints[name]
    ]


def learned_val(st: Study, arms: Arms, name: str, data: EvalData, only: tuple[str, ...]) -> dict[str, Any]:
    return over_seeds(val_of(st, arms, name, data), data.val.types, only)["learned"]


def choose(st: Study, arms: Arms, data: EvalData) -> Choices:
    """Train and choose on validation: learned types, policy, (c), whether (d) runs (and train it), the arm."""
    cfg: PaperConfig = st.cfg
    base_val = val_of(st, arms, "baseline", data)
    mean = [sum(xs) / len(base_val) for xs in zip(*base_val)]
    validation, learned = learned_from(st, mean, data)
    only = learned or TYPES
    val = {"baseline": over_seeds(base_val, data.val.types, only)["learned"]}
    for p in cfg.policies:
        val[f"pumer_{p}"] = learned_val(st, arms, f"pumer_{p}", data, only)
    policy = max(cfg.policies, key=lambda p: val[f"pumer_{p}"]["acc"])
    pumer = cfg.schedule(text_merge_policy=policy)
    train_arm(st, arms, "pumer_distil", pumer, cfg.n_steps, distil=True)
    val["pumer_distil"] = learned_val(st, arms, "pumer_distil", data, only)
    candidates = [f"pumer_{policy}", "pumer_distil"]
    gaps = {a: val[a]["acc"] - val["baseline"]["acc"] for a in candidates}
    better = max(candidates, key=lambda a: val[a]["acc"])
    run_long = cfg.long_arm == "always" or (cfg.long_arm == "auto" and max(gaps.values()) < -0.01)
    long_arm = {"rule": LONG_RULE, "setting": cfg.long_arm, "validation_gaps": gaps, "ran": run_long}
    if run_long:
        distil = better == "pumer_distil"
        train_arm(st, arms, "pumer_2n", pumer, 2 * cfg.n_steps, distil=distil)
        val["pumer_2n"] = learned_val(st, arms, "pumer_2n", data, only)
        long_arm["repeats"] = better
        candidates.append("pumer_2n")
    arm = max(candidates, key=lambda a: (val[a]["acc"], -arms.steps[a]))
    found = ", ".join(f"{a} {100 * v['acc']:.1f}" for a, v in val.items())
    ran = "ran" if run_long else "not run"
    log(f"validation, learned types: {found}; policy {policy}; 2N arm {ran}; chosen arm {arm}")
    return Choices(validation, learned, val, policy, long_arm, arm)


def arm_rows(st: Study, arms: Arms, data: EvalData) -> tuple[list[dict[str, Any]], Scores]:
    """Every arm on test (per seed, under the reducer it trained with): its rows and scores (``arm:<name>``)."""
    cfg, rows, scores = st.cfg, [], {}
    for name, paths in arms.checkpoints.items():
        key = f"arm:{name}"
        scores[key] = [
            score(st, st.load(p, arms.start, cfg.task), data.test, arms.schedules[name], name).scores
            for p in paths
        ]
        seconds = [train_seconds(p) for p in paths]
        known = [s for s in seconds if s]
        per_s = arms.steps[name] * cfg.batch_size / (sum(known) / len(known)) if known else None
        r = row(key, "fine-tuned", name, (ARM_TEXT[name], arms.schedules[name]))
        r.update(
            seeds=list(cfg.seeds),
            steps=arms.steps[name],
            distilled=arms.distilled[name],
            train_seconds=seconds,
            train_examples_per_s=per_s,
        )
        rows.append(r)
    return rows, scores


def free_rows(st: Study, arms: Arms, data: EvalData, chosen: str) -> tuple[list[dict[str, Any]], Scores]:
    """The adaptation protocol's training-free settings, on each seed's baseline (one score list per seed)."""
    rows: list[dict[str, Any]] = []
    scores: Scores = {}
    for path in arms.baselines:
        base = st.load(path, arms.start, st.cfg.task)
        free = free_settings(st.cfg, chosen, base.backbone.num_layers)
        rows, per = evaluate_free(st, base, free, data)
        for name, s in per.items():
            scores.setdefault(name, []).extend(s)
    for r in rows:
        r["seeds"] = list(st.cfg.seeds)
    return rows, scores


def arm_comparisons(cmp: Comparer, arms: Arms) -> dict[str, dict[str, Any]]:
    """Every PuMer arm minus the baseline, seed s against seed s."""
    return {
        f"{name}_minus_baseline": cmp(f"arm:{name}", "arm:baseline", f"{ARM_TEXT[name]} vs the baseline")
        for name in arms.checkpoints
        if name != "baseline"
    }


def paper_targets(comps: dict[str, dict[str, Any]], arm: str) -> dict[str, dict[str, Any]]:
    """The documented targets (`pumer_lightning.study.verdicts.targets`), the fine-tuned one against the
    baseline arm: the chosen PuMer arm within 1 point of it."""
    out = targets({**comps, "pumer_ft_minus_control_ft": comps[f"{arm}_minus_baseline"]})
    out["finetuned_within_1_point"]["target"] = (
        f"the PuMer arm chosen on validation ({arm}) within 1 point of the baseline, both fine-tuned from the "
        "pre-trained checkpoint, >= 3 seeds, seed-inclusive SE <= 0.7"
    )
    return out


def evaluate_paper(st: Study, start, timing_rounds: int) -> dict[str, Any]:
    """Train the arms (cached), choose on validation, then read test once: the task's part of the record."""
    cfg: PaperConfig = st.cfg
    arms = train_first_arms(st, start.path, start.key)
    data = eval_data(st)
    ch = choose(st, arms, data)
    only = ch.learned or TYPES
    log(f"test, once: {len(arms.checkpoints)} arms x {len(cfg.seeds)} seeds and the training-free settings")
    rows, scores = arm_rows(st, arms, data)
    more, free_scores = free_rows(st, arms, data, ch.policy)
    rows, scores = rows + more, {**scores, **free_scores}
    base = st.load(arms.baselines[0], arms.start, cfg.task)
    figures = time_settings(base, rows, data, timing_rounds)
    for r in rows:
        del r["eval_reducer"]
        r.update(over_seeds(scores[r["name"]], data.test.types, only))
        r.update(figures[r["name"]])
    cmp = Comparer(scores, {n: list(cfg.seeds) for n in scores}, data.test.types, only)
    comps = {**arm_comparisons(cmp, arms), **free_comparisons(cmp, list(cfg.policies), ch.policy)}
    comps.update(keep_comparisons(cmp, ch.policy))
    return {
        "validation": ch.validation,
        "learned_types": list(ch.learned),
        "arms_validation": ch.val,
        "policy_choice": {"rule": POLICY_RULE, "chosen": ch.policy},
        "long_arm": ch.long_arm,
        "chosen_arm": {"rule": ARM_RULE, "arm": ch.arm},
        "arms": list(arms.checkpoints),
        "n_steps": cfg.n_steps,
        "settings": rows,
        "comparisons": comps,
        "targets": paper_targets(comps, ch.arm),
    }
