"""``make study``: does PuMer keep accuracy? A controlled accuracy-vs-speed study on the shapes world.

    python -m pumer_lightning.study [--budget default|quick|gpu] [--fresh] [--out results/study]

Everything is generated and trained here, from nothing, on the synthetic shapes world (``pumer_lightning.data.shapes``):

1. **Data**: shapes VQA (pre-training) and shapes NLVR2 (the study task: a true/false statement about an image
   pair, e.g. "the left image contains a red circle"), statement types ``shape``, ``color``, ``exist``.
2. **Pre-training** (cached): a small ViLT (``vilt_small``) learns shapes VQA, the stand-in for the
   vision-language pre-training every PuMer model starts from. Trained from scratch on the NLVR2 statements a
   model of this size stays at chance for thousands of steps (measured: 6000 steps at three learning rates, see
   docs/study.md#design), because a balanced true/false label is a pure text-image interaction with no first-order signal.
3. **Baseline** (cached): the unreduced model fine-tuned on NLVR2 from the pre-trained weights.
4. **Training-free**: the baseline's weights evaluated with reducers switched on: PuMer, its parts, random and
   image-CLS pruning at the same token budget (the ablations of `pumer_lightning.reduce.ABLATIONS`, built with
   `ablation`), a keep-ratio sweep, and the pruning control by placement (text-informed against random pruning
   with the reducer at one block only, ``StudyConfig.placement_keep``).
5. **Fine-tuning from the baseline for the same number of steps, once per seed** (``StudyConfig.seeds``): with
   the reducers off (the matched control), with the PuMer reducer on under each text-merge policy
   (``StudyConfig.policies``) and without text merging; optionally (``distil_seeds``) with the reducer on plus
   distillation from the baseline. The default policy is chosen on the validation split. Fine-tuning and
   evaluation batches pad every text to ``max_text_len`` (``text_padding``), as the official code does.
6. **Report**: test accuracy per statement type, accuracy on the types the baseline learned (decided on the
   validation split, before looking at test), paired differences, all as means over seeds with standard errors
   that include the seed-to-seed spread (`over_seeds`, `paired_over_seeds`), the documented targets met or
   missed, FLOPs per example and measured throughput for every setting, and a loss check (`loss_check`: the
   validation loss each fine-tune minimised, beside its score); ``<out>/shapes.json``, ``shapes.md`` and
   ``shapes.png`` (accuracy vs FLOPs).

`run_study` drives named stages, each passing its results to the next: `train_stages` (1-3 and the fine-tunes
of 5), then `evaluate` (`eval_data`, `learned_types`, `evaluate_finetuned`, `choose_policy`, `train_distilled`,
`free_settings` and `evaluate_free`, `finetuned_settings`, `time_settings`, `comparisons`, `loss_check`,
`_targets`), then
`study_record` and `write_report`.

Checkpoints and data live under ``--work`` (default ``data/study``, git-ignored); a stage whose inputs did not
change is loaded from its cache, so a second run only re-evaluates. ``--fresh`` retrains everything.
"""

from __future__ import annotations

import pumer_lightning.env  # noqa: F401  (first: passive OpenMP threads and offline hubs, before torch loads)

# isort: split
import argparse
import dataclasses
import gc
import hashlib
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from pumer_lightning.measure import count_flops, interleaved_times, median_rates
from pumer_lightning.reduce import ABLATIONS, ReducerSchedule, ablation

TYPES: tuple[str, ...] = ("shape", "color", "exist")
TASK_TEXT = {
    "nlvr2": "shapes NLVR2 (an image pair and one true/false statement about it)",
    "vqa2": "shapes VQA (one image, a question, ten simulated annotator answers)",
}


# ---------------------------------------------------------------------------------------------- configuration
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
        pretrain_steps=60, baseline_steps=60, finetune_steps=20, num_train=2000, num_val=150, num_test=300
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
    #: seeds of the fine-tuning stages (data order, dropout; every one starts from the same baseline). The
    #: pre-training and the baseline use ``seed`` alone and are shared.
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


def _key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- building blocks
class Study:
    """The stages of one study: data, cached training runs and model loading (``work`` holds them all)."""

    def __init__(self, cfg: StudyConfig, work: Path, fresh: bool, device: str, workers: int) -> None:
        self.cfg, self.work, self.fresh, self.workers = cfg, work, fresh, workers
        self.device = torch.device(device)
        self.cache = work / "cache"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}
        self.cached_timings: dict[str, float | None] = {}

    # ---- data
    def data(self) -> Path:
        from pumer_lightning.cli import ShapesData

        b, c = self.cfg.steps, self.cfg
        root = self.work / f"shapes-{b.num_train}"
        ShapesData(
            root=str(root), tasks=["vqa2", "nlvr2"], num_train=b.num_train, num_val=b.num_val, num_test=b.num_test,
            image_size=c.image_size, patch_size=c.patch_size, min_objects=c.min_objects,
            max_objects=c.max_objects, types=list(TYPES), seed=c.seed,
        ).ensure()  # fmt: skip
        self.root = root
        return root

    def datamodule(self, task: str, seed: int | None = None, padding: str = "longest"):
        """The task's data module; ``padding="max_length"`` pads every text to ``max_text_len``."""
        from pumer_lightning.cli import backbone_image_settings
        from pumer_lightning.data import VLDataModule

        img = backbone_image_settings(self.cfg.preset)
        # finished stages leave loader iterators in reference cycles; collect them here, in this process, before
        # new worker processes fork (a child that inherits one tries to shut down workers it does not own)
        gc.collect()
        dm = VLDataModule(
            task=task, data_dir=str(self.root / task), tokenizer=str(self.root / "tokenizer"),
            max_text_len=self.cfg.max_text_len, text_padding=padding, image_size=img["image_size"], image_mean=img["mean"],
            image_std=img["std"], resize=img["resize"], batch_size=self.cfg.batch_size, eval_batch_size=300,
            num_workers=self.workers, randaugment=False, seed=self.cfg.seed if seed is None else seed,
            persistent_workers=self.workers > 0,
        )  # fmt: skip
        dm.setup(None)
        return dm

    def task(self, kind: str, schedule: ReducerSchedule | None, checkpoint: str | None, lr: float, **kw: Any):
        """A task module. On a pre-trained backbone (``checkpoint``) the head learns 10x faster, as in PuMer's recipe
        for a new head; the fine-tunes that continue from the baseline keep the rule although their head is
        trained (a one-off check with their head at 1x did not help: docs/study.md)."""
        from pumer_lightning.tasks import BackboneSpec, NLVR2Task, OptimConfig, VQATask

        spec = BackboneSpec(self.cfg.preset, checkpoint=checkpoint, tokenizer=str(self.root / "tokenizer"))
        optim = OptimConfig(
            lr=lr, lr_mult_head=1.0 if checkpoint is None else 10.0, weight_decay=0.01, warmup_ratio=0.1
        )
        if kind == "vqa2":
            from pumer_lightning.data.shapes import VQA_ANSWERS

            return VQATask(
                backbone=spec,
                reducer=schedule or ReducerSchedule(),
                optim=optim,
                num_answers=len(VQA_ANSWERS),
                **kw,
            )
        return NLVR2Task(backbone=spec, reducer=schedule or ReducerSchedule(), optim=optim, **kw)

    def fit(self, name: str, model, dm, steps: int, seed: int | None = None):
        from lightning.pytorch.loggers import TensorBoardLogger

        from pumer_lightning.callbacks import TokenStatsCallback

        pl.seed_everything(self.cfg.seed if seed is None else seed, workers=True, verbose=False)
        trainer = pl.Trainer(
            accelerator=self.device.type, devices=1, max_steps=steps, max_epochs=-1, limit_val_batches=0,
            num_sanity_val_steps=0, enable_checkpointing=False, enable_model_summary=False,
            logger=TensorBoardLogger(str(self.work / "runs"), name=name, default_hp_metric=False),
            callbacks=[TokenStatsCallback()], log_every_n_steps=50,
            precision="bf16-mixed" if self.device.type == "cuda" else "32-true",
        )  # fmt: skip
        t0 = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        self.timings[name] = time.perf_counter() - t0
        log(f"{name}: {steps} steps in {self.timings[name] / 60:.1f} min")
        return trainer

    # ---- stages
    def train(self, name: str, kind: str, start: Path | None, schedule: ReducerSchedule | None, steps: int,
              lr: float, init_state: Path | None = None, distill: Path | None = None,
              path: Path | None = None, seed: int | None = None, padding: str = "longest") -> Path:  # fmt: skip
        """Train one stage and save its Lightning checkpoint (cached under a hash of what determines it).

        ``start``: a pre-trained backbone (converted format) or None (random initialisation); ``init_state``: a
        Lightning checkpoint of the same task to continue from; ``distill``: the teacher's Lightning checkpoint;
        ``seed``: the stage's seed (default ``cfg.seed``); ``padding``: how its batches pad their texts. The key
        of a stage with the defaults (``seed`` None or ``cfg.seed``, ``longest``) is the one earlier versions
        used, so the cached pre-training and baseline stay valid.
        """
        from pumer_lightning.tasks import DistillConfig

        c = self.cfg
        seed = c.seed if seed is None else seed
        sched = dataclasses.asdict(schedule) if schedule is not None else None
        if path is None:  # start / init_state paths carry their own hashes
            parts: list[Any] = [name, str(start), str(init_state), str(distill), sched, steps, lr, seed,
                                c.batch_size]  # fmt: skip
            if padding != "longest":
                parts.append({"padding": padding, "max_text_len": c.max_text_len})
            path = self.cache / f"{name}-{_key(*parts)}.ckpt"
        label = name if seed == c.seed else f"{name}@seed{seed}"
        if path.exists() and not self.fresh:
            log(f"{label}: from cache {path}")
            self._cached_time(label, path)
            return path
        dm = self.datamodule(kind, seed=seed, padding=padding)
        kw = {"distill": DistillConfig(teacher=str(distill))} if distill is not None else {}
        # seed before the model exists: its random initialisation (a new head, or everything from scratch) must
        # not depend on what ran earlier in the process (torch's initial seed differs from process to process)
        pl.seed_everything(seed, workers=True, verbose=False)
        model = self.task(kind, schedule, str(start) if start else None, lr, **kw)
        if init_state is not None:
            state = torch.load(init_state, map_location="cpu", weights_only=False)["state_dict"]
            model.load_state_dict(
                {k: v for k, v in state.items() if not k.startswith("teacher.")}, strict=False
            )
            missing = [k for k in model.state_dict() if k not in state and not k.startswith("teacher.")]
            if missing:
                raise RuntimeError(f"{init_state} lacks {missing[:5]}")
        origin = "random init" if start is None and init_state is None else "trained weights"
        log(f"{name}: {steps} {kind} steps from {origin}, lr {lr:g}, seed {seed}, "
            f"reducer {schedule or ReducerSchedule()}" + (", distilled from the baseline" if distill else ""))  # fmt: skip
        trainer = self.fit(label, model, dm, steps, seed=seed)
        trainer.save_checkpoint(str(path), weights_only=True)
        path.with_suffix(".json").write_text(
            json.dumps({"train_seconds": self.timings[label], "steps": steps})
        )
        return path

    def _cached_time(self, name: str, path: Path) -> None:
        """The training time a cached stage took when it was trained (kept beside its checkpoint)."""
        try:
            self.cached_timings[name] = json.loads(path.with_suffix(".json").read_text())["train_seconds"]
        except (OSError, ValueError, KeyError):
            self.cached_timings[name] = None

    def pretrained(self, need_ckpt: bool) -> tuple[Path | None, Path, float]:
        """Shapes VQA trained from scratch: its Lightning checkpoint (None when cached without it and not needed),
        its backbone exported in the converted-checkpoint format (the NLVR2 task loads it as it would load real
        pre-trained weights), and its validation VQA score."""
        from pumer_lightning.models import read_checkpoint, save_checkpoint

        c, b = self.cfg, self.cfg.steps
        pt = (
            self.cache
            / f"pretrain-{_key(c.preset, c.seed, c.batch_size, c.lr, b.pretrain_steps, str(self.root))}.pt"
        )
        ckpt = pt.with_suffix(".ckpt")
        if pt.exists() and not self.fresh and (ckpt.exists() or not need_ckpt):
            log(f"pre-trained backbone from cache: {pt}")
            self._cached_time("pretrain", ckpt)
            return (ckpt if ckpt.exists() else None), pt, float(read_checkpoint(pt).config["vqa_val_score"])
        ckpt = self.train("pretrain", "vqa2", None, None, b.pretrain_steps, c.lr, path=ckpt)
        model = self.load(ckpt, None, "vqa2")
        dm = self.datamodule("vqa2")
        scores, _ = predictions(model, [_to(x, self.device) for x in dm.eval_dataloader(dm.val_split)], None)
        score = sum(scores) / len(scores)
        log(f"pre-training: shapes VQA validation score {score:.3f}")
        save_checkpoint(pt, model.backbone.cpu(), preset=c.preset, extra={"vqa_val_score": score})
        return ckpt, pt, score

    def load(self, ckpt: Path, start: Path | None, kind: str):
        model = self.task(kind, None, str(start) if start else None, self.cfg.finetune_lr)
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("teacher.")})
        return model.to(self.device).eval()


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------- evaluation
def example_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each example's training loss: cross-entropy for NLVR2's class ids; for VQA's soft score vectors, binary
    cross-entropy summed over the answers (`VQATask.task_loss` is its mean over a batch)."""
    if labels.dim() == 2:
        bce = torch.nn.functional.binary_cross_entropy_with_logits(
            logits.float(), labels.float(), reduction="none"
        )
        return bce.sum(dim=-1)
    return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")


@torch.inference_mode()
def predictions(model, batches: list[dict[str, Any]], schedule: ReducerSchedule | None, seed: int = 0,
                losses: list[float] | None = None):  # fmt: skip
    """Per-example scores and statement types of ``batches`` under ``schedule``; each example's loss is appended
    to ``losses`` when it is given.

    The score is 1/0 for a right/wrong NLVR2 answer and the VQA score (soft, from ten annotators) of the
    predicted answer for VQA; the mean is accuracy or VQA score.
    """
    torch.manual_seed(seed)  # random pruning draws its scores from the global generator
    scores: list[float] = []
    types: list[str] = []
    with model.backbone.using(schedule):
        for batch in batches:
            logits = model(batch)
            best = logits.argmax(-1)
            labels = batch["labels"]
            hit = labels.gather(1, best[:, None])[:, 0] if labels.dim() == 2 else (best == labels).float()
            scores += hit.float().tolist()
            types += [m["statement_type"] for m in batch["meta"]]
            if losses is not None:
                losses += example_losses(logits, labels).tolist()
    return scores, types


def chance(batches: list[dict[str, Any]], num_classes: int) -> dict[str, float]:
    """Per type, the score of always giving the type's best single answer (0.5 for balanced true/false)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for batch in batches:
        labels = batch["labels"].cpu()
        if labels.dim() == 1:
            labels = torch.nn.functional.one_hot(labels, num_classes).float()
        for row, m in zip(labels, batch["meta"]):
            t = m["statement_type"]
            sums[t] = sums.get(t, 0) + row
            counts[t] = counts.get(t, 0) + 1
    return {t: float((sums[t] / counts[t]).max()) for t in sums}


def accuracy(correct: list[float], types: list[str], only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Mean score with its standard error (sample standard deviation / sqrt(n)), overall, per type and on
    ``only``'s types."""

    def stat(xs: list[float]) -> dict[str, float]:
        n = len(xs)
        if not n:
            return {"acc": float("nan"), "se": float("nan"), "n": 0}
        p = sum(xs) / n
        var = sum((x - p) ** 2 for x in xs) / max(n - 1, 1)
        return {"acc": p, "se": math.sqrt(var / n), "n": n}

    out = {"all": stat(correct), "by_type": {}}
    for t in sorted(set(types)):
        out["by_type"][t] = stat([c for c, ty in zip(correct, types) if ty == t])
    if only is not None:
        out["learned"] = stat([c for c, ty in zip(correct, types) if ty in only])
    return out


def paired(a: list[float], b: list[float], types: list[str], only: tuple[str, ...]) -> dict[str, float]:
    """Accuracy difference a - b on the same examples (restricted to ``only``) with its paired standard error."""
    pairs = [(x, y) for x, y, t in zip(a, b, types) if t in only]
    n = len(pairs)
    d = [x - y for x, y in pairs]
    mean = sum(d) / n
    var = sum((v - mean) ** 2 for v in d) / max(n - 1, 1)
    return {"diff": mean, "se": math.sqrt(var / n), "n": n}


def _between(values: list[float]) -> float:
    """Standard error of the mean of per-seed values (sample sd / sqrt(S)); 0 for a single seed."""
    k = len(values)
    return statistics.stdev(values) / math.sqrt(k) if k > 1 else 0.0


def over_seeds(
    per_seed: list[list[float]], types: list[str], only: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """`accuracy` of a setting trained with several seeds (one score list per seed, same test examples).

    The figure is the mean over seeds. Its standard error combines the two sources of uncertainty:

        se = sqrt(se_seeds**2 + se_sample**2)
        se_seeds  = sd over seeds of the per-seed accuracies / sqrt(S)       (training noise: seed-to-seed spread)
        se_sample = sd over examples of the seed-averaged score / sqrt(n)    (test-sample noise)

    The seed term also carries part of the sampling noise, so the sum is conservative. With one seed it is
    `accuracy`'s standard error exactly.
    """
    mean = [sum(xs) / len(per_seed) for xs in zip(*per_seed)]
    out = accuracy(mean, types, only)
    groups = {"all": lambda t: True, **{t: (lambda t, u=t: t == u) for t in sorted(set(types))}}
    if only is not None:
        groups["learned"] = lambda t: t in only
    for name, keep in groups.items():
        stat = out[name] if name in ("all", "learned") else out["by_type"][name]
        accs = []
        for xs in per_seed:
            sel = [x for x, t in zip(xs, types) if keep(t)]
            accs.append(sum(sel) / len(sel) if sel else float("nan"))
        stat["se_sample"] = stat["se"]
        stat["se_seeds"] = _between(accs)
        stat["se"] = math.sqrt(stat["se_sample"] ** 2 + stat["se_seeds"] ** 2)
        stat["per_seed"] = accs
    return out


def paired_over_seeds(a: list[list[float]], b: list[list[float]], types: list[str],
                      only: tuple[str, ...]) -> dict[str, Any]:  # fmt: skip
    """Mean over seeds of the paired difference a - b (seed s of ``a`` against seed s of ``b``, same examples).

    ``se = sqrt(se_seeds**2 + se_sample**2)``: ``se_seeds`` is the sd over seeds of the per-seed paired
    differences / sqrt(S); ``se_sample`` is the paired standard error over examples of the seed-averaged
    per-example difference. One seed (or ``b`` a single model repeated): `paired`'s standard error when S = 1.
    """
    if len(b) == 1 and len(a) > 1:
        b = b * len(a)
    if len(a) == 1 and len(b) > 1:
        a = a * len(b)
    per = [paired(x, y, types, only)["diff"] for x, y in zip(a, b)]
    mean_a = [sum(xs) / len(a) for xs in zip(*a)]
    mean_b = [sum(ys) / len(b) for ys in zip(*b)]
    out = paired(mean_a, mean_b, types, only)
    out["se_sample"] = out["se"]
    out["se_seeds"] = _between(per)
    out["se"] = math.sqrt(out["se_sample"] ** 2 + out["se_seeds"] ** 2)
    out["per_seed"] = per
    out["seeds"] = len(per)
    return out


@torch.inference_mode()
def speed(model, batches: list[dict[str, Any]], settings: dict[str, ReducerSchedule | None], rounds: int = 5):
    """FLOPs per example and examples/s of each setting: same weights, same batches, interleaved rounds, median."""
    device = next(model.parameters()).device
    examples = sum(int(b["labels"].shape[0]) for b in batches)
    first = int(batches[0]["labels"].shape[0])
    n_image, n_text = model.backbone.num_image_tokens, int(batches[0]["input_ids"].shape[1])
    out: dict[str, dict[str, Any]] = {}
    for name, sched in settings.items():
        with model.backbone.using(sched):
            flops = count_flops(lambda: model(batches[0])) / first
        tokens = (sched or ReducerSchedule(layers=[])).tokens_per_layer(
            n_image, n_text, model.backbone.num_layers
        )
        out[name] = {"gflops_per_example": flops / 1e9, "image_tokens_per_layer": list(tokens[0])}

    def passes() -> None:
        for b in batches:
            model(b)

    times = interleaved_times(
        {name: passes for name in settings}, rounds, warmup=0, sync=device, desc=None,
        context=lambda name: model.backbone.using(settings[name]),
    )  # fmt: skip
    for name, rate in median_rates(times, examples).items():
        out[name]["examples_per_s"] = rate
    return out


# ---------------------------------------------------------------------------------------------- the stages
@dataclass
class Trained:
    """The trained models: the fine-tunes' starting point, the baseline and every fine-tune (one per seed)."""

    #: the pre-trained backbone the NLVR2 stages build on (None: the VQA baseline, trained from scratch)
    start: Path | None
    baseline: Path  #: the baseline's Lightning checkpoint
    pretrain_val_score: float  #: the pre-training's shapes VQA validation score
    #: fine-tune name -> the reducer it trains with (and is evaluated with)
    schedules: dict[str, ReducerSchedule | None]
    #: fine-tune name -> its checkpoint per seed, in ``StudyConfig.seeds`` order
    checkpoints: dict[str, list[Path]]


@dataclass
class EvalData:
    """The evaluation batches (on the study's device) and the statement type of each example, in order."""

    val: list[dict[str, Any]]
    test: list[dict[str, Any]]
    #: the same test examples padded to their batch's longest text (where ``pads_first`` depends on the batch)
    test_longest: list[dict[str, Any]]
    val_types: list[str]
    test_types: list[str]


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


def finetune_schedules(cfg: StudyConfig) -> dict[str, ReducerSchedule | None]:
    """The fine-tunes from the baseline: the matched control (reducers off), PuMer under each text-merge policy
    and PuMer without text merging (their schedules feed the checkpoints' cache keys)."""
    out: dict[str, ReducerSchedule | None] = {"ft_control": None}
    out.update({f"ft_pumer_{p}": cfg.schedule(text_merge_policy=p) for p in cfg.policies})
    out["ft_pumer_no_text"] = ablation(cfg.schedule(), "no_text_merge")
    return out


def train_stages(st: Study) -> Trained:
    """Data, pre-training, baseline and the fine-tunes of every seed (each from its cache when it has one)."""
    cfg, b, kind = st.cfg, st.cfg.steps, st.cfg.task
    st.data()
    pre_ckpt, pre_backbone, pre_val = st.pretrained(need_ckpt=kind == "vqa2")
    if kind == "nlvr2":
        start: Path | None = pre_backbone
        base_ckpt = st.train("baseline", kind, start, None, b.baseline_steps, cfg.baseline_lr)
    else:  # the VQA model trained from scratch is the baseline itself
        assert pre_ckpt is not None  # need_ckpt
        start, base_ckpt = None, pre_ckpt
    schedules = finetune_schedules(cfg)
    ckpts: dict[str, list[Path]] = {name: [] for name in schedules}
    # seed-major order: an interrupted run leaves whole seeds in the cache
    for seed in cfg.seeds:
        for name, sched in schedules.items():
            path = st.train(name, kind, start, sched, b.finetune_steps, cfg.finetune_lr, base_ckpt, seed=seed,
                            padding=cfg.text_padding)  # fmt: skip
            ckpts[name].append(path)
    return Trained(start, base_ckpt, pre_val, schedules, ckpts)


def train_distilled(st: Study, trained: Trained, pumer: ReducerSchedule) -> list[Path]:
    """PuMer + distillation from the baseline under the chosen policy, one per ``distil_seeds`` seed."""
    cfg, paths = st.cfg, []
    for seed in cfg.distil_seeds:
        path = st.train("ft_pumer_distil", cfg.task, trained.start, pumer, cfg.steps.finetune_steps,
                        cfg.finetune_lr, trained.baseline, distill=trained.baseline, seed=seed,
                        padding=cfg.text_padding)  # fmt: skip
        paths.append(path)
    return paths


def eval_data(st: Study) -> EvalData:
    """Validation and test batches padded as the fine-tunes were (``text_padding``), and test padded longest."""
    kind, pad = st.cfg.task, st.cfg.text_padding
    dm = st.datamodule(kind, padding=pad)
    val = [_to(x, st.device) for x in dm.eval_dataloader(dm.val_split)]
    test = [_to(x, st.device) for x in dm.eval_dataloader(dm.test_split)]
    test_longest = test
    if pad != "longest":
        dm_longest = st.datamodule(kind, padding="longest")
        test_longest = [_to(x, st.device) for x in dm_longest.eval_dataloader(dm_longest.test_split)]

    def types(batches: list[dict[str, Any]]) -> list[str]:
        return [m["statement_type"] for batch in batches for m in batch["meta"]]

    return EvalData(val, test, test_longest, types(val), types(test))


def learned_types(cfg: StudyConfig, base, data: EvalData) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The baseline's validation score per type and the types it learned: decided on validation, before any
    test figure is looked at."""
    # NLVR2 labels are class ids; VQA labels are already score vectors
    floor = chance(data.val, num_classes=2)
    val_acc = accuracy(predictions(base, data.val, None)[0], data.val_types)
    for t, stat in val_acc["by_type"].items():
        stat["chance"] = floor[t]
    learned = tuple(
        t for t, s in val_acc["by_type"].items() if s["acc"] - s["chance"] > cfg.learned_z * s["se"]
    )
    log(f"baseline validation score {val_acc['all']['acc']:.3f}; learned types: {learned or 'none'}")
    return val_acc, learned


def _test_scores(model, data: EvalData, schedule: ReducerSchedule | None, name: str) -> list[float]:
    scores, types = predictions(model, data.test, schedule)
    if types != data.test_types:
        raise RuntimeError(f"{name}: the test examples came in another order")
    return scores


def evaluate_finetuned(st: Study, trained: Trained, data: EvalData) -> tuple[dict, dict]:
    """Every fine-tune (per seed) on validation (for the policy choice) and on test; PuMer fine-tunes also with
    the reducers off and with random pruning at the same budget (``:eval_off``, ``:eval_random``)."""
    log(f"evaluating {sum(len(v) for v in trained.checkpoints.values())} fine-tuned models")
    val: dict[str, list[list[float]]] = {}
    test: dict[str, list[list[float]]] = {}
    for name, paths in trained.checkpoints.items():
        sched = trained.schedules[name]
        for path in paths:
            model = st.load(path, trained.start, st.cfg.task)
            val.setdefault(name, []).append(predictions(model, data.val, sched)[0])
            test.setdefault(name, []).append(_test_scores(model, data, sched, name))
            if sched is not None and name != "ft_pumer_no_text":
                test.setdefault(f"{name}:eval_off", []).append(_test_scores(model, data, None, name))
                random = ablation(sched, "random_prune")
                test.setdefault(f"{name}:eval_random", []).append(_test_scores(model, data, random, name))
            del model
    return val, test


def loss_check(st: Study, trained: Trained, data: EvalData, base, chosen: str,
               only: tuple[str, ...]) -> list[dict[str, Any]]:  # fmt: skip
    """Validation loss and score (learned types, mean over seeds) of the baseline and of the fine-tunes under the
    reducer they were trained with and with it off, and the control's weights with PuMer switched on: does
    fine-tuning with the reducer on lower the loss it optimises, does the score follow, and does it beat reducing
    the control's weights without training for it?"""
    cfg = st.cfg
    pumer = cfg.schedule(text_merge_policy=chosen)
    runs: list[tuple[str, str, list[Path], ReducerSchedule | None]] = [
        ("baseline", "off", [trained.baseline], None),
        ("baseline", "PuMer (training-free)", [trained.baseline], pumer),
        ("ft_control", "off", trained.checkpoints["ft_control"], None),
        ("ft_control", "PuMer (training-free)", trained.checkpoints["ft_control"], pumer),
        (f"ft_pumer_{chosen}", "PuMer (as trained)", trained.checkpoints[f"ft_pumer_{chosen}"], pumer),
        (f"ft_pumer_{chosen}", "off", trained.checkpoints[f"ft_pumer_{chosen}"], None),
    ]
    rows = []
    for weights, reducer, paths, sched in runs:
        per_seed_scores, per_seed_losses = [], []
        for path in paths:
            model = base if path == trained.baseline else st.load(path, trained.start, cfg.task)
            losses: list[float] = []
            per_seed_scores.append(predictions(model, data.val, sched, losses=losses)[0])
            kept = [x for x, t in zip(losses, data.val_types) if t in only]
            per_seed_losses.append(sum(kept) / len(kept))
        score = over_seeds(per_seed_scores, data.val_types, only)["learned"]
        rows.append({
            "weights": weights, "reducer": reducer, "seeds": len(paths), "loss": sum(per_seed_losses) / len(paths),
            "loss_per_seed": per_seed_losses, "score": score["acc"], "score_se": score["se"],
        })  # fmt: skip
        log(f"validation, learned types: {weights}, reducer {reducer}: loss {rows[-1]['loss']:.3f}, "
            f"score {100 * score['acc']:.1f}")  # fmt: skip
    return rows


POLICY_RULE = (
    "the policy whose PuMer fine-tunes score highest on the validation split (learned types, mean over "
    "seeds); ties go to the higher training-free validation score, then to the first listed"
)


def choose_policy(cfg: StudyConfig, base, data: EvalData, ft_val: dict[str, list[list[float]]],
                  only: tuple[str, ...]) -> dict[str, Any]:  # fmt: skip
    """The default text-merge policy, chosen on validation (`POLICY_RULE`) before any test figure is looked at."""
    choice = {
        p: {
            "ft_val": over_seeds(ft_val[f"ft_pumer_{p}"], data.val_types, only)["learned"],
            "free_val": accuracy(
                predictions(base, data.val, cfg.schedule(text_merge_policy=p))[0], data.val_types, only
            )["learned"],
        }
        for p in cfg.policies
    }
    chosen = max(cfg.policies, key=lambda p: (choice[p]["ft_val"]["acc"], choice[p]["free_val"]["acc"]))
    log("validation, learned types: " + "; ".join(
        f"{p}: fine-tuned {100 * c['ft_val']['acc']:.1f}, training-free {100 * c['free_val']['acc']:.1f}"
        for p, c in choice.items()) + f" -> chosen policy {chosen}")  # fmt: skip
    return {"rule": POLICY_RULE, "validation": choice, "chosen": chosen}


Setting = tuple[str, ReducerSchedule | None]  # (description, reducer at test)


def free_settings(cfg: StudyConfig, chosen: str, num_layers: int) -> dict[str, Setting]:
    """The training-free settings evaluated on the baseline's weights (a backbone of ``num_layers`` reducible
    blocks), in report order. Rows named after an ablation are `pumer_lightning.reduce.ablation` of the PuMer
    setting (``ABLATIONS`` says what each means)."""
    pumer, plain = cfg.schedule(text_merge_policy=chosen), cfg.schedule()
    free: dict[str, Setting] = {"baseline": ("no reduction", None)}
    for p in cfg.policies:
        desc = f"PuMer, text-merge policy {p}" + (" (chosen)" if p == chosen else "")
        free[f"pumer_{p}"] = (desc, cfg.schedule(text_merge_policy=p))
    if "pads_first" in cfg.policies and cfg.text_padding != "longest":
        free["pumer_pads_first_longest"] = (
            "PuMer, pads_first, batches padded to their longest text",
            cfg.schedule(text_merge_policy="pads_first"),
        )
    free["pumer_no_text"] = ("PuMer without text merging", ablation(plain, "no_text_merge"))
    free["pumer_score_partition"] = (
        "PuMer, bipartite A/B split in score order (official code)",
        dataclasses.replace(pumer, partition="score"),
    )
    # prune_only merges no text: built from the "real" policy's schedule (the one it always had; same tokens)
    ablated = {"prune_only": plain, "no_prune": pumer, "random_prune": pumer, "cls_prune": pumer}
    for name, of in ablated.items():
        free[name] = (ABLATIONS[name][0], ablation(of, name))
    for k in cfg.keep_sweep:
        if k != pumer.keep_ratio:
            at_k = dataclasses.replace(pumer, keep_ratio=k)
            free[f"keep_{k:g}"] = (f"PuMer at keep {k:g}", at_k)
            free[f"random_keep_{k:g}"] = (f"random pruning at keep {k:g}", ablation(at_k, "random_prune"))
    if 0.5 in cfg.keep_sweep and pumer.keep_ratio != 0.5:
        no_text = ablation(cfg.schedule(keep_ratio=0.5), "no_text_merge")
        free["keep_0.5_no_text"] = ("PuMer at keep 0.5 without text merging", no_text)
        free["random_keep_0.5_no_text"] = (
            "random pruning at keep 0.5 without text merging",
            ablation(no_text, "random_prune"),
        )
    if cfg.placement_keep is not None:
        for block in range(num_layers - 1):
            at = dataclasses.replace(pumer, keep_ratio=cfg.placement_keep, layers=[block])
            k = f"keep_{cfg.placement_keep:g}"
            free[f"{k}@block{block}"] = (
                f"PuMer at keep {cfg.placement_keep:g}, reducer at block {block} only",
                at,
            )
            free[f"random_{k}@block{block}"] = (
                f"random pruning at keep {cfg.placement_keep:g}, reducer at block {block} only",
                ablation(at, "random_prune"),
            )
    return free


def finetuned_settings(cfg: StudyConfig, trained: Trained, chosen: str) -> dict[str, tuple[str, Setting]]:
    """The fine-tuned rows, each evaluated with the reducer it was trained with, and their controls:
    name -> (weights, (description, reducer at test))."""
    pumer, ch, on = cfg.schedule(text_merge_policy=chosen), f"ft_pumer_{chosen}", "fine-tuned with PuMer on"
    rows: dict[str, tuple[str, Setting]] = {}
    for p in cfg.policies:
        desc = f"{on}, text-merge policy {p}" + (" (chosen)" if p == chosen else "")
        rows[f"ft_pumer_{p}"] = (f"ft_pumer_{p}", (desc, trained.schedules[f"ft_pumer_{p}"]))
    no_text = (f"{on}, without text merging", trained.schedules["ft_pumer_no_text"])
    rows["ft_pumer_no_text"] = ("ft_pumer_no_text", no_text)
    rows["ft_control"] = ("ft_control", ("fine-tuned with reducers off (matched control)", None))
    rows["ft_control:eval_pumer"] = (
        "ft_control",
        ("matched control evaluated with PuMer (chosen policy): reduced without training for it", pumer),
    )
    rows[f"{ch}:eval_off"] = (ch, (f"{on} (chosen policy), evaluated with reducers off", None))
    random = ablation(pumer, "random_prune")
    rows[f"{ch}:eval_random"] = (
        ch,
        (f"{on} (chosen policy), evaluated with random pruning at the same budget", random),
    )
    if cfg.distil_seeds:
        distil = f"{on} (chosen policy) + distillation from the baseline"
        rows["ft_pumer_distil"] = ("ft_pumer_distil", (distil, pumer))
    return rows


def _row(name: str, stage: str, weights: str, setting: Setting) -> dict[str, Any]:
    desc, sched = setting
    return {"name": name, "stage": stage, "weights": weights, "description": desc,
            "schedule": str(sched or ReducerSchedule()), "eval_reducer": sched}  # fmt: skip


def evaluate_free(base, free: dict[str, Setting], data: EvalData) -> tuple[list[dict], dict]:
    """Every training-free setting on the baseline's weights: its rows and its test scores (one 'seed')."""
    log(f"evaluating {len(free)} training-free settings on {len(data.test_types)} test examples")
    rows, scores = [], {}
    for name, setting in free.items():
        batches = data.test_longest if name.endswith("_longest") else data.test
        s, t = predictions(base, batches, setting[1])
        if t != data.test_types:
            raise RuntimeError(f"{name}: the test examples came in another order")
        scores[name] = [s]
        rows.append(_row(name, "training-free", "baseline", setting))
    return rows, scores


def time_settings(base, rows: list[dict[str, Any]], data: EvalData, rounds: int) -> dict[str, dict[str, Any]]:
    """FLOPs, speed and tokens per row, relative to the unreduced baseline: the training-free settings are timed
    (same weights, interleaved rounds); a fine-tuned row costs what the training-free row of its reducer costs."""
    log("timing every setting (same weights, interleaved rounds)")
    batches = data.test[: max(1, min(len(data.test), 4))]
    distinct = {r["name"]: r["eval_reducer"] for r in rows if r["stage"] == "training-free"}
    speeds = speed(base, batches, distinct, rounds=rounds)
    if "pumer_pads_first_longest" in distinct:  # its batches are padded differently: timed on its own batches
        longest = speed(base, data.test_longest[: len(batches)],
                        {"baseline": None, "pumer_pads_first_longest": distinct["pumer_pads_first_longest"]},
                        rounds=rounds)  # fmt: skip
        speeds["pumer_pads_first_longest"] = {
            **longest["pumer_pads_first_longest"],
            "relative_to": longest["baseline"],
        }
    out = {}
    for r in rows:
        key = r["name"] if r["stage"] == "training-free" else next(
            (n for n, s in distinct.items() if s == r["eval_reducer"] and not n.endswith("_longest")), "baseline"
        )  # fmt: skip
        s = speeds[key]
        ref = s.get("relative_to", speeds["baseline"])
        out[r["name"]] = {
            "gflops_per_example": s["gflops_per_example"],
            "flops_ratio": ref["gflops_per_example"] / s["gflops_per_example"],
            "examples_per_s": s["examples_per_s"],
            "speedup": s["examples_per_s"] / ref["examples_per_s"],
            "image_tokens_per_layer": s["image_tokens_per_layer"],
        }
    return out


def comparisons(scores: dict[str, list[list[float]]], seeds: dict[str, list[int]], types: list[str],
                only: tuple[str, ...], policies: list[str], chosen: str) -> dict[str, dict[str, Any]]:  # fmt: skip
    """The paired differences the report lists (seed s against seed s where both sides are fine-tuned)."""

    def cmp(a: str, b: str, what: str) -> dict[str, Any]:
        pa, pb = scores[a], scores[b]
        sa, sb = seeds.get(a), seeds.get(b)
        if sa is not None and sb is not None:  # two fine-tuned settings: seed s against seed s
            common = [x for x in sa if x in sb]
            pa, pb = [pa[sa.index(x)] for x in common], [pb[sb.index(x)] for x in common]
        return {"a": a, "b": b, "what": what, **paired_over_seeds(pa, pb, types, only)}

    ch = f"ft_pumer_{chosen}"
    out = {
        "pumer_ft_minus_control_ft": cmp(ch, "ft_control", f"headline: fine-tuned PuMer ({chosen}) vs control"),
        **{f"pumer_ft_{p}_minus_control_ft": cmp(f"ft_pumer_{p}", "ft_control", f"fine-tuned PuMer ({p}) vs control")
           for p in policies},
        "pumer_ft_no_text_minus_control_ft": cmp("ft_pumer_no_text", "ft_control",
                                                 "fine-tuned PuMer without text merging vs control"),
        "pumer_ft_minus_control_ft_eval_pumer": cmp(ch, "ft_control:eval_pumer",
                                                    "fine-tuned PuMer vs the control's weights reduced by PuMer"),
        "pumer_ft_eval_random_minus_pumer_ft": cmp(f"{ch}:eval_random", ch,
                                                   "fine-tuned PuMer weights: random vs text-informed pruning"),
        "pumer_free_minus_baseline": cmp(f"pumer_{chosen}", "baseline", f"training-free PuMer ({chosen}) vs baseline"),
        **{f"pumer_free_{p}_minus_baseline": cmp(f"pumer_{p}", "baseline", f"training-free PuMer ({p}) vs baseline")
           for p in policies},
    }  # fmt: skip
    if "ft_pumer_distil" in scores:
        out["pumer_distil_ft_minus_control_ft"] = cmp(
            "ft_pumer_distil", "ft_control", "fine-tuned PuMer + distillation vs control (matching seeds)"
        )
    if "pumer_pads_first_longest" in scores:
        out["pumer_free_pads_first_longest_minus_baseline"] = cmp(
            "pumer_pads_first_longest",
            "baseline",
            "training-free pads_first on batch-longest padding vs baseline",
        )
    out["pumer_free_no_text_minus_baseline"] = cmp(
        "pumer_no_text", "baseline", "training-free PuMer without text merging vs baseline"
    )
    out["random_free_minus_pumer_free"] = cmp(
        "random_prune", f"pumer_{chosen}", "random vs text pruning, keep 0.7"
    )
    out["cls_free_minus_pumer_free"] = cmp("cls_prune", f"pumer_{chosen}", "CLS vs text pruning, keep 0.7")
    if "keep_0.5" in scores:
        out["random_keep0.5_minus_pumer_keep0.5"] = cmp(
            "random_keep_0.5", "keep_0.5", f"random vs text pruning at keep 0.5 (merge, text {chosen})"
        )
        out["random_keep0.5_minus_baseline"] = cmp(
            "random_keep_0.5", "baseline", "random keep 0.5 vs baseline"
        )
    if "keep_0.5_no_text" in scores:
        out["random_keep0.5_no_text_minus_pumer_keep0.5_no_text"] = cmp(
            "random_keep_0.5_no_text",
            "keep_0.5_no_text",
            "random vs text pruning at keep 0.5, no text merging",
        )
    for name in scores:  # the pruning control by placement (StudyConfig.placement_keep)
        if name.startswith("random_keep_") and "@block" in name:
            text, block = name.removeprefix("random_"), name.rpartition("@block")[2]
            out[f"placement_block{block}_random_minus_text"] = cmp(
                name,
                text,
                f"random vs text pruning, {text.partition('@')[0].replace('_', ' ')}, reducer at block "
                f"{block} only",
            )
    return out


def evaluate(st: Study, trained: Trained, timing_rounds: int) -> Results:
    """Every evaluation stage: learned types, fine-tunes, the policy choice (on validation), the distillation
    fine-tunes, the training-free settings, timing, comparisons and targets."""
    cfg = st.cfg
    data = eval_data(st)
    base = st.load(trained.baseline, trained.start, cfg.task)
    validation, learned = learned_types(cfg, base, data)
    only = learned or TYPES
    ft_val, scores = evaluate_finetuned(st, trained, data)
    policy_choice = choose_policy(cfg, base, data, ft_val, only)
    chosen = policy_choice["chosen"]
    pumer = cfg.schedule(text_merge_policy=chosen)
    for path in train_distilled(st, trained, pumer):
        model = st.load(path, trained.start, cfg.task)
        scores.setdefault("ft_pumer_distil", []).append(_test_scores(model, data, pumer, "ft_pumer_distil"))
        del model
    for path in trained.checkpoints["ft_control"]:  # the ordinary fine-tune, reduced without training for it
        model = st.load(path, trained.start, cfg.task)
        scores.setdefault("ft_control:eval_pumer", []).append(_test_scores(model, data, pumer, "ft_control"))
        del model
    seeds = {name: list(cfg.seeds) for name in scores}
    seeds["ft_pumer_distil"] = list(cfg.distil_seeds)
    rows, free_scores = evaluate_free(base, free_settings(cfg, chosen, base.backbone.num_layers), data)
    scores.update(free_scores)
    for name, (weights, setting) in finetuned_settings(cfg, trained, chosen).items():
        rows.append({**_row(name, "fine-tuned", weights, setting), "seeds": seeds[name]})
    figures = time_settings(base, rows, data, timing_rounds)
    for r in rows:
        del r["eval_reducer"]
        r.update(over_seeds(scores[r["name"]], data.test_types, only))
        r.update(figures[r["name"]])
    comps = comparisons(scores, seeds, data.test_types, only, list(cfg.policies), chosen)
    losses = loss_check(st, trained, data, base, chosen, only)
    return Results(validation, learned, policy_choice, rows, comps, _targets(comps), losses)


# ---------------------------------------------------------------------------------------------- the study
SE_RULE = (
    "mean over seeds; standard error sqrt(se_seeds^2 + se_sample^2), where se_seeds is the standard deviation over "
    "seeds of the per-seed figure (accuracy, or paired difference seed s against seed s) divided by sqrt(S), and "
    "se_sample is the standard error over test examples of the seed-averaged per-example score (paired: of the "
    "seed-averaged per-example difference); single-model rows have se_seeds = 0"
)


def _targets(c: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The documented accuracy targets, met or missed, from the comparisons (points = 100 x accuracy)."""
    free, ft = c["pumer_free_minus_baseline"], c["pumer_ft_minus_control_ft"]
    out = {
        "training_free_loss_at_most_5": {
            "target": "training-free, the chosen policy loses <= 5 points against the baseline (learned types)",
            "value": 100 * free["diff"], "se": 100 * free["se"], "met": free["diff"] >= -0.05,
        },
        "finetuned_within_1_point": {
            "target": "fine-tuned PuMer vs matched control within 1 point, >= 3 seeds, seed-inclusive SE <= 0.7",
            "value": 100 * ft["diff"], "se": 100 * ft["se"], "seeds": ft["seeds"],
            "met": abs(ft["diff"]) <= 0.01 and ft["seeds"] >= 3 and ft["se"] <= 0.007,
        },
    }  # fmt: skip
    if "random_keep0.5_minus_pumer_keep0.5" in c:
        r = c["random_keep0.5_minus_pumer_keep0.5"]
        out["random_5_below_text_at_keep_0.5"] = {
            "target": "training-free at keep 0.5 (same merge and text settings), random pruning >= 5 points below "
            "text-informed pruning",
            "value": 100 * r["diff"], "se": 100 * r["se"], "met": r["diff"] <= -0.05,
        }  # fmt: skip
    return out


def study_record(st: Study, trained: Trained, res: Results, wall_seconds: float) -> dict[str, Any]:
    """The study's JSON record (schema ``pumer-lightning/study/v2``)."""
    cfg = st.cfg
    return {
        "schema": "pumer-lightning/study/v2",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m pumer_lightning.study", *sys.argv[1:]]),
        "config": {**dataclasses.asdict(cfg), "steps": dataclasses.asdict(cfg.steps)},
        "task": TASK_TEXT[cfg.task] + ", types " + ", ".join(TYPES),
        "metric": "accuracy" if cfg.task == "nlvr2" else "VQA score",
        "hardware": {
            "device": str(st.device),
            "name": torch.cuda.get_device_name(st.device)
            if st.device.type == "cuda"
            else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        },
        "software": {"torch": torch.__version__, "python": platform.python_version()},
        "pretrain_vqa_val_score": trained.pretrain_val_score,
        "learned_rule": (
            f"a type is learned when the baseline's validation score on it exceeds chance (always giving the type's "
            f"best single answer: 0.5 for the balanced true/false statements) by more than {cfg.learned_z:g} "
            "standard errors; decided on the validation split before any test figure"
        ),
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
    """``<out>/shapes[_<task>][_<budget>].{json,md,png}``, and the table on stdout."""
    cfg = result["config"]
    out.mkdir(parents=True, exist_ok=True)
    stem = "shapes" + ("" if cfg["task"] == "nlvr2" else f"_{cfg['task']}")
    stem += "" if cfg["budget"] == "default" else f"_{cfg['budget']}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(result) + "\n")
    plot(result, out / f"{stem}.png")
    log(f"wrote {out / stem}.json, .md, .png in {result['wall_seconds'] / 60:.1f} min")
    print(markdown(result))


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
    result = study_record(st, trained, results, time.perf_counter() - t_start)
    write_report(result, out)
    return result


# ---------------------------------------------------------------------------------------------- report
def _pct(s: dict[str, float]) -> str:
    return f"{100 * s['acc']:.1f} ± {100 * s['se']:.1f}"


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
        f"({', '.join(map(str, seeds))}: data order and dropout)."
    )


def _placement_lines(r: dict[str, Any]) -> list[str]:
    """The pruning control by placement (``StudyConfig.placement_keep``) as a table of its own."""
    by = {row["name"]: row for row in r["settings"]}
    comps = [c for name, c in r["comparisons"].items() if name.startswith("placement_block")]
    if not comps:
        return []
    keep = r["config"]["placement_keep"]
    lines = ["", f"The pruning control by placement: training-free at keep {keep:g} (same merge and text settings), "
             "the reducer at one block only (not the last: in ViLT a reducer there changes nothing the head reads):", "",
             "| reducer at block | text-informed % (learned) | random % (learned) | random minus text (points) |",
             "|---|---|---|---|"]  # fmt: skip
    for c in comps:
        block = c["a"].rpartition("@block")[2]
        lines.append(f"| {block} | {_pct(by[c['b']]['learned'])} | {_pct(by[c['a']]['learned'])} | "
                     f"{100 * c['diff']:+.1f} ± {100 * c['se']:.1f} |")  # fmt: skip
    return lines


def markdown(r: dict[str, Any]) -> str:
    learned = r["learned_types"]
    types = sorted({t for row in r["settings"] for t in row["by_type"]})
    cfg = r["config"]
    lines = [
        f"# PuMer accuracy study on the shapes world ({cfg['budget']} budget)",
        "",
        f"- Command: `{r['command']}`; {r['hardware']['device']} ({r['hardware']['name']}, "
        f"{r['hardware']['threads']} threads), wall time {r['wall_seconds'] / 60:.1f} min" + _stage_times(r),
        f"- Task: {r['task']}; metric: {r['metric']}; model `{cfg['preset']}`. " + _training_text(r),
        f"- Learned types: **{', '.join(learned) or 'none'}** ({r['learned_rule']}). Accuracy ± one standard error "
        f"on {r['settings'][0]['all']['n']} test examples.",
    ]
    if "se_rule" in r:
        lines += [
            f"- Fine-tuned rows and comparisons: {r['se_rule']}.",
            f"- Texts padded: `{r['text_padding']}` (`max_length`: every text to max_text_len = "
            f"{cfg['max_text_len']} tokens, as the official code pads to 40; FLOPs include the pads, as there).",
        ]
    lines += [
        "",
        "| setting | weights | seeds | reducer at test | learned types % | all % | "
        + " | ".join(f"{t} %" for t in types)
        + " | GFLOPs/ex | FLOPs ratio | speedup |",
        "|---|---|---|---|---|---|" + "---|" * len(types) + "---|---|---|",
    ]
    for row in r["settings"]:
        seeds = row.get("seeds")
        lines.append(
            f"| `{row['name']}` | {row['weights']} | {len(seeds) if seeds else '-'} | {row['schedule']} | "
            f"**{_pct(row['learned'])}** | {_pct(row['all'])} | "
            + " | ".join(_pct(row["by_type"][t]) if t in row["by_type"] else "" for t in types)
            + f" | {row['gflops_per_example']:.3f} | {row['flops_ratio']:.2f}× | {row['speedup']:.2f}× |"
        )
    if "policy_choice" in r:
        pc = r["policy_choice"]
        lines += ["", f"Text-merge policy chosen on validation: **{pc['chosen']}** (rule: {pc['rule']}).", ""]
        lines += ["| policy | fine-tuned validation % (learned) | training-free validation % (learned) |",
                  "|---|---|---|"]  # fmt: skip
        for name, c in pc["validation"].items():
            lines.append(f"| {name} | {_pct(c['ft_val'])} | {_pct(c['free_val'])} |")
    lines += ["", "Paired differences on the learned types (same test examples; ± one standard error):", ""]
    lines += [
        "| comparison | difference (points) | seeds | per seed | SE seeds / sample |",
        "|---|---|---|---|---|",
    ]
    for name, c in r["comparisons"].items():
        per = ", ".join(f"{100 * x:+.1f}" for x in c.get("per_seed", [c["diff"]]))
        lines.append(
            f"| {name} | {100 * c['diff']:+.1f} ± {100 * c['se']:.1f} | {c.get('seeds', 1)} | {per} | "
            f"{100 * c.get('se_seeds', 0.0):.1f} / {100 * c.get('se_sample', c['se']):.1f} |"
        )
    lines += _placement_lines(r)
    if r.get("loss_check"):
        lines += ["", "Validation loss (the loss fine-tuning minimises) and score on the learned types, mean over seeds:",
                  "", "| weights | reducer | seeds | loss | score % |", "|---|---|---|---|---|"]  # fmt: skip
        for c in r["loss_check"]:
            lines.append(
                f"| {c['weights']} | {c['reducer']} | {c['seeds']} | {c['loss']:.3f} | "
                f"{100 * c['score']:.1f} ± {100 * c['score_se']:.1f} |"
            )
    if r.get("targets"):
        lines += ["", "Targets:", ""]
        for t in r["targets"].values():
            lines.append(
                f"- {'MET' if t['met'] else 'MISSED'}: {t['target']}: {t['value']:+.1f} ± {t['se']:.1f} points"
                + (f" over {t['seeds']} seeds" if "seeds" in t else "")
            )
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"training-free": "o", "fine-tuned": "s"}
    for row in r["settings"]:
        if "@block" in row["name"]:  # the placement control: a diagnostic with its own table
            continue
        random = "random" in row["name"]
        color = (
            "tab:red" if random else ("tab:gray" if row["name"] in ("baseline", "ft_control") else "tab:blue")
        )
        color = "tab:orange" if "cls" in row["name"] else color
        ax.errorbar(row["gflops_per_example"], 100 * row["learned"]["acc"], yerr=100 * row["learned"]["se"],
                    fmt=styles[row["stage"]], color=color, capsize=2)  # fmt: skip
        ax.annotate(row["name"], (row["gflops_per_example"], 100 * row["learned"]["acc"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("GFLOPs per example")
    ax.set_ylabel(f"test accuracy on learned types ({', '.join(r['learned_types']) or 'all'}) %")
    ax.set_title(
        "accuracy vs FLOPs (o training-free, s fine-tuned; red random, orange CLS pruning)", fontsize=10
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pumer_lightning.study", description=__doc__.split("\n")[0])
    p.add_argument(
        "--budget",
        choices=sorted(BUDGETS),
        default="default",
        help="training budget (default: about an hour on 2 CPU cores from nothing)",
    )
    p.add_argument(
        "--work", type=Path, default=Path("data/study"), help="data, cached checkpoints, TensorBoard runs"
    )
    p.add_argument(
        "--out", type=Path, default=Path("results/study"), help="where the JSON, table and plot go"
    )
    p.add_argument("--fresh", action="store_true", help="retrain every stage even if cached")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--workers", type=int, default=1, help="data-loader worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--task", choices=sorted(TASK_TEXT), default="nlvr2", help="the study task (default nlvr2)"
    )
    p.add_argument(
        "--distil-seeds", type=int, nargs="*", default=[], metavar="SEED",
        help="also fine-tune PuMer with distillation from the baseline, once per seed (default: none)",
    )  # fmt: skip
    a = p.parse_args(argv)
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    run_study(
        StudyConfig(budget=a.budget, seed=a.seed, task=a.task, distil_seeds=tuple(a.distil_seeds)),
        a.work,
        a.out,
        a.fresh,
        device,
        a.workers,
    )


if __name__ == "__main__":
    main()
