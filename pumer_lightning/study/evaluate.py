"""The study's evaluation stages. Shared by both protocols: the evaluation data, the learned types (on
validation), the fine-tuned and training-free settings on test, FLOPs and speed. The adaptation protocol's own:
the policy choice (on validation), the loss check, and `evaluate`, its stages in order.

Every score comes from `pumer_lightning.lab.score.Scorer` (the task's own validation code, one evaluation
trainer) on batches read once; FLOPs and speed from `pumer_lightning.lab.compare.compare_schedules`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pumer_lightning.lab.compare import compare_schedules
from pumer_lightning.lab.score import SplitScores
from pumer_lightning.lab.stats import SE_RULE, accuracy, over_seeds
from pumer_lightning.reduce import ReducerSchedule

from .config import ARM_TEXT, TYPES, PaperConfig, log
from .settings import Setting, finetuned_settings, free_settings, row
from .train import Arms, Study, Trained, train_distilled, train_first_arms, train_seconds
from .verdicts import (
    Comparer,
    arm_comparisons,
    comparisons,
    free_comparisons,
    keep_comparisons,
    paper_targets,
    targets,
)


@dataclass
class Split:
    """The evaluation batches of one split (on the study's device), the data module they came from and the
    statement type of each example, in order."""

    dm: Any
    name: str
    batches: list[dict[str, Any]]
    types: list[str]


@dataclass
class EvalData:
    """Validation and test, padded as the fine-tunes were (``text_padding``), and test padded to each batch's
    longest text (where ``pads_first`` depends on the batch)."""

    val: Split
    test: Split
    test_longest: Split


def split_of(st: Study, dm: Any, name: str) -> Split:
    batches = st.eval_batches(dm, name)
    return Split(dm, name, batches, [m["statement_type"] for batch in batches for m in batch["meta"]])


def eval_data(st: Study) -> EvalData:
    kind, pad = st.cfg.task, st.cfg.text_padding
    dm = st.datamodule(kind, padding=pad)
    test = split_of(st, dm, dm.test_split)
    test_longest = test
    if pad != "longest":
        dm_longest = st.datamodule(kind, padding="longest")
        test_longest = split_of(st, dm_longest, dm_longest.test_split)
    return EvalData(split_of(st, dm, dm.val_split), test, test_longest)


def score(st: Study, model, split: Split, schedule: ReducerSchedule | None, name: str) -> SplitScores:
    """``model`` under ``schedule`` on ``split`` (random pruning seeded with 0): every example's score and loss."""
    out = st.scorer.score(model, split.dm, split.name, split.batches, schedule)
    if out.types != split.types:
        raise RuntimeError(f"{name}: the {split.name} examples came in another order")
    return out


def scored(
    st: Study,
    start: Path | None,
    paths: list[Path],
    split: Split,
    schedule: ReducerSchedule | None,
    name: str,
) -> list[SplitScores]:
    """`score` of each checkpoint of ``paths`` (one per seed; ``start``: the backbone they build on)."""
    return [score(st, st.load(path, start, st.cfg.task), split, schedule, name) for path in paths]


def learned_val(st: Study, arms: Arms, name: str, data: EvalData, only: tuple[str, ...]) -> dict[str, Any]:
    """Arm ``name``'s validation score on the ``only`` types, mean over its seeds, under the reducer it trained
    with."""
    outs = scored(st, arms.start, arms.checkpoints[name], data.val, arms.schedules[name], name)
    return over_seeds([o.scores for o in outs], data.val.types, only)["learned"]


LEARNED_RULE = (
    "a type is learned when the baseline's validation score on it exceeds chance (always giving the type's "
    "best single answer: 0.5 for the balanced true/false statements) by more than {z:g} standard errors; "
    "decided on the validation split before any test figure"
)


def chance(batches: list[dict[str, Any]], num_classes: int) -> dict[str, float]:
    """Per type, the score of always giving the type's best single answer (0.5 for balanced true/false)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for batch in batches:
        labels = batch["labels"].cpu()
        if labels.dim() == 1:
            labels = torch.nn.functional.one_hot(labels, num_classes).float()
        for label, m in zip(labels, batch["meta"]):
            t = m["statement_type"]
            sums[t] = sums.get(t, 0) + label
            counts[t] = counts.get(t, 0) + 1
    return {t: float((sums[t] / counts[t]).max()) for t in sums}


def learned_from(
    st: Study, per_seed: list[list[float]], data: EvalData
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The baseline's validation score per type (from its per-example scores of each seed, averaged) and the types
    it learned: decided on validation, before any test figure is looked at."""
    # NLVR2 labels are class ids; VQA labels are already score vectors
    floor = chance(data.val.batches, num_classes=2)
    val_acc = accuracy([sum(xs) / len(per_seed) for xs in zip(*per_seed)], data.val.types)
    for t, stat in val_acc["by_type"].items():
        stat["chance"] = floor[t]
    z = st.cfg.learned_z
    learned = tuple(t for t, s in val_acc["by_type"].items() if s["acc"] - s["chance"] > z * s["se"])
    log(f"baseline validation score {val_acc['all']['acc']:.3f}; learned types: {learned or 'none'}")
    return val_acc, learned


Scores = dict[str, list[list[float]]]  # setting name -> per seed, every example's score


def finetuned(
    st: Study, arms: Arms, settings: dict[str, tuple[str, Setting]], split: Split
) -> tuple[list[dict[str, Any]], Scores]:
    """The fine-tuned settings (name -> (arm, (description, reducer at test))) on ``split``, each arm's
    checkpoints seed by seed: their rows and scores."""
    rows, scores = [], {}
    for name, (arm, setting) in settings.items():
        outs = scored(st, arms.start, arms.checkpoints[arm], split, setting[1], arm)
        scores[name] = [o.scores for o in outs]
        rows.append({**row(name, "fine-tuned", arm, setting), "seeds": arms.seeds[arm]})
    return rows, scores


def evaluate_free(
    st: Study, start: Path | None, baselines: list[Path], chosen: str, data: EvalData
) -> tuple[list[dict[str, Any]], Scores]:
    """Every training-free setting (`free_settings`) on the weights of each of ``baselines``: the rows and the
    test scores (one list per baseline)."""
    rows: list[dict[str, Any]] = []
    scores: Scores = {}
    for path in baselines:
        base = st.load(path, start, st.cfg.task)
        free = free_settings(st.cfg, chosen, base.backbone.num_layers)
        log(f"evaluating {len(free)} training-free settings on {len(data.test.types)} test examples")
        rows = [row(name, "training-free", "baseline", setting) for name, setting in free.items()]
        for name, setting in free.items():
            split = data.test_longest if name.endswith("_longest") else data.test
            scores.setdefault(name, []).append(score(st, base, split, setting[1], name).scores)
    return rows, scores


def _costs(base, batches: list[dict[str, Any]], schedules: dict[str, ReducerSchedule | None], rounds: int):
    """`compare_schedules` of ``schedules`` against ``baseline`` (unreduced) and the image tokens entering each
    layer under each."""
    n_image, n_text = base.backbone.num_image_tokens, int(batches[0]["input_ids"].shape[1])
    figures = compare_schedules(base, batches, schedules, rounds, warmup=0, reference="baseline")
    for name, sched in schedules.items():
        plan = (sched or ReducerSchedule(layers=[])).tokens_per_layer(
            n_image, n_text, base.backbone.num_layers
        )
        figures[name]["image_tokens_per_layer"] = list(plan[0])
        figures[name]["reference_gflops"] = figures["baseline"]["gflops_per_example"]
    return figures


def time_settings(base, rows: list[dict[str, Any]], data: EvalData, rounds: int) -> dict[str, dict[str, Any]]:
    """FLOPs, speed and tokens per row, relative to the unreduced baseline: the training-free settings are timed
    (same weights, interleaved rounds); a fine-tuned row costs what the training-free row of its reducer costs."""
    log("timing every setting (same weights, interleaved rounds)")
    batches = data.test.batches[: max(1, min(len(data.test.batches), 4))]
    distinct = {r["name"]: r["eval_reducer"] for r in rows if r["stage"] == "training-free"}
    longest = {n: s for n, s in distinct.items() if n.endswith("_longest")}
    figures = _costs(base, batches, {n: s for n, s in distinct.items() if n not in longest}, rounds)
    for name, sched in longest.items():  # its batches are padded differently: timed on its own batches
        own = _costs(base, data.test_longest.batches[: len(batches)], {"baseline": None, name: sched}, rounds)
        figures[name] = own[name]
    out = {}
    for r in rows:
        key = r["name"]
        if r["stage"] != "training-free":
            same = (n for n, s in distinct.items() if s == r["eval_reducer"] and n not in longest)
            key = next(same, "baseline")
        f = figures[key]
        out[r["name"]] = {
            "gflops_per_example": f["gflops_per_example"],
            "flops_ratio": f["reference_gflops"] / f["gflops_per_example"],
            "examples_per_s": f["examples_per_sec"],
            "speedup": f["speedup"],
            "image_tokens_per_layer": f["image_tokens_per_layer"],
        }
    return out


def finish_rows(
    base, rows: list[dict[str, Any]], scores: Scores, data: EvalData, only: tuple[str, ...], rounds: int
) -> None:
    """Each row's test accuracy (mean over its seeds), FLOPs and speed (`time_settings` on ``base``'s weights);
    the reducer it was evaluated with leaves the row."""
    figures = time_settings(base, rows, data, rounds)
    for r in rows:
        del r["eval_reducer"]
        r.update(over_seeds(scores[r["name"]], data.test.types, only))
        r.update(figures[r["name"]])


# ---------------------------------------------------------------------------------------------- the adaptation
POLICY_RULE = (
    "the policy whose PuMer fine-tunes score highest on the validation split (learned types, mean over "
    "seeds); ties go to the higher training-free validation score, then to the first listed"
)


def choose_policy(st: Study, trained: Trained, data: EvalData, only: tuple[str, ...]) -> dict[str, Any]:
    """The default text-merge policy, chosen on validation (`POLICY_RULE`) before any test figure is looked at."""
    cfg, choice = st.cfg, {}
    base = st.load(trained.baseline, trained.arms.start, cfg.task)
    for p in cfg.policies:
        free = score(st, base, data.val, cfg.schedule(text_merge_policy=p), f"pumer_{p}").scores
        choice[p] = {
            "ft_val": learned_val(st, trained.arms, f"ft_pumer_{p}", data, only),
            "free_val": accuracy(free, data.val.types, only)["learned"],
        }
    chosen = max(cfg.policies, key=lambda p: (choice[p]["ft_val"]["acc"], choice[p]["free_val"]["acc"]))
    found = "; ".join(
        f"{p}: fine-tuned {100 * c['ft_val']['acc']:.1f}, training-free {100 * c['free_val']['acc']:.1f}"
        for p, c in choice.items()
    )
    log(f"validation, learned types: {found} -> chosen policy {chosen}")
    return {"rule": POLICY_RULE, "validation": choice, "chosen": chosen}


def loss_check(st: Study, trained: Trained, data: EvalData, chosen: str, only: tuple[str, ...]):
    """Validation loss and score (learned types, mean over seeds) of the baseline and of the fine-tunes under the
    reducer they were trained with and with it off, and the control's weights with PuMer switched on: does
    fine-tuning with the reducer on lower the loss it optimises, does the score follow, and does it beat reducing
    the control's weights without training for it?"""
    pumer, arms = st.cfg.schedule(text_merge_policy=chosen), trained.arms
    free, ch = "PuMer (training-free)", f"ft_pumer_{chosen}"
    base, control = [trained.baseline], arms.checkpoints["ft_control"]
    runs: list[tuple[str, str, list[Path], ReducerSchedule | None]] = [
        ("baseline", "off", base, None),
        ("baseline", free, base, pumer),
        ("ft_control", "off", control, None),
        ("ft_control", free, control, pumer),
        (ch, "PuMer (as trained)", arms.checkpoints[ch], pumer),
        (ch, "off", arms.checkpoints[ch], None),
    ]
    rows = []
    for weights, reducer, paths, sched in runs:
        outs = scored(st, arms.start, paths, data.val, sched, weights)
        per_seed_losses = []
        for out in outs:
            kept = [x for x, t in zip(out.losses, data.val.types) if t in only]
            per_seed_losses.append(sum(kept) / len(kept))
        stat = over_seeds([o.scores for o in outs], data.val.types, only)["learned"]
        loss = sum(per_seed_losses) / len(paths)
        rows.append(
            {
                "weights": weights,
                "reducer": reducer,
                "seeds": len(paths),
                "loss": loss,
                "loss_per_seed": per_seed_losses,
                "score": stat["acc"],
                "score_se": stat["se"],
            }
        )
        log(
            f"validation, learned types: {weights}, reducer {reducer}: loss {loss:.3f}, score {100 * stat['acc']:.1f}"
        )
    return rows


def evaluate(st: Study, trained: Trained, timing_rounds: int) -> dict[str, Any]:
    """Every evaluation stage: learned types, the policy choice (on validation), the distillation fine-tunes, the
    training-free settings, the fine-tunes on test, timing, comparisons, targets and the loss check; what they
    found, as the record lists it."""
    cfg, arms = st.cfg, trained.arms
    data = eval_data(st)
    base_val = scored(st, arms.start, [trained.baseline], data.val, None, "baseline")
    validation, learned = learned_from(st, [o.scores for o in base_val], data)
    only = learned or TYPES
    policy_choice = choose_policy(st, trained, data, only)
    chosen = policy_choice["chosen"]
    log(f"evaluating {sum(len(v) for v in arms.checkpoints.values())} fine-tuned models")
    train_distilled(st, trained, cfg.schedule(text_merge_policy=chosen))
    rows, scores = evaluate_free(st, arms.start, [trained.baseline], chosen, data)
    settings = finetuned_settings(cfg, arms, chosen)
    more, ft_scores = finetuned(st, arms, settings, data.test)
    rows, scores = rows + more, {**scores, **ft_scores}
    finish_rows(st.load(trained.baseline, arms.start, cfg.task), rows, scores, data, only, timing_rounds)
    seeds = {r["name"]: r["seeds"] for r in rows if "seeds" in r}
    comps = comparisons(Comparer(scores, seeds, data.test.types, only), list(cfg.policies), chosen)
    return {
        "learned_rule": LEARNED_RULE.format(z=cfg.learned_z),
        "validation": validation,
        "learned_types": list(learned),
        "seeds": list(cfg.seeds),
        "text_padding": cfg.text_padding,
        "policy_choice": policy_choice,
        "se_rule": SE_RULE,
        "settings": rows,
        "comparisons": comps,
        "targets": targets(comps),
        # validation loss and score before and after fine-tuning
        "loss_check": loss_check(st, trained, data, chosen, only),
    }


# ---------------------------------------------------------------------------------------------- the paper protocol
PAPER_POLICY_RULE = (
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


def choose(st: Study, arms: Arms, data: EvalData) -> dict[str, Any]:
    """Train and choose on validation: learned types, policy, (c), whether (d) runs (and train it), the arm; what
    was decided, as the record lists it, before any test figure."""
    cfg: PaperConfig = st.cfg
    outs = scored(st, arms.start, arms.checkpoints["baseline"], data.val, None, "baseline")
    base_val = [o.scores for o in outs]
    validation, learned = learned_from(st, base_val, data)
    only = learned or TYPES
    val = {"baseline": over_seeds(base_val, data.val.types, only)["learned"]}
    for p in cfg.policies:
        val[f"pumer_{p}"] = learned_val(st, arms, f"pumer_{p}", data, only)
    policy = max(cfg.policies, key=lambda p: val[f"pumer_{p}"]["acc"])
    pumer = cfg.schedule(text_merge_policy=policy)
    arms.train(st, {"pumer_distil": pumer}, cfg.n_steps, teachers=arms.checkpoints["baseline"])
    val["pumer_distil"] = learned_val(st, arms, "pumer_distil", data, only)
    candidates = [f"pumer_{policy}", "pumer_distil"]
    gaps = {a: val[a]["acc"] - val["baseline"]["acc"] for a in candidates}
    better = max(candidates, key=lambda a: val[a]["acc"])
    run_long = cfg.long_arm == "always" or (cfg.long_arm == "auto" and max(gaps.values()) < -0.01)
    long_arm = {"rule": LONG_RULE, "setting": cfg.long_arm, "validation_gaps": gaps, "ran": run_long}
    if run_long:
        teachers = arms.checkpoints["baseline"] if better == "pumer_distil" else None
        arms.train(st, {"pumer_2n": pumer}, 2 * cfg.n_steps, teachers=teachers)
        val["pumer_2n"] = learned_val(st, arms, "pumer_2n", data, only)
        long_arm["repeats"] = better
        candidates.append("pumer_2n")
    arm = max(candidates, key=lambda a: (val[a]["acc"], -arms.steps[a]))
    found = ", ".join(f"{a} {100 * v['acc']:.1f}" for a, v in val.items())
    ran = "ran" if run_long else "not run"
    log(f"validation, learned types: {found}; policy {policy}; 2N arm {ran}; chosen arm {arm}")
    return {
        "validation": validation,  # the baselines' validation score per type (mean over seeds), with chance
        "learned_types": list(learned),
        "arms_validation": val,  # arm -> its validation score on the learned types (over seeds)
        "policy_choice": {"rule": PAPER_POLICY_RULE, "chosen": policy},
        "long_arm": long_arm,
        "chosen_arm": {"rule": ARM_RULE, "arm": arm},
    }


def arm_rows(st: Study, arms: Arms, data: EvalData) -> tuple[list[dict[str, Any]], Scores]:
    """Every arm on test (per seed, under the reducer it trained with): its rows (with its training cost) and
    scores (``arm:<name>``)."""
    arm_settings = {f"arm:{n}": (n, (ARM_TEXT[n], arms.schedules[n])) for n in arms.checkpoints}
    rows, scores = finetuned(st, arms, arm_settings, data.test)
    for r in rows:
        name = r["weights"]
        seconds = [train_seconds(p) for p in arms.checkpoints[name]]
        known = [s for s in seconds if s]
        per_s = arms.steps[name] * st.cfg.batch_size / (sum(known) / len(known)) if known else None
        r.update(
            steps=arms.steps[name],
            distilled=arms.distilled[name],
            train_seconds=seconds,
            train_examples_per_s=per_s,
        )
    return rows, scores


def evaluate_paper(st: Study, start, timing_rounds: int) -> dict[str, Any]:
    """Train the arms (cached), choose on validation, then read test once: the task's part of the record."""
    cfg: PaperConfig = st.cfg
    arms = train_first_arms(st, start)
    data = eval_data(st)
    choice = choose(st, arms, data)
    policy, arm = choice["policy_choice"]["chosen"], choice["chosen_arm"]["arm"]
    only = tuple(choice["learned_types"]) or TYPES
    log(f"test, once: {len(arms.checkpoints)} arms x {len(cfg.seeds)} seeds and the training-free settings")
    rows, scores = arm_rows(st, arms, data)
    baselines = arms.checkpoints["baseline"]
    more, free_scores = evaluate_free(st, arms.start, baselines, policy, data)
    for r in more:  # each seed's baseline
        r["seeds"] = list(cfg.seeds)
    rows, scores = rows + more, {**scores, **free_scores}
    finish_rows(st.load(baselines[0], arms.start, cfg.task), rows, scores, data, only, timing_rounds)
    cmp = Comparer(scores, {r["name"]: r["seeds"] for r in rows}, data.test.types, only)
    comps = {
        **arm_comparisons(cmp, list(arms.checkpoints)),
        **free_comparisons(cmp, list(cfg.policies), policy),
    }
    comps.update(keep_comparisons(cmp, policy))
    return {
        "learned_rule": LEARNED_RULE.format(z=cfg.learned_z),
        "seeds": list(cfg.seeds),
        "text_padding": cfg.text_padding,
        "se_rule": SE_RULE,
        **choice,
        "arms": list(arms.checkpoints),
        "n_steps": cfg.n_steps,
        "settings": rows,
        "comparisons": comps,
        "targets": paper_targets(comps, arm),
    }
