"""The paper protocol's configuration and training stages (docs/study.md#paper-protocol-the-headline).

PuMer's accuracy claim is about a recipe: both the baseline and PuMer fine-tune the same **pre-trained** checkpoint,
one with the reducers off, one with them on. Here, per task and per seed, from the pre-trained shapes checkpoint
(ViLT's ITM + MLM over captions, no task labels; `pumer_lightning.tasks.pretrain.ensure_pretrained`, cached by
its ``made_by.json``):

* ``baseline``: reducers off, N steps (the task's recipe, `RECIPES`);
* ``pumer_<policy>``: the PuMer schedule on, N steps, once per text-merge policy (the policy is chosen on
  validation);
* ``pumer_distil``: PuMer (chosen policy) distilled from the same seed's baseline, N steps;
* ``pumer_2n``: the better of the last two on validation, for 2N steps, when neither is within 1 point of the
  baseline on validation (`PaperConfig.long_arm`).

Every stage is a `pumer_lightning.study.train.Stage` cached under its key (the pre-trained start's key included),
so a run stopped part-way resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import pumer_lightning
from pumer_lightning.reduce import ReducerSchedule

from .config import StudyConfig, cache_key, log
from .train import Stage, Study

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
    # about 3 hours on 2 quiet CPU cores: pre-training 2,000 steps (the NLVR2 remedy of docs/experiments.md),
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


# ---------------------------------------------------------------------------------------------- stages
def task_world(st: Study) -> Path:
    """The task's shapes world as its experiment file has it (one task, its types, 1-3 objects), at the budget's
    sizes; generated once under ``<work>/shapes-<task>-<hash>``. Sets ``st.root``."""
    from pumer_lightning.cli import ShapesData

    c, b = st.cfg, st.cfg.paper
    world = ShapesData(
        root="",
        tasks=[c.task],
        num_train=b.num_train,
        num_val=b.num_val,
        num_test=b.num_test,
        image_size=c.image_size,
        patch_size=c.patch_size,
        min_objects=c.min_objects,
        max_objects=c.max_objects,
        types=list(c.recipe.types),
        seed=c.seed,
    )
    world.root = str(st.work / f"shapes-{c.task}-{cache_key(dataclasses.asdict(world))}")
    st.root = world.ensure()
    return st.root


def pretrain_overrides(cfg: PaperConfig, work: Path, device: str) -> list[str]:
    """The overrides of ``experiments/shapes_pretrain.yaml`` for this budget (its captions world and runs under
    ``work``)."""
    b = cfg.paper
    out = [
        f"--shapes.root={work}/captions-{cfg.budget}",
        f"--shapes.num_train={b.pretrain_captions}",
        f"--shapes.num_val={min(500, b.num_val)}",
        f"--shapes.num_test={min(500, b.num_val)}",
        f"--shapes.seed={cfg.seed}",
        f"--trainer.max_epochs={b.pretrain_epochs}",
        f"--trainer.accelerator={'gpu' if device.startswith('cuda') else 'cpu'}",
        f"--trainer.default_root_dir={work}/runs",
        f"--trainer.logger.init_args.save_dir={work}/runs",
        f"--data.num_workers={cfg.pretrain_workers}",
        f"--seed_everything={cfg.seed}",
    ]
    if cfg.preset != "vilt_mini":  # the experiment file's preset
        out.append(f"--model.init_args.backbone.preset={cfg.preset}")
    return out


def pretrained_start(st: Study, fresh: bool):
    """The pre-trained start, made once by the ordinary pre-training command and cached (`ensure_pretrained`):
    ``<work>/pretrained/<budget>``. ``fresh`` remakes it."""
    from pumer_lightning.tasks.pretrain import MADE_BY, ensure_pretrained, shown

    cfg = st.cfg
    out = st.work / "pretrained" / cfg.budget
    if fresh:
        (out / MADE_BY).unlink(missing_ok=True)
    files = [shown(EXPERIMENTS / "base.yaml"), shown(EXPERIMENTS / "shapes_pretrain.yaml")]
    made = ensure_pretrained(files, out, pretrain_overrides(cfg, st.work, str(st.device)))
    label = "made" if made.made_now else "from cache"
    log(f"pre-trained start {label}: {made.path} ({made.figures})")
    return made


@dataclass
class Arms:
    """The trained arms of one task: per arm its reducer, steps and checkpoint per seed (``cfg.seeds`` order)."""

    start: Path  #: the pre-trained backbone every arm starts from
    start_key: str  #: its ``made_by`` key
    schedules: dict[str, ReducerSchedule | None] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    distilled: dict[str, bool] = field(default_factory=dict)
    checkpoints: dict[str, list[Path]] = field(default_factory=dict)

    @property
    def baselines(self) -> list[Path]:
        return self.checkpoints["baseline"]


def arm_stage(cfg: PaperConfig, arms: Arms, name: str, seed: int, teacher: Path | None = None) -> Stage:
    """Arm ``name`` of seed ``seed``: from the pre-trained start, the task's recipe, its reducer and steps."""
    r = cfg.recipe
    return Stage(
        f"paper-{cfg.task}-{name}",
        cfg.task,
        arms.start,
        arms.schedules[name],
        arms.steps[name],
        r.lr,
        distill=teacher,
        seed=seed,
        padding=cfg.text_padding,
        head_mult=r.head_mult,
        extra_key={"start": arms.start_key},
    )


def train_arm(
    st: Study, arms: Arms, name: str, schedule: ReducerSchedule | None, steps: int, distil: bool = False
) -> list[Path]:
    """Train (or find in the cache) arm ``name`` for every seed; ``distil``: from that seed's baseline."""
    arms.schedules[name], arms.steps[name], arms.distilled[name] = schedule, steps, distil
    paths = []
    for i, seed in enumerate(st.cfg.seeds):
        teacher = arms.baselines[i] if distil else None
        paths.append(st.train(arm_stage(st.cfg, arms, name, seed, teacher)))
    arms.checkpoints[name] = paths
    return paths


def train_first_arms(st: Study, start: Path, start_key: str) -> Arms:
    """The baseline and PuMer under every text-merge policy, seed-major (an interrupted run leaves whole seeds
    in the cache)."""
    cfg, arms = st.cfg, Arms(start, start_key)
    n = cfg.n_steps
    first = {"baseline": None, **{f"pumer_{p}": cfg.schedule(text_merge_policy=p) for p in cfg.policies}}
    for name, sched in first.items():
        arms.schedules[name], arms.steps[name], arms.distilled[name] = sched, n, False
        arms.checkpoints[name] = []
    for seed in cfg.seeds:
        for name in first:
            arms.checkpoints[name].append(st.train(arm_stage(cfg, arms, name, seed)))
    return arms
