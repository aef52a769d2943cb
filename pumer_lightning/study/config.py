"""The study's configuration: the budgets, `StudyConfig` (what determines its models) and the cache key; the paper
protocol's budgets, recipes and `PaperConfig`."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pumer_lightning
from pumer_lightning.lab.cache import content_hash
from pumer_lightning.reduce import ReducerSchedule

TYPES: tuple[str, ...] = ("shape", "color", "exist")
TASK_TEXT = {
    "nlvr2": "shapes NLVR2 (an image pair and one true/false statement about it)",
    "vqa2": "shapes VQA (one image, a question, ten simulated annotator answers)",
}


@dataclass
class Budget:
    """Training steps of each stage (batch ``batch_size``) and the data sizes."""

    pretrain_steps: int
    baseline_steps: int
    finetune_steps: int
    num_train: int
    num_val: int
    num_test: int


BUDGETS: dict[str, Budget] = {
    # pre-training (11 min on 2 idle CPU cores) and baseline (~10 min) are cached; then 3 seeds x 4 fine-tunes of
    # 200 steps (~15 min idle). Changing pretrain_steps or num_train moves the pre-training's cache key (a retrain).
    "default": Budget(
        pretrain_steps=2500,
        baseline_steps=1500,
        finetune_steps=200,
        num_train=60000,
        num_val=600,
        num_test=1800,
    ),
    # the default with a baseline trained twice as long (3000 steps, as the first runs had): a stronger NLVR2
    # model, at about 30 more CPU-minutes; shares the default's data and pre-training cache
    "long": Budget(
        pretrain_steps=2500,
        baseline_steps=3000,
        finetune_steps=200,
        num_train=60000,
        num_val=600,
        num_test=1800,
    ),
    # a smoke run of every stage (minutes; the figures mean little)
    "quick": Budget(
        pretrain_steps=60,
        baseline_steps=60,
        finetune_steps=20,
        num_train=2000,
        num_val=150,
        num_test=300,
    ),
    # a GPU: longer training, a stronger baseline, a bigger test set
    "gpu": Budget(
        pretrain_steps=8000,
        baseline_steps=10000,
        finetune_steps=2500,
        num_train=200000,
        num_val=1500,
        num_test=6000,
    ),
}


@dataclass
class StudyConfig:
    """Everything that determines the study's models (the cache keys hash it)."""

    budget: str = "default"
    task: str = "nlvr2"
    preset: str = "vilt_small"
    seed: int = 0
    batch_size: int = 64
    lr: float = 1e-3  # pre-training, from scratch
    baseline_lr: float = 2e-4  # NLVR2 fine-tuning of the pre-trained backbone (the head at 10x)
    finetune_lr: float = 1e-4  # the runs that continue from the baseline (the head at 10x)
    image_size: int = 96
    patch_size: int = 16
    min_objects: int = 1
    max_objects: int = 4
    max_text_len: int = 16
    #: the PuMer setting fine-tuned and compared (block ids of the 4-block model)
    reducer: dict[str, Any] = field(
        default_factory=lambda: {
            "layers": [1, 2],
            "keep_ratio": 0.7,
            "merge_ratio": 0.2,
            "text_merge_ratio": 0.2,
        }
    )
    keep_sweep: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    #: the pruning control by placement: text-informed against random pruning at this keep ratio (same merge and
    #: text settings) with the reducer at one block only, for every block but the last (in ViLT a reducer there
    #: changes nothing the head reads: the pooled text CLS is protected and the MLP is per token); None drops it
    placement_keep: float | None = 0.5
    #: seeds of the fine-tuning stages: they vary the order of the training data (every preset has dropout 0;
    #: every fine-tune starts from the same baseline). The pre-training and the baseline use ``seed`` alone and
    #: are shared.
    seeds: tuple[int, ...] = (0, 1, 2)
    #: the text-merge policies compared (``ReducerSchedule.text_merge_policy``); the default is chosen among them
    #: on the validation split
    policies: tuple[str, ...] = ("real", "pads_first")
    #: seeds of the PuMer + distillation fine-tune (under the chosen policy); () drops it (the default: the
    #: costliest stage, and not needed for the headline)
    distil_seeds: tuple[int, ...] = ()
    #: how the fine-tuning and evaluation batches pad their texts: ``max_length`` pads every text to
    #: ``max_text_len`` (as the official code pads to 40, so ``pads_first`` is per-example deterministic);
    #: ``longest`` pads to the batch's longest text (the data module's default). The cached pre-training and
    #: baseline stages train on ``longest`` batches; with reducers off, padding does not change a model's outputs
    #: (pads are masked out of attention).
    text_padding: str = "max_length"
    #: a type counts as learned when the baseline's validation accuracy on it exceeds chance (0.5) by this many
    #: standard errors
    learned_z: float = 3.0

    @property
    def steps(self) -> Budget:
        return BUDGETS[self.budget]

    def schedule(self, **changes: Any) -> ReducerSchedule:
        return ReducerSchedule(**{**self.reducer, **changes})


def cache_key(*parts: Any) -> str:
    """The 12-character name of a cached stage: a hash of everything that determines it."""
    return content_hash(list(parts), "sha256", 12)


def log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- the paper protocol
#: the experiment files the pre-training and the recipes come from
EXPERIMENTS = Path(pumer_lightning.__file__).resolve().parent.parent / "experiments"


@dataclass(frozen=True)
class Recipe:
    """One task's fine-tuning recipe, as its experiment file has it (chosen there on validation with the reducers
    off; a test checks the two agree): N = ``epochs`` passes over the budget's training texts."""

    experiment: str  #: ``experiments/<experiment>.yaml``
    types: tuple[str, ...]  #: the statement types generated
    epochs: int
    lr: float
    head_mult: float


RECIPES: dict[str, Recipe] = {
    "vqa2": Recipe("shapes_vilt", ("shape", "color"), epochs=4, lr=2e-3, head_mult=1.0),
    "nlvr2": Recipe("shapes_nlvr2_vilt", ("shape", "color", "exist"), epochs=2, lr=2e-4, head_mult=10.0),
}


@dataclass(frozen=True)
class PaperBudget:
    """The sizes of one paper-protocol run."""

    pretrain_epochs: int  #: passes over the pre-training captions (``shapes_pretrain.yaml``: 1 = 1,000 steps)
    pretrain_captions: int  #: pre-training captions (5 per image)
    num_train: int  #: training texts per task (N = recipe epochs x num_train / batch)
    num_val: int
    num_test: int


PAPER_BUDGETS: dict[str, PaperBudget] = {
    # 1 h 48 min measured on 2 CPU cores (budget: 3 hours): pre-training 2,000 steps (the NLVR2 remedy of docs/experiments.md),
    # VQA N = 1,500 and NLVR2 N = 750 steps (the experiment files' recipes), 3 seeds of 4-5 arms per task
    "default": PaperBudget(
        pretrain_epochs=2, pretrain_captions=64000, num_train=24000, num_val=600, num_test=1800
    ),
    # a smoke run of every stage (minutes; the figures mean little)
    "quick": PaperBudget(pretrain_epochs=1, pretrain_captions=1280, num_train=640, num_val=150, num_test=300),
    # the same design at larger scale for a GPU: 4x the texts (so 4N steps), 3x the pre-training, a larger test
    "gpu": PaperBudget(
        pretrain_epochs=6, pretrain_captions=64000, num_train=96000, num_val=1500, num_test=6000
    ),
}

LONG_ARM_RULES = ("auto", "always", "never")

#: the arms of the paper protocol, as its report names them
ARM_TEXT = {
    "baseline": "(a) baseline: reducers off",
    "pumer_real": "(b) PuMer on, text-merge policy real",
    "pumer_pads_first": "(b) PuMer on, text-merge policy pads_first",
    "pumer_distil": "(c) PuMer on (chosen policy), distilled from the seed's baseline",
    "pumer_2n": "(d) PuMer on for 2N steps",
}


@dataclass
class PaperConfig(StudyConfig):
    """`StudyConfig` for the paper protocol: the experiment files' model and world (``vilt_mini``, 1-3 objects),
    fixed text padding, and the protocol's own choices. The adaptation protocol's learning rates (``lr``,
    ``baseline_lr``, ``finetune_lr``) are not read: each task's `Recipe` says how it fine-tunes."""

    preset: str = "vilt_mini"
    max_objects: int = 3
    #: ``auto``: the 2N arm runs when neither PuMer arm is within 1 point of the baseline on validation
    long_arm: str = "auto"
    #: pre-training data-loader workers (the child process's ``--data.num_workers``)
    pretrain_workers: int = 1

    def __post_init__(self) -> None:
        if self.budget not in PAPER_BUDGETS:
            raise ValueError(
                f"--budget {self.budget!r}: the paper protocol has budgets {sorted(PAPER_BUDGETS)}"
            )
        if self.task not in RECIPES:
            raise ValueError(f"--task {self.task!r}: the paper protocol runs {sorted(RECIPES)}")
        if self.long_arm not in LONG_ARM_RULES:
            raise ValueError(f"--long-arm {self.long_arm!r}: expected one of {', '.join(LONG_ARM_RULES)}")
        if len(self.seeds) < 1:
            raise ValueError("the paper protocol needs at least one seed (3 for its targets)")

    @property
    def paper(self) -> PaperBudget:
        return PAPER_BUDGETS[self.budget]

    @property
    def recipe(self) -> Recipe:
        return RECIPES[self.task]

    @property
    def n_steps(self) -> int:
        """N: the recipe's epochs over the budget's training texts."""
        return self.recipe.epochs * math.ceil(self.paper.num_train / self.batch_size)
