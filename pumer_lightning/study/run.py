"""``python -m pumer_lightning.study``: the study as a list of named stages, and its command line."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pumer_lightning.command import Command, flag
from pumer_lightning.lab.context import resolve_device

from .config import BUDGETS, LONG_ARM_RULES, PAPER_BUDGETS, RECIPES, TASK_TEXT, PaperConfig, StudyConfig, log
from .evaluate import evaluate, evaluate_paper
from .report import paper_record, study_record, write_paper_report, write_report
from .train import Study, pretrained_start, train_stages


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
    part = evaluate(st, trained, timing_rounds)
    result = study_record(cfg, st, trained, part, time.perf_counter() - t_start)
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
        st.world([cfg.task], cfg.recipe.types, cfg.paper)
        start = pretrained_start(st, fresh=fresh and i == 0)
        part = evaluate_paper(st, start, timing_rounds)
        result = paper_record(st, start, part, time.perf_counter() - t_start)
        write_paper_report(result, out)
        results[cfg.task] = result
    return results


@dataclass
class StudyArgs:
    """make study: does PuMer keep accuracy? A controlled accuracy-vs-speed study on the shapes world."""

    protocol: Literal["paper", "adaptation"] = "paper"
    """paper (the headline: every arm fine-tunes the pre-trained checkpoint) or adaptation (fine-tunes continue
    from a fine-tuned baseline); docs/study.md"""
    budget: str = field(default="default", metadata=flag(choices=sorted(set(BUDGETS) | set(PAPER_BUDGETS))))
    """training budget (paper: default 1 h 48 min on 2 CPU cores from nothing, quick, gpu; adaptation:
    default, long, quick, gpu)"""
    work: Path = Path("data/study")
    """data, cached checkpoints, TensorBoard runs"""
    out: Path = Path("results/study")
    """where the JSON, table and plot go"""
    fresh: bool = False
    """retrain every stage even if cached"""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto"""
    workers: int = 1
    """data-loader worker processes"""
    seed: int = 0
    """the study's seed (data, initialisation, order)"""
    task: str | None = field(default=None, metadata=flag(choices=[*sorted(TASK_TEXT), "all"]))
    """the study task (paper default: all, vqa2 then nlvr2; adaptation default: nlvr2)"""
    long_arm: str = field(default="auto", metadata=flag(choices=LONG_ARM_RULES))
    """paper protocol: when the 2N PuMer arm runs (auto: when neither N-step PuMer arm is within 1 point of the
    baseline on validation)"""
    distil_seeds: tuple[int, ...] = field(default=(), metadata=flag(metavar="SEED"))
    """also fine-tune PuMer with distillation from the baseline, once per seed (default: none)"""

    def __post_init__(self) -> None:
        if self.protocol == "paper":
            if self.budget not in PAPER_BUDGETS:
                raise ValueError(
                    f"--budget {self.budget}: the paper protocol has budgets {', '.join(sorted(PAPER_BUDGETS))}"
                )
            if self.distil_seeds:
                raise ValueError(
                    "--distil-seeds belongs to --protocol adaptation (the paper protocol always distils: arm c)"
                )
        elif self.budget not in BUDGETS or self.task == "all":
            raise ValueError(
                f"--protocol adaptation: --budget one of {', '.join(sorted(BUDGETS))}, --task nlvr2 or vqa2"
            )


def study_command(a: StudyArgs) -> dict[str, Any]:
    """Run the protocol the flags name."""
    device = str(resolve_device(a.device))
    if a.protocol == "paper":
        tasks = list(RECIPES) if a.task in (None, "all") else [a.task]
        cfgs = [PaperConfig(budget=a.budget, seed=a.seed, task=t, long_arm=a.long_arm) for t in tasks]
        return run_paper(cfgs, a.work, a.out, a.fresh, device, a.workers)
    cfg = StudyConfig(budget=a.budget, seed=a.seed, task=a.task or "nlvr2", distil_seeds=a.distil_seeds)
    return run_study(cfg, a.work, a.out, a.fresh, device, a.workers)


COMMAND = Command(StudyArgs, study_command, prog="python -m pumer_lightning.study")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m pumer_lightning.study`` (``pumer study``, ``make study``)."""
    return COMMAND.main(argv)
