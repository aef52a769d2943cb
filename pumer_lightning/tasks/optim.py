"""The optimiser of every task module: AdamW over learning-rate groups, warmup then decay.

Three parts learn at their own rate: the backbone (``lr``), METER's cross-modal blocks (``lr *
lr_mult_cross_modal``) and the task head (``lr * lr_mult_head``); within each, biases and normalisation weights
get no weight decay. The schedule warms up linearly, then decays (linear, cosine) or stays constant, stepped
every optimiser step over the run's ``total`` steps.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from .config import OptimConfig

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.RMSNorm)
_CROSS_MODAL = re.compile(r"(^|\.)cross_modal")


def no_decay_names(module: nn.Module) -> set[str]:
    """Parameter names exempt from weight decay: every bias and every weight of a normalisation layer."""
    names = set()
    for mod_name, mod in module.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p_name == "bias" or isinstance(mod, _NORM_TYPES):
                names.add(full)
    return names


def warmup_decay(
    step: int, total: int, warmup: int, schedule: str = "linear", end_ratio: float = 0.0
) -> float:
    """Learning-rate multiplier at optimiser step ``step``: linear warmup, then the chosen decay."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if schedule == "cosine":
        return end_ratio + (1.0 - end_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return end_ratio + (1.0 - end_ratio) * (1.0 - progress)


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """AdamW groups of a task module (``backbone``, ``head``, an optional frozen ``teacher``): (backbone |
    cross-modal | head) x (decay | no decay), named ``<part>`` or ``<part>/no_decay``; frozen parameters and
    the teacher's are left out."""
    exempt = {f"backbone.{n}" for n in no_decay_names(model.backbone)}
    exempt |= {f"head.{n}" for n in no_decay_names(model.head)}
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad or name.startswith("teacher."):
            continue
        if name.startswith("head."):
            part = "head"
        elif _CROSS_MODAL.search(name):
            part = "cross_modal"
        else:
            part = "backbone"
        groups.setdefault((part, name not in exempt), []).append(param)
    mult = {"backbone": 1.0, "cross_modal": cfg.lr_mult_cross_modal, "head": cfg.lr_mult_head}
    return [
        {
            "params": params,
            "lr": cfg.lr * mult[part],
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "name": part if decay else f"{part}/no_decay",
        }
        for (part, decay), params in sorted(groups.items())
    ]


def optimizer_and_schedule(model: nn.Module, cfg: OptimConfig, total: int) -> dict[str, Any]:
    """What ``configure_optimizers`` returns: AdamW over `param_groups` and the warmup/decay schedule over
    ``total`` optimiser steps, stepped every step."""
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_ratio * total))
    warmup = min(warmup, max(total - 1, 0))

    def factor(step: int) -> float:
        return warmup_decay(step, total, warmup, cfg.schedule, cfg.end_lr_ratio)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
