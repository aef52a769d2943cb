"""``python -m pumer_lightning.study``: the study as a list of named stages, and its command line."""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pumer_lightning.lab.context import resolve_device
from pumer_lightning.lab.stats import over_seeds

from .config import BUDGETS, TASK_TEXT, TYPES, StudyConfig, log
from .evaluate import (
    choose_policy,
    eval_data,
    evaluate_finetuned,
    evaluate_free,
    evaluate_reduced,
    finetuned_rows,
    learned_types,
    loss_check,
    time_settings,
)
from .paper import LONG_ARM_RULES, PAPER_BUDGETS, RECIPES, PaperConfig, pretrained_start, task_world
from .paper_eval import evaluate_paper
from .paper_report import paper_record, write_paper_report
from .report import study_record, write_report
from .settings import finetuned_settings, free_settings
from .train import Study, Trained, train_stages
from .verdicts import Comparer, comparisons, targets


@dataclass
class Results:
    """What the evaluation stages found, in the order the report lists it."""

    validation: dict[str, Any]  #: the baseline's validation score per type, with each type's chance score
    learned: tuple[str, ...]  #: the types the baseline learned (decided on validation)
    policy_choice: dict[str, Any]
    settings: list[dict[str, Any]]  #: one row per setting: accuracy, FLOPs and speed
    comparisons: dict[str, dict[str, Any]]
    targets: dict[str, dict[str, Any]]
    #: `loss_check`'s rows: validation loss and score before and after fine-tuning
    loss_check: list[dict[str, Any]]


def evaluate(st: Study, trained: Trained, timing_rounds: int) -> Results:
    """Every evaluation stage: learned types, fine-tunes, the policy choice (on validation), the distillation
    fine-tunes, the training-free settings, timing, comparisons, targets and the loss check."""
    cfg = st.cfg
    data = eval_data(st)
    base = st.load(trained.baseline, trained.start, cfg.task)
    validation, learned = learned_types(st, base, data)
    only = learned or TYPES
    ft_val, scores = evaluate_finetuned(st, trained, data)
    policy_choice = choose_policy(st, base, data, ft_val, only)
    chosen = policy_choice["chosen"]
    scores.update(evaluate_reduced(st, trained, data, cfg.schedule(text_merge_policy=chosen)))
    seeds = {name: list(cfg.seeds) for name in scores}
    seeds["ft_pumer_distil"] = list(cfg.distil_seeds)
    rows, free_scores = evaluate_free(st, base, free_settings(cfg, chosen, base.backbone.num_layers), data)
    scores.update(free_scores)
    rows += finetuned_rows(finetuned_settings(cfg, trained, chosen), seeds)
    figures = time_settings(base, rows, data, timing_rounds)
    for r in rows:
        del r["eval_reducer"]
        r.update(over_seeds(scores[r["name"]], data.test.types, only))
        r.update(figures[r["name"]])
    comps = comparisons(Comparer(scores, seeds, data.test.types, only), list(cfg.policies), chosen)
    losses = loss_check(st, trained, data, base, chosen, only)
    return Results(validation, learned, policy_choice, rows, comps, targets(comps), losses)


def run_study(
    cfg: StudyConfig,
    work: Path,
    out: Path,
    fresh: bool = False,
    device: str = "cpu",
    workers: int = 1,
    timing_rounds: int = 5,
) -> dict[str, Any]:
    """Run (or load from the cache) every stage, evaluate every setting, write ``<out>/shapes*.{json,md,png}``."""
    t_start = time.perf_counter()
    if not cfg.seeds or not cfg.policies:
        raise ValueError("StudyConfig.seeds and StudyConfig.policies must not be empty")
    st = Study(cfg, work, fresh, device, workers)
    log(f"budget {cfg.budget}: {dataclasses.asdict(cfg.steps)}; device {device}")
    trained = train_stages(st)
    results = evaluate(st, trained, timing_rounds)
    result = study_record(cfg, st, trained, results, time.perf_counter() - t_start)
    write_report(result, out)
    return result


def run_paper(
    cfgs: list[PaperConfig],
    work: Path,
    out: Path,
    fresh: bool = False,
    device: str = "cpu",
    workers: int = 1,
    timing_rounds: int = 5,
) -> dict[str, dict[str, Any]]:
    """The paper protocol for each task's config (one pre-trained start, shared): train every stage (or load it
    from ``<work>/paper``), choose on validation, read test once, write ``<out>/paper_<task>*.{json,md,png}``."""
    results = {}
    for i, cfg in enumerate(cfgs):
        t_start = time.perf_counter()
        st = Study(cfg, work / "paper", fresh, device, workers)
        log(
            f"paper protocol, {cfg.task}, budget {cfg.budget}: {dataclasses.asdict(cfg.paper)}; N {cfg.n_steps}"
        )
        task_world(st)
        start = pretrained_start(st, fresh=fresh and i == 0)
        part = evaluate_paper(st, start, timing_rounds)
        result = paper_record(st, start, part, time.perf_counter() - t_start)
        write_paper_report(result, out)
        results[cfg.task] = result
    return results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pumer_lightning.study",
        description="make study: does PuMer keep accuracy? A controlled accuracy-vs-speed study on the shapes world.",
    )
    p.add_argument(
        "--protocol",
        choices=("paper", "adaptation"),
        default="paper",
        help="paper (the headline: every arm fine-tunes the pre-trained checkpoint) or adaptation (fine-tunes "
        "continue from a fine-tuned baseline); docs/study.md",
    )
    p.add_argument(
        "--budget",
        choices=sorted(set(BUDGETS) | set(PAPER_BUDGETS)),
        default="default",
        help="training budget (paper: default about 3 hours on 2 CPU cores from nothing, quick, gpu; "
        "adaptation: default, long, quick, gpu)",
    )
    p.add_argument(
        "--work", type=Path, default=Path("data/study"), help="data, cached checkpoints, TensorBoard runs"
    )
    p.add_argument(
        "--out", type=Path, default=Path("results/study"), help="where the JSON, table and plot go"
    )
    p.add_argument("--fresh", action="store_true", help="retrain every stage even if cached")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--workers", type=int, default=1, help="data-loader worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--task",
        choices=[*sorted(TASK_TEXT), "all"],
        default=None,
        help="the study task (paper default: all, vqa2 then nlvr2; adaptation default: nlvr2)",
    )
    p.add_argument(
        "--long-arm",
        choices=LONG_ARM_RULES,
        default="auto",
        help="paper protocol: when the 2N PuMer arm runs (auto: when neither N-step PuMer arm is within 1 point "
        "of the baseline on validation)",
    )
    p.add_argument(
        "--distil-seeds",
        type=int,
        nargs="*",
        default=[],
        metavar="SEED",
        help="also fine-tune PuMer with distillation from the baseline, once per seed (default: none)",
    )
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser()
    a = p.parse_args(argv)
    if a.protocol == "paper":
        if a.budget not in PAPER_BUDGETS:
            p.error(f"--budget {a.budget}: the paper protocol has budgets {', '.join(sorted(PAPER_BUDGETS))}")
        if a.distil_seeds:
            p.error(
                "--distil-seeds belongs to --protocol adaptation (the paper protocol always distils: arm c)"
            )
        tasks = list(RECIPES) if a.task in (None, "all") else [a.task]
        cfgs = [PaperConfig(budget=a.budget, seed=a.seed, task=t, long_arm=a.long_arm) for t in tasks]
        return run_paper(cfgs, a.work, a.out, a.fresh, str(resolve_device(a.device)), a.workers)
    if a.budget not in BUDGETS or a.task == "all":
        p.error(f"--protocol adaptation: --budget one of {', '.join(sorted(BUDGETS))}, --task nlvr2 or vqa2")
    task = a.task or "nlvr2"
    cfg = StudyConfig(budget=a.budget, seed=a.seed, task=task, distil_seeds=tuple(a.distil_seeds))
    device = str(resolve_device(a.device))
    return run_study(cfg, a.work, a.out, a.fresh, device, a.workers)
