"""The study's configuration: the budgets, `StudyConfig` (what determines its models) and the cache key."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

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
