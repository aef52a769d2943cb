"""The study's evaluation stages: the learned types (on validation), every fine-tune per seed, the policy choice
(on validation), the training-free settings, FLOPs and speed, and the loss check.

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
from pumer_lightning.lab.stats import accuracy, over_seeds
from pumer_lightning.reduce import ReducerSchedule, ablation

from .config import log
from .settings import Setting, row
from .train import Study, Trained, train_distilled


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


def learned_types(st: Study, base, data: EvalData) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The baseline's validation score per type and the types it learned: decided on validation, before any
    test figure is looked at."""
    return learned_from(st, score(st, base, data.val, None, "baseline").scores, data)


def learned_from(
    st: Study, val_scores: list[float], data: EvalData
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """`learned_types` from the baseline's per-example validation scores (a mean over seeds, where it has several)."""
    # NLVR2 labels are class ids; VQA labels are already score vectors
    floor = chance(data.val.batches, num_classes=2)
    val_acc = accuracy(val_scores, data.val.types)
    for t, stat in val_acc["by_type"].items():
        stat["chance"] = floor[t]
    z = st.cfg.learned_z
    learned = tuple(t for t, s in val_acc["by_type"].items() if s["acc"] - s["chance"] > z * s["se"])
    log(f"baseline validation score {val_acc['all']['acc']:.3f}; learned types: {learned or 'none'}")
    return val_acc, learned


Scores = dict[str, list[list[float]]]  # setting name -> per seed, every example's score


def evaluate_finetuned(st: Study, trained: Trained, data: EvalData) -> tuple[Scores, Scores]:
    """Every fine-tune (per seed) on validation (for the policy choice) and on test; PuMer fine-tunes also with
    the reducers off and with random pruning at the same budget (``:eval_off``, ``:eval_random``)."""
    log(f"evaluating {sum(len(v) for v in trained.checkpoints.values())} fine-tuned models")
    val: Scores = {}
    test: Scores = {}
    for name, paths in trained.checkpoints.items():
        sched = trained.schedules[name]
        for path in paths:
            model = st.load(path, trained.start, st.cfg.task)
            val.setdefault(name, []).append(score(st, model, data.val, sched, name).scores)
            test.setdefault(name, []).append(score(st, model, data.test, sched, name).scores)
            if sched is not None and name != "ft_pumer_no_text":
                off = score(st, model, data.test, None, name).scores
                random = score(st, model, data.test, ablation(sched, "random_prune"), name).scores
                test.setdefault(f"{name}:eval_off", []).append(off)
                test.setdefault(f"{name}:eval_random", []).append(random)
            del model
    return val, test


def evaluate_reduced(st: Study, trained: Trained, data: EvalData, pumer: ReducerSchedule) -> Scores:
    """Test scores under PuMer (the chosen policy) of the distilled fine-tunes and of the matched control's
    weights (the ordinary fine-tune, reduced without training for it)."""
    out: Scores = {}
    runs = {
        "ft_pumer_distil": train_distilled(st, trained, pumer),
        "ft_control:eval_pumer": trained.checkpoints["ft_control"],
    }
    for name, paths in runs.items():
        for path in paths:
            model = st.load(path, trained.start, st.cfg.task)
            out.setdefault(name, []).append(score(st, model, data.test, pumer, name.split(":")[0]).scores)
            del model
    return out


def loss_check(st: Study, trained: Trained, data: EvalData, base, chosen: str, only: tuple[str, ...]):
    """Validation loss and score (learned types, mean over seeds) of the baseline and of the fine-tunes under the
    reducer they were trained with and with it off, and the control's weights with PuMer switched on: does
    fine-tuning with the reducer on lower the loss it optimises, does the score follow, and does it beat reducing
    the control's weights without training for it?"""
    pumer = st.cfg.schedule(text_merge_policy=chosen)
    control, ch = trained.checkpoints["ft_control"], f"ft_pumer_{chosen}"
    runs: list[tuple[str, str, list[Path], ReducerSchedule | None]] = [
        ("baseline", "off", [trained.baseline], None),
        ("baseline", "PuMer (training-free)", [trained.baseline], pumer),
        ("ft_control", "off", control, None),
        ("ft_control", "PuMer (training-free)", control, pumer),
        (ch, "PuMer (as trained)", trained.checkpoints[ch], pumer),
        (ch, "off", trained.checkpoints[ch], None),
    ]
    rows = []
    for weights, reducer, paths, sched in runs:
        per_seed_scores, per_seed_losses = [], []
        for path in paths:
            model = base if path == trained.baseline else st.load(path, trained.start, st.cfg.task)
            out = score(st, model, data.val, sched, weights)
            per_seed_scores.append(out.scores)
            kept = [x for x, t in zip(out.losses, data.val.types) if t in only]
            per_seed_losses.append(sum(kept) / len(kept))
        stat = over_seeds(per_seed_scores, data.val.types, only)["learned"]
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


POLICY_RULE = (
    "the policy whose PuMer fine-tunes score highest on the validation split (learned types, mean over "
    "seeds); ties go to the higher training-free validation score, then to the first listed"
)


def choose_policy(st: Study, base, data: EvalData, ft_val: Scores, only: tuple[str, ...]) -> dict[str, Any]:
    """The default text-merge policy, chosen on validation (`POLICY_RULE`) before any test figure is looked at."""
    cfg, choice = st.cfg, {}
    for p in cfg.policies:
        free = score(st, base, data.val, cfg.schedule(text_merge_policy=p), f"pumer_{p}").scores
        choice[p] = {
            "ft_val": over_seeds(ft_val[f"ft_pumer_{p}"], data.val.types, only)["learned"],
            "free_val": accuracy(free, data.val.types, only)["learned"],
        }
    chosen = max(cfg.policies, key=lambda p: (choice[p]["ft_val"]["acc"], choice[p]["free_val"]["acc"]))
    found = "; ".join(
        f"{p}: fine-tuned {100 * c['ft_val']['acc']:.1f}, training-free {100 * c['free_val']['acc']:.1f}"
        for p, c in choice.items()
    )
    log(f"validation, learned types: {found} -> chosen policy {chosen}")
    return {"rule": POLICY_RULE, "validation": choice, "chosen": chosen}


def evaluate_free(st: Study, base, free: dict[str, Setting], data: EvalData) -> tuple[list[dict], Scores]:
    """Every training-free setting on the baseline's weights: its rows and its test scores (one 'seed')."""
    log(f"evaluating {len(free)} training-free settings on {len(data.test.types)} test examples")
    rows, scores = [], {}
    for name, setting in free.items():
        split = data.test_longest if name.endswith("_longest") else data.test
        scores[name] = [score(st, base, split, setting[1], name).scores]
        rows.append(row(name, "training-free", "baseline", setting))
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


def finetuned_rows(
    settings: dict[str, tuple[str, Setting]], seeds: dict[str, list[int]]
) -> list[dict[str, Any]]:
    """The report rows of the fine-tuned settings (`pumer_lightning.study.settings.finetuned_settings`)."""
    return [
        {**row(name, "fine-tuned", weights, setting), "seeds": seeds[name]}
        for name, (weights, setting) in settings.items()
    ]
