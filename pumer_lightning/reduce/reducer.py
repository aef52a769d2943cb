"""One PuMer reduction step: prune image tokens, merge image tokens, merge text tokens."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .merge import (
    gather_slot_max,
    image_merge_slots,
    merge_by_slots,
    remap_through_slots,
    text_merge_slots,
)
from .prune import gather_tokens, remap_after_gather, topk_keep_index
from .schedule import LayerPlan


@dataclass
class ReductionState:
    """The two token streams between cross-modal layers.

    Attributes:
        image: (B, Ni, C) image tokens, the image CLS at index 0.
        image_size: (B, Ni) how many original patches (CLS counted as one) each token stands for.
        text: (B, Lt, C) text tokens, the text CLS first among the real tokens.
        text_mask: (B, Lt) int64, 1 for real tokens, 0 for pads; always binary.
        text_size: (B, Lt) how many original text tokens each token stands for (pads count 1).
        patch_map: (B, Ni_original) current index of each original image token, -1 once pruned; None unless tracked.
        text_map: (B, Lt_original) current index of each original text token, -1 once dropped; None unless tracked.
    """

    image: Tensor
    image_size: Tensor
    text: Tensor
    text_mask: Tensor
    text_size: Tensor
    patch_map: Tensor | None = None
    text_map: Tensor | None = None

    @classmethod
    def init(cls, image: Tensor, text: Tensor, text_mask: Tensor, track_maps: bool = False) -> ReductionState:
        batch, n_image = image.shape[:2]
        n_text = text.shape[1]
        device = image.device
        maps = None, None
        if track_maps:
            maps = (
                torch.arange(n_image, device=device).expand(batch, n_image).clone(),
                torch.arange(n_text, device=device).expand(batch, n_text).clone(),
            )
        return cls(
            image=image,
            image_size=torch.ones(batch, n_image, device=device),
            text=text,
            text_mask=(text_mask != 0).long(),
            text_size=torch.ones(batch, n_text, device=text.device),
            patch_map=maps[0],
            text_map=maps[1],
        )


@dataclass
class ReductionTrace:
    """Token counts entering each layer of one forward pass, plus patch/text maps when tracked."""

    layers: list[int] = field(default_factory=list)
    image_tokens: list[int] = field(default_factory=list)
    text_tokens: list[int] = field(default_factory=list)
    patch_maps: list[Tensor] = field(default_factory=list)
    text_maps: list[Tensor] = field(default_factory=list)

    def record(self, layer: int, n_image: int, n_text: int) -> None:
        self.layers.append(layer)
        self.image_tokens.append(n_image)
        self.text_tokens.append(n_text)

    def record_maps(self, state: ReductionState) -> None:
        if state.patch_map is not None:
            self.patch_maps.append(state.patch_map)
        if state.text_map is not None:
            self.text_maps.append(state.text_map)


def reduce(
    state: ReductionState,
    scores: Tensor | None,
    image_metric: Tensor | None,
    text_metric: Tensor | None,
    plan: LayerPlan,
) -> tuple[ReductionState, dict[str, int]]:
    """Apply one reduction step with the counts of ``plan``.

    Args:
        state: the token streams entering the step.
        scores: (B, Ni) importance of each image token (needed when the plan prunes).
        image_metric: (B, Ni, D) similarity features of the image tokens (needed when the plan merges images).
        text_metric: (B, Lt, D) similarity features of the text tokens (needed when the plan merges text).
        plan: the counts, from `ReducerSchedule.step`.
    Returns:
        The reduced state and a dict of the counts applied.
    """
    n_image, n_text = state.image.shape[1], state.text.shape[1]
    if (n_image, n_text) != (plan.image_in, plan.text_in):
        raise ValueError(
            f"reduce: state has {n_image} image / {n_text} text tokens but the plan for layer {plan.layer} "
            f"expects {plan.image_in} / {plan.text_in}"
        )
    image, image_size, patch_map = state.image, state.image_size, state.patch_map

    if plan.n_prune:
        if scores is None:
            raise ValueError("reduce: the plan prunes image tokens but no importance scores were given")
        keep = topk_keep_index(scores, plan.image_kept)
        image, image_size = gather_tokens(image, keep), gather_tokens(image_size, keep)
        if image_metric is not None:
            image_metric = gather_tokens(image_metric, keep)
        if patch_map is not None:
            patch_map = remap_after_gather(patch_map, keep, n_image)

    if plan.n_merge:
        if image_metric is None:
            raise ValueError("reduce: the plan merges image tokens but no image metric was given")
        slot = image_merge_slots(image_metric, plan.n_merge)
        image, image_size = merge_by_slots(image, image_size, slot, plan.image_out)
        if patch_map is not None:
            patch_map = remap_through_slots(patch_map, slot, plan.image_out)

    text, text_mask, text_size, text_map = state.text, state.text_mask, state.text_size, state.text_map
    if plan.n_text_merge:
        if text_metric is None:
            raise ValueError("reduce: the plan merges text tokens but no text metric was given")
        slot = text_merge_slots(text_metric, text_mask, plan.n_text_merge, plan.text_ratio)
        text, text_size = merge_by_slots(text, text_size, slot, plan.text_out)
        text_mask = gather_slot_max(text_mask, slot, plan.text_out)
        if text_map is not None:
            text_map = remap_through_slots(text_map, slot, plan.text_out)

    new = replace(
        state,
        image=image,
        image_size=image_size,
        text=text,
        text_mask=text_mask,
        text_size=text_size,
        patch_map=patch_map,
        text_map=text_map,
    )
    stats = {
        "image_in": plan.image_in,
        "image_kept": plan.image_kept,
        "image_out": plan.image_out,
        "text_in": plan.text_in,
        "text_out": plan.text_out,
    }
    return new, stats
