"""The study's training machinery, shared by both protocols: a `Stage` cached under a hash of what determines it
(`Study.train`, so that a second run only re-evaluates), the `Study` (data, trainers, model loading) and the `Arms`
(stages that differ in their reducer, each trained once per seed)."""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch

from pumer_lightning.lab.context import to_device, train_precision
from pumer_lightning.lab.score import Scorer
from pumer_lightning.models.checkpoint import load_task_weights
from pumer_lightning.reduce import ReducerSchedule, ablation

from .config import EXPERIMENTS, TYPES, PaperConfig, StudyConfig, cache_key, log

if TYPE_CHECKING:
    from pumer_lightning.tasks.pretrain import Pretrained


@dataclass
class Stage:
    """One training run: its name, task, starting point, reducer, steps and learning rate.

    ``start``: a pre-trained backbone (converted format) or None (random initialisation); ``init_state``: a
    Lightning checkpoint of the same task to continue from; ``distill``: the teacher's Lightning checkpoint;
    ``seed``: the stage's seed (default ``StudyConfig.seed``); ``padding``: how its batches pad their texts.
    """

    name: str
    kind: str
    start: Path | None
    schedule: ReducerSchedule | None
    steps: int
    lr: float
    init_state: Path | None = None
    distill: Path | None = None
    seed: int | None = None
    padding: str = "longest"
    #: the new head's learning-rate multiplier; None: 10 on a pre-trained backbone, 1 from scratch (`Study.task`)
    head_mult: float | None = None
    #: what else determines the stage and its paths do not say (the paper protocol: the pre-trained start's
    #: ``made_by`` key, whose export directory keeps its name when it is remade)
    extra_key: dict[str, Any] = field(default_factory=dict)

    def key(self, cfg: StudyConfig) -> str:
        """The cache key. With the defaults (``seed`` None or ``cfg.seed``, ``longest``, no ``head_mult`` or
        ``extra_key``) it is the one earlier versions used, so the cached pre-training and baseline stay valid;
        the start / init_state paths carry their own hashes."""
        sched = dataclasses.asdict(self.schedule) if self.schedule is not None else None
        seed = cfg.seed if self.seed is None else self.seed
        parts: list[Any] = [self.name, str(self.start), str(self.init_state), str(self.distill), sched]
        parts += [self.steps, self.lr, seed, cfg.batch_size]
        if self.padding != "longest":
            parts.append({"padding": self.padding, "max_text_len": cfg.max_text_len})
        if self.head_mult is not None or self.extra_key:
            parts.append({"head_mult": self.head_mult, **self.extra_key})
        return cache_key(*parts)


class Study:
    """The stages of one study: data, cached training runs and model loading (``work`` holds them all)."""

    def __init__(self, cfg: StudyConfig, work: Path, fresh: bool, device: str | torch.device, workers: int):
        self.cfg, self.work, self.fresh, self.workers = cfg, work, fresh, workers
        self.device = torch.device(device)
        self.cache = work / "cache"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}
        self.cached_timings: dict[str, float | None] = {}
        #: the one evaluation trainer (float32: the figures do not depend on the device's autocast)
        self.scorer = Scorer(self.device)

    # ---- data
    def world(self, tasks: list[str], types: tuple[str, ...], sizes: Any, name: str | None = None) -> Path:
        """The shapes world of ``tasks`` and statement ``types`` at ``sizes`` (``num_train``, ``num_val``,
        ``num_test``), generated once under ``<work>/<name>`` (default ``shapes-<task>-<hash of its settings>``).
        Sets ``root``."""
        from pumer_lightning.cli import ShapesData

        c = self.cfg
        shapes = ShapesData(
            root="",
            tasks=tasks,
            num_train=sizes.num_train,
            num_val=sizes.num_val,
            num_test=sizes.num_test,
            image_size=c.image_size,
            patch_size=c.patch_size,
            min_objects=c.min_objects,
            max_objects=c.max_objects,
            types=list(types),
            seed=c.seed,
        )
        name = name or f"shapes-{tasks[0]}-{cache_key(dataclasses.asdict(shapes))}"
        shapes.root = str(self.work / name)
        self.root = shapes.ensure()
        return self.root

    def datamodule(self, task: str, seed: int | None = None, padding: str = "longest"):
        """The task's data module; ``padding="max_length"`` pads every text to ``max_text_len``."""
        from pumer_lightning.cli import backbone_image_settings
        from pumer_lightning.data import VLDataModule

        img = backbone_image_settings(self.cfg.preset)
        # finished stages leave loader iterators in reference cycles; collect them here, in this process, before
        # new worker processes fork (a child that inherits one tries to shut down workers it does not own)
        gc.collect()
        dm = VLDataModule(
            task=task,
            data_dir=str(self.root / task),
            tokenizer=str(self.root / "tokenizer"),
            max_text_len=self.cfg.max_text_len,
            text_padding=padding,
            image_size=img["image_size"],
            image_mean=img["mean"],
            image_std=img["std"],
            resize=img["resize"],
            batch_size=self.cfg.batch_size,
            eval_batch_size=300,
            num_workers=self.workers,
            randaugment=False,
            seed=self.cfg.seed if seed is None else seed,
            persistent_workers=self.workers > 0,
        )
        dm.setup(None)
        return dm

    def eval_batches(self, dm: Any, split: str) -> list[dict[str, Any]]:
        """Every evaluation batch of ``split``, on the study's device (read once, scored many times)."""
        return [to_device(x, self.device) for x in dm.eval_dataloader(split)]

    def task(
        self,
        kind: str,
        schedule: ReducerSchedule | None,
        checkpoint: str | None,
        lr: float,
        head_mult: float | None = None,
        **kw: Any,
    ):
        """A task module. By default, on a pre-trained backbone (``checkpoint``) the head learns 10x faster, as in
        PuMer's recipe for a new head; the fine-tunes that continue from the baseline keep the rule although their
        head is trained (a one-off check with their head at 1x did not help: docs/study.md)."""
        from pumer_lightning.tasks import BackboneSpec, NLVR2Task, OptimConfig, VQATask

        spec = BackboneSpec(self.cfg.preset, checkpoint=checkpoint, tokenizer=str(self.root / "tokenizer"))
        if head_mult is None:
            head_mult = 1.0 if checkpoint is None else 10.0
        optim = OptimConfig(lr=lr, lr_mult_head=head_mult, weight_decay=0.01, warmup_ratio=0.1)
        reducer = schedule or ReducerSchedule()
        if kind == "vqa2":
            from pumer_lightning.data.shapes import VQA_ANSWERS

            return VQATask(backbone=spec, reducer=reducer, optim=optim, num_answers=len(VQA_ANSWERS), **kw)
        return NLVR2Task(backbone=spec, reducer=reducer, optim=optim, **kw)

    def fit(self, name: str, model, dm, steps: int, seed: int | None = None):
        from lightning.pytorch.loggers import TensorBoardLogger

        from pumer_lightning.callbacks import TokenStatsCallback

        pl.seed_everything(self.cfg.seed if seed is None else seed, workers=True, verbose=False)
        trainer = pl.Trainer(
            accelerator=self.device.type,
            devices=1,
            max_steps=steps,
            max_epochs=-1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            enable_checkpointing=False,
            enable_model_summary=False,
            logger=TensorBoardLogger(str(self.work / "runs"), name=name, default_hp_metric=False),
            callbacks=[TokenStatsCallback()],
            log_every_n_steps=50,
            precision=train_precision(self.device),
        )
        t0 = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        self.timings[name] = time.perf_counter() - t0
        log(f"{name}: {steps} steps in {self.timings[name] / 60:.1f} min")
        return trainer

    # ---- stages
    def train(self, stage: Stage, path: Path | None = None) -> Path:
        """Train ``stage`` and save its Lightning checkpoint at ``path`` (default: cached under `Stage.key`);
        a cached stage is not trained again (unless ``--fresh``)."""
        from pumer_lightning.tasks import DistillConfig

        c, s = self.cfg, stage
        seed = c.seed if s.seed is None else s.seed
        path = path or self.cache / f"{s.name}-{s.key(c)}.ckpt"
        label = s.name if seed == c.seed else f"{s.name}@seed{seed}"
        if path.exists() and not self.fresh:
            log(f"{label}: from cache {path}")
            self.cached_timings[label] = train_seconds(path)
            return path
        dm = self.datamodule(s.kind, seed=seed, padding=s.padding)
        kw = {"distill": DistillConfig(teacher=str(s.distill))} if s.distill is not None else {}
        # seed before the model exists: its random initialisation (a new head, or everything from scratch) must
        # not depend on what ran earlier in the process (torch's initial seed differs from process to process)
        pl.seed_everything(seed, workers=True, verbose=False)
        model = self.task(s.kind, s.schedule, str(s.start) if s.start else None, s.lr, s.head_mult, **kw)
        if s.init_state is not None:
            self._load_into(model, s.init_state)
        origin = "random init" if s.start is None and s.init_state is None else "trained weights"
        distilled = ", distilled from the baseline" if s.distill else ""
        log(
            f"{s.name}: {s.steps} {s.kind} steps from {origin}, lr {s.lr:g}, seed {seed}, "
            f"reducer {s.schedule or ReducerSchedule()}{distilled}"
        )
        trainer = self.fit(label, model, dm, s.steps, seed=seed)
        trainer.save_checkpoint(str(path), weights_only=True)
        path.with_suffix(".json").write_text(
            json.dumps({"train_seconds": self.timings[label], "steps": s.steps})
        )
        return path

    def _load_into(self, model, ckpt: Path) -> None:
        """The task weights of a stage's checkpoint (`load_task_weights`: architecture checked, strict)."""
        load_task_weights(model, ckpt, what=f"study checkpoint {ckpt}", model=f"preset {self.cfg.preset!r}")

    def load(self, ckpt: Path, start: Path | None, kind: str):
        """A trained stage's task module, in evaluation mode on the study's device."""
        model = self.task(kind, None, str(start) if start else None, self.cfg.finetune_lr)
        self._load_into(model, ckpt)
        return model.to(self.device).eval()


def train_seconds(path: Path) -> float | None:
    """The training time a stage took when it was trained (kept beside its checkpoint); None when not recorded."""
    try:
        return float(json.loads(path.with_suffix(".json").read_text())["train_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass
class Arms:
    """Training stages that differ in their reducer, each trained once per seed: ``template`` holds what they
    share (task, start, learning rate, padding, ...; its ``name`` prefixes theirs), and per arm its reducer, steps,
    distillation, seeds and checkpoints (one per seed, in seed order)."""

    template: Stage
    schedules: dict[str, ReducerSchedule | None] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    distilled: dict[str, bool] = field(default_factory=dict)
    seeds: dict[str, list[int]] = field(default_factory=dict)
    checkpoints: dict[str, list[Path]] = field(default_factory=dict)

    @property
    def start(self) -> Path | None:
        """The pre-trained backbone every arm builds on (None: the task model trained from scratch)."""
        return self.template.start

    def stage(self, name: str, seed: int, teacher: Path | None = None) -> Stage:
        """Arm ``name`` of seed ``seed`` (``teacher``: the Lightning checkpoint it is distilled from)."""
        t = self.template
        return dataclasses.replace(
            t,
            name=t.name + name,
            schedule=self.schedules[name],
            steps=self.steps[name],
            seed=seed,
            distill=teacher,
        )

    def train(
        self,
        st: Study,
        schedules: dict[str, ReducerSchedule | None],
        steps: int,
        seeds: tuple[int, ...] | None = None,
        teachers: list[Path] | None = None,
    ) -> None:
        """Train (or find in the cache) an arm per reducer of ``schedules`` for ``steps`` steps, once per seed
        (default ``StudyConfig.seeds``), seed-major: an interrupted run leaves whole seeds in the cache.
        ``teachers``: each seed's distillation teacher."""
        seeds = list(st.cfg.seeds if seeds is None else seeds)
        for name, sched in schedules.items():
            self.schedules[name], self.steps[name], self.seeds[name] = sched, steps, seeds
            self.distilled[name], self.checkpoints[name] = teachers is not None, []
        for i, seed in enumerate(seeds):
            teacher = None if teachers is None else teachers[i]
            for name in schedules:
                self.checkpoints[name].append(st.train(self.stage(name, seed, teacher)))


# ---------------------------------------------------------------------------------------------- the adaptation
@dataclass
class Trained:
    """The adaptation protocol's trained models: the baseline and the fine-tunes that continue from it."""

    baseline: Path  #: the baseline's Lightning checkpoint
    pretrain_val_score: float  #: the pre-training's shapes VQA validation score
    #: the fine-tunes from the baseline (``arms.start``: the pre-trained backbone the NLVR2 stages build on; None
    #: for VQA, whose baseline is trained from scratch)
    arms: Arms


def adaptation_world(st: Study) -> Path:
    """Shapes VQA (pre-training) and shapes NLVR2, every statement type, under ``<work>/shapes-<num_train>``."""
    return st.world(["vqa2", "nlvr2"], TYPES, st.cfg.steps, name=f"shapes-{st.cfg.steps.num_train}")


def pretrain(st: Study, need_ckpt: bool) -> tuple[Path | None, Path, float]:
    """Shapes VQA trained from scratch: its Lightning checkpoint (None when cached without it and not needed), its
    backbone exported in the converted-checkpoint format (the NLVR2 task loads it as it would load real
    pre-trained weights), and its validation VQA score."""
    from pumer_lightning.models import read_checkpoint, save_checkpoint

    c, b = st.cfg, st.cfg.steps
    key = cache_key(c.preset, c.seed, c.batch_size, c.lr, b.pretrain_steps, str(st.root))
    pt = st.cache / f"pretrain-{key}.pt"
    ckpt = pt.with_suffix(".ckpt")
    if pt.exists() and not st.fresh and (ckpt.exists() or not need_ckpt):
        log(f"pre-trained backbone from cache: {pt}")
        st.cached_timings["pretrain"] = train_seconds(ckpt)
        return (ckpt if ckpt.exists() else None), pt, float(read_checkpoint(pt).config["vqa_val_score"])
    ckpt = st.train(Stage("pretrain", "vqa2", None, None, b.pretrain_steps, c.lr), path=ckpt)
    model = st.load(ckpt, None, "vqa2")
    dm = st.datamodule("vqa2")
    scores = st.scorer.score(model, dm, dm.val_split, st.eval_batches(dm, dm.val_split), None).scores
    score = sum(scores) / len(scores)
    log(f"pre-training: shapes VQA validation score {score:.3f}")
    save_checkpoint(pt, model.backbone.cpu(), preset=c.preset, extra={"vqa_val_score": score})
    return ckpt, pt, score


def finetune_schedules(cfg: StudyConfig) -> dict[str, ReducerSchedule | None]:
    """The fine-tunes from the baseline: the matched control (reducers off), PuMer under each text-merge policy
    and PuMer without text merging (their schedules feed the checkpoints' cache keys)."""
    out: dict[str, ReducerSchedule | None] = {"ft_control": None}
    out.update({f"ft_pumer_{p}": cfg.schedule(text_merge_policy=p) for p in cfg.policies})
    out["ft_pumer_no_text"] = ablation(cfg.schedule(), "no_text_merge")
    return out


def finetunes(cfg: StudyConfig, start: Path | None, baseline: Path) -> Arms:
    """The fine-tunes' arms (none trained yet): each continues from the ``baseline`` checkpoint."""
    template = Stage(
        "", cfg.task, start, None, 0, cfg.finetune_lr, init_state=baseline, padding=cfg.text_padding
    )
    return Arms(template)


def train_stages(st: Study) -> Trained:
    """Data, pre-training, baseline and the fine-tunes of every seed (each from its cache when it has one)."""
    cfg, b, kind = st.cfg, st.cfg.steps, st.cfg.task
    adaptation_world(st)
    pre_ckpt, pre_backbone, pre_val = pretrain(st, need_ckpt=kind == "vqa2")
    if kind == "nlvr2":
        start: Path | None = pre_backbone
        base_ckpt = st.train(Stage("baseline", kind, start, None, b.baseline_steps, cfg.baseline_lr))
    else:  # the VQA model trained from scratch is the baseline itself
        assert pre_ckpt is not None  # need_ckpt
        start, base_ckpt = None, pre_ckpt
    arms = finetunes(cfg, start, base_ckpt)
    arms.train(st, finetune_schedules(cfg), b.finetune_steps)
    return Trained(base_ckpt, pre_val, arms)


def train_distilled(st: Study, trained: Trained, pumer: ReducerSchedule) -> None:
    """PuMer + distillation from the baseline under the chosen policy (arm ``ft_pumer_distil``), one per
    ``distil_seeds`` seed."""
    seeds = st.cfg.distil_seeds
    teachers = [trained.baseline] * len(seeds)
    trained.arms.train(st, {"ft_pumer_distil": pumer}, st.cfg.steps.finetune_steps, seeds, teachers)


# ---------------------------------------------------------------------------------------------- the paper protocol
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


def pretrained_start(st: Study, fresh: bool, make: bool = True) -> Pretrained:
    """The pre-trained start, made once by the ordinary pre-training command and cached (`ensure_pretrained`):
    ``<work>/pretrained/<budget>``. ``fresh`` remakes it; ``make=False`` stops unless it is cached."""
    from pumer_lightning.tasks.pretrain import MADE_BY, ensure_pretrained, shown

    cfg = st.cfg
    out = st.work / "pretrained" / cfg.budget
    if fresh:
        (out / MADE_BY).unlink(missing_ok=True)
    files = [shown(EXPERIMENTS / "base.yaml"), shown(EXPERIMENTS / "shapes_pretrain.yaml")]
    made = ensure_pretrained(files, out, pretrain_overrides(cfg, st.work, str(st.device)), make=make)
    label = "made" if made.made_now else "from cache"
    log(f"pre-trained start {label}: {made.path} ({made.figures})")
    return made


def train_first_arms(st: Study, start: Pretrained) -> Arms:
    """The baseline and PuMer under every text-merge policy, from the pre-trained ``start`` with the task's
    recipe, N steps each (the other arms are trained as validation asks for them: `Arms.train`). Every arm's cache
    key includes the start's ``made_by`` key, so a remade start retrains them."""
    cfg, r = st.cfg, st.cfg.recipe
    template = Stage(
        f"paper-{cfg.task}-",
        cfg.task,
        start.path,
        None,
        0,
        r.lr,
        padding=cfg.text_padding,
        head_mult=r.head_mult,
        extra_key={"start": start.key},
    )
    arms = Arms(template)
    pumer = {f"pumer_{p}": cfg.schedule(text_merge_policy=p) for p in cfg.policies}
    arms.train(st, {"baseline": None, **pumer}, cfg.n_steps)
    return arms
