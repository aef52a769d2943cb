"""The training settings of a task module: the optimiser and learning-rate schedule, and knowledge distillation.

What the backbone is (``--model.backbone.*``) is a `pumer_lightning.models.BackboneSpec`; the reducer schedule
(``--model.reducer.*``) a `pumer_lightning.reduce.ReducerSchedule`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (PuMer's recipe by default: docs/experiments.md#training-recipe).

    Args:
        lr: base learning rate (the backbone group's).
        lr_mult_head: multiplier for the task head (PuMer's ``lr_mult``: 10 for ViLT, 50 or 10 for METER).
        lr_mult_cross_modal: multiplier for METER's ``cross_modal_*`` parameters (5 in PuMer; ViLT has none).
        weight_decay: decoupled weight decay; never applied to biases and normalisation weights.
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_ratio: warmup length as a fraction of the total optimiser steps.
        warmup_steps: warmup length in steps; overrides ``warmup_ratio`` when set.
        schedule: after warmup: ``linear`` decay to ``end_lr_ratio * lr``, ``cosine`` decay, or ``constant``.
        end_lr_ratio: final learning rate as a fraction of the peak.
    """

    lr: float = 1e-4
    lr_mult_head: float = 10.0
    lr_mult_cross_modal: float = 1.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    end_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"--model.optim.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"--model.optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"--model.optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.end_lr_ratio <= 1.0:
            raise ValueError(f"--model.optim.end_lr_ratio must be in [0, 1], got {self.end_lr_ratio}")


@dataclass
class DistillConfig:
    """Knowledge distillation from a frozen, unreduced teacher of the same architecture
    (docs/official_code_differences.md#b16).

    Args:
        teacher: ``initial`` (a frozen copy of the student's starting weights, i.e. the backbone checkpoint and
            head as loaded, without reducers), a Lightning ``.ckpt`` written by this framework for the same task,
            or a converted checkpoint (``pumer_config.json`` directory or ``.pt``) holding this task's head. A path
            that does not exist is an error.
        weight: scale of the distillation term (PuMer's ``logits_loss_scale``).
        task_weight: scale of the task loss (PuMer's ``task_loss_scale``).
        temperature: softening temperature; the term is multiplied by ``temperature ** 2``.
    """

    teacher: str = "initial"
    weight: float = 1.0
    task_weight: float = 1.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"--model.distill.temperature must be > 0, got {self.temperature}")
        if self.weight < 0 or self.task_weight < 0:
            raise ValueError("--model.distill.weight and --model.distill.task_weight must be >= 0")
