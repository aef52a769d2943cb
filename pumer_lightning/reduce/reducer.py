"""One PuMer reduction step: prune image tokens, merge image tokens, merge text tokens.

The step works on the joint sequence ``[text; image]`` (ViLT's own layout; METER concatenates its two streams
for the step): pruning is one gather, the text and image matchings share one similarity matrix, and every merge
of both streams is one batched matmul. ``reduce(..., compiled=True)`` runs the same step as one
``torch.compile(fullgraph=True, dynamic=False)`` region per plan (a few fused kernels instead of a few dozen ops).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .merge import layout, match_slots, merge_by_slots, remap
from .prune import topk_keep_index
from .schedule import LayerPlan
from .static import cached, flat_offsets, positions


@dataclass
class ReductionState:
    """The two token streams between cross-modal layers, held as one sequence ``[text; image]``.

    Attributes:
        tokens: (B, Lt + Ni, C) text tokens (right-padded, the text CLS first), then image tokens (the image CLS
            first).
        size: (B, Lt + Ni) how many original tokens each token stands for (pads count 1).
        real: (B, Lt + Ni) bool: real text tokens and every image token (the key mask of attention over both).
        n_real: (B,) long, real text tokens per example.
        n_text: Lt, the text part's length.
        patch_map: (B, Ni_original) current image index of each original image token, -1 once pruned; None
            unless tracked.
        text_map: (B, Lt_original) current text index of each original text token, -1 once dropped; None unless
            tracked.
    """

    tokens: Tensor
    size: Tensor
    real: Tensor
    n_real: Tensor
    n_text: int
    patch_map: Tensor | None = None
    text_map: Tensor | None = None

    @classmethod
    def init(cls, image: Tensor, text: Tensor, text_mask: Tensor, track_maps: bool = False) -> ReductionState:
        """From separate streams (``text_mask`` (B, Lt), 1 for real tokens, right padding)."""
        return cls.init_joint(torch.cat([text, image], dim=1), text.shape[1], text_mask, track_maps)

    @classmethod
    def init_joint(
        cls, tokens: Tensor, n_text: int, text_mask: Tensor, track_maps: bool = False
    ) -> ReductionState:
        """From the joint sequence ``[text (n_text); image]``."""
        batch, n = tokens.shape[:2]
        device = tokens.device
        real = torch.nn.functional.pad(text_mask != 0, (0, n - n_text), value=True)
        maps = None, None
        if track_maps:
            maps = (
                torch.arange(n - n_text, device=device).expand(batch, -1).clone(),
                torch.arange(n_text, device=device).expand(batch, -1).clone(),
            )
        return cls(
            tokens=tokens,
            size=torch.ones(batch, n, device=device),
            real=real,
            n_real=real[:, :n_text].sum(dim=1),
            n_text=n_text,
            patch_map=maps[0],
            text_map=maps[1],
        )

    @property
    def text(self) -> Tensor:
        return self.tokens[:, : self.n_text]

    @property
    def image(self) -> Tensor:
        return self.tokens[:, self.n_text :]

    @property
    def text_size(self) -> Tensor:
        return self.size[:, : self.n_text]

    @property
    def image_size(self) -> Tensor:
        return self.size[:, self.n_text :]

    @property
    def text_mask(self) -> Tensor:
        """(B, Lt) int64, 1 for real text tokens; always binary."""
        return self.real[:, : self.n_text].long()


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


def _step(
    tokens: Tensor,
    size: Tensor,
    n_real: Tensor,
    scores: Tensor | None,
    metric: Tensor | None,
    plan: LayerPlan,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """The whole step on plain tensors (what `torch.compile` captures).

    Returns ``(tokens, size, real, n_real, rows, slot)``: the reduced joint sequence, its sizes, key mask and real
    text counts, and how inputs moved: ``rows`` (B, n) the input token kept by pruning at each position, as a row of
    the flattened (B * n_in) batch (None: all kept), ``slot`` (B, n) the output slot of each of them (None: no
    merging).
    """
    n_text = plan.text_in
    rows = None
    if plan.n_prune or (plan.partition == "score" and plan.n_merge):
        keep = topk_keep_index(scores, plan.image_kept, plan.partition)
        if plan.partition == "score" and plan.n_merge:
            col = torch.cat([positions(n_text, keep.device).expand(keep.shape[0], -1), keep + n_text], dim=1)
            metric = metric.gather(1, col[..., None].expand(-1, -1, metric.shape[-1]))
            return _score_order_step(tokens, size, n_real, metric, plan, col)
        rows = _kept_rows(keep, n_text, tokens.shape[1])
        flat = rows.flatten()
        tokens = _take_rows(tokens, flat)
        size = size.flatten().index_select(0, flat).view(rows.shape)
        if metric is not None:
            metric = _take_rows(metric, flat)
    if not (plan.n_merge or plan.n_text_merge):
        real = torch.nn.functional.pad(
            positions(n_text, tokens.device) < n_real[:, None], (0, plan.image_out), value=True
        )
        return tokens, size, real, n_real, rows, None
    slot, n_real, _ = match_slots(metric, n_real, plan, plan.image_kept)
    return _merge(tokens, size, n_real, slot, plan, rows)


def _kept_rows(keep: Tensor, n_text: int, n: int) -> Tensor:
    """(B, n_text + K) rows of the flattened (B * n) batch: every text token, then the kept image tokens ``keep``
    (B, K) (image positions), with one addition and one concatenation (the text rows are a cached constant)."""
    batch, device = keep.shape[0], keep.device

    def text_rows(dev: torch.device) -> Tensor:
        return torch.tensor(
            [[b * n + t for t in range(n_text)] for b in range(batch)], dtype=torch.long, device=dev
        )

    def image_offsets(dev: torch.device) -> Tensor:
        return torch.tensor([[b * n + n_text] for b in range(batch)], dtype=torch.long, device=dev)

    key = (batch, n, n_text)
    text = cached(("text_rows", *key), device, text_rows)
    return torch.cat([text, keep + cached(("image_offsets", *key), device, image_offsets)], dim=1)


def _take_rows(x: Tensor, rows: Tensor) -> Tensor:
    """``x`` (B, n, D) at the flattened ``rows`` (`_kept_rows`): one row copy per token (a gather along dim 1
    with an expanded index walks every element)."""
    return x.flatten(0, 1).index_select(0, rows).view(x.shape[0], -1, x.shape[-1])


def _merge(
    tokens: Tensor, size: Tensor, n_real: Tensor, slot: Tensor, plan: LayerPlan, rows: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor]:
    n_out = plan.text_out + plan.image_out
    tokens, size = merge_by_slots(tokens, size, slot, n_out)
    real = layout(plan.text_out, plan.image_out, tokens.device).text_pos < n_real[:, None]
    return tokens, size, real, n_real, rows, slot


def _score_order_step(
    tokens: Tensor, size: Tensor, n_real: Tensor, metric: Tensor, plan: LayerPlan, col: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor]:
    """Matching over the kept image tokens in descending-score order (the official partition), outputs in order.

    ``col`` lists the kept image tokens by score, so sets A/B alternate in that order; the image outputs are
    then renumbered by the original position of the token each one is kept as (the one that is not a source).
    """
    n_text, text_out = plan.text_in, plan.text_out
    slot, n_real, is_src = match_slots(metric, n_real, plan, plan.image_kept)
    image_slot = slot[:, n_text:] - text_out  # (B, K): slot among the image outputs, numbered in score order
    beyond = col.shape[1] + plan.image_in
    anchor = col[:, n_text:].masked_fill(is_src[:, n_text:], beyond)
    first = torch.full((slot.shape[0], plan.image_out), beyond, dtype=col.dtype, device=col.device)
    first = first.scatter_reduce(1, image_slot, anchor, reduce="amin", include_self=True)
    renumber = first.argsort(dim=1).argsort(dim=1)
    slot = torch.cat([slot[:, :n_text], renumber.gather(1, image_slot) + text_out], dim=1)
    tokens = tokens.gather(1, col[..., None].expand(-1, -1, tokens.shape[-1]))
    rows = col + flat_offsets(col.shape[0], n_text + plan.image_in, col.device)  # for `_remap`
    return _merge(tokens, size.gather(1, col), n_real, slot, plan, rows)


@functools.cache
def _compiled_step():
    # One graph per plan (the plan's counts are Python ints, shapes are static); allow the handful a model uses at
    # a few batch sizes and text lengths.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(_step, fullgraph=True, dynamic=False)


COMPILE_SECONDS: dict[LayerPlan, float] = {}
"""Wall time of the first (compiling) call of the compiled step, per plan: compile time is paid once."""


def reduce(
    state: ReductionState,
    plan: LayerPlan,
    *,
    scores: Tensor | None = None,
    metric: Tensor | None = None,
    compiled: bool = False,
) -> ReductionState:
    """Apply one reduction step with the counts of ``plan``.

    Args:
        state: the token streams entering the step.
        plan: the counts, from `ReducerSchedule.step`.
        scores: (B, Ni) importance of each image token (needed when the plan prunes, or merges in score order).
        metric: (B, Lt + Ni, D) similarity features of the joint sequence (needed when the plan merges).
        compiled: run the step as one compiled region (`torch.compile`, one graph per plan).
    Returns:
        The reduced state.
    """
    n_image, n_text = state.tokens.shape[1] - state.n_text, state.n_text
    if (n_image, n_text) != (plan.image_in, plan.text_in):
        raise ValueError(
            f"reduce: state has {n_image} image / {n_text} text tokens but the plan for layer {plan.layer} "
            f"expects {plan.image_in} / {plan.text_in}"
        )
    if scores is None and (plan.n_prune or (plan.partition == "score" and plan.n_merge)):
        raise ValueError(
            "reduce: the plan prunes image tokens (or merges in score order) but no scores were given"
        )
    if metric is None and (plan.n_merge or plan.n_text_merge):
        raise ValueError("reduce: the plan merges tokens but no similarity metric was given")
    if plan.image_out == n_image and plan.text_out == n_text:
        return state
    if compiled:
        step = _compiled_step()
        first = plan not in COMPILE_SECONDS
        start = time.perf_counter()
        if (
            first
        ):  # an eager warm-up builds the plan's constants, which the compiled graph then takes as inputs
            _step(state.tokens, state.size, state.n_real, scores, metric, plan)
        out = step(state.tokens, state.size, state.n_real, scores, metric, plan)
        if first:
            COMPILE_SECONDS[plan] = time.perf_counter() - start
    else:
        out = _step(state.tokens, state.size, state.n_real, scores, metric, plan)
    tokens, size, real, n_real, rows, slot = out
    patch_map, text_map = state.patch_map, state.text_map
    if patch_map is not None or text_map is not None:
        patch_map, text_map = _remap(state, plan, rows, slot)
    return replace(
        state,
        tokens=tokens,
        size=size,
        real=real,
        n_real=n_real,
        n_text=plan.text_out,
        patch_map=patch_map,
        text_map=text_map,
    )


def _remap(
    state: ReductionState, plan: LayerPlan, rows: Tensor | None, slot: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """Carry the original-token maps through a step (visualisation only; eager)."""
    batch, n_in = state.real.shape
    n_out = plan.text_out + plan.image_out
    col = None if rows is None else rows - flat_offsets(batch, n_in, rows.device)
    if slot is None:  # pruning only: kept tokens keep their order
        slot = positions(col.shape[1], col.device).expand(batch, -1)
    moved = slot
    if col is not None:  # positions of the step's input -> output slot (pruned -> n_out)
        moved = torch.full((batch, n_in), n_out, dtype=slot.dtype, device=slot.device).scatter(1, col, slot)
    patch_map = (
        None
        if state.patch_map is None
        else remap(state.patch_map, moved, (plan.text_in, plan.text_out), n_out)
    )
    text_map = None if state.text_map is None else remap(state.text_map, moved, (0, 0), n_out)
    return patch_map, text_map
