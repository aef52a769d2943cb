"""The reducer schedule: where reducers sit and how many tokens each one removes.

All counting rules live in this file. The backbones ask `ReducerSchedule.step` for the counts of a layer and
the reducer applies exactly those counts, so `plan()` is always what the model does.

Counting rules, for a layer that receives ``n_image`` image tokens (image CLS included) and a text batch padded to
``n_text`` tokens (text CLS included). ``round`` is round-half-to-even, as in Python and the official code:

* pruned:   ``n_prune = round((1 - keep_ratio) * n_image)``; at least the image CLS and one more token survive.
* merged:   ``n_merge = min(round(merge_ratio * n_image), (kept - 1) // 2)``: the ratio is taken of the layer's
  input (as the official code does); bipartite matching can merge at most half of the non-CLS tokens, and the
  cap is applied here, visibly, instead of inside the matching.
* text:     ``n_text_merge = min(round(text_merge_ratio * n_text), (n_text - 1) // 2)`` tokens leave the padded
  text batch. How an example with ``R`` real tokens (and ``n_text - R`` pads) pays for them is the
  ``text_merge_policy``:

  - ``real``: it merges ``min(round(text_merge_ratio * R), (R - 1) // 2)`` of its real tokens and drops pads for
    the rest, so its result does not depend on how long its batch is padded;
  - ``pads_first``: it drops its pads first and merges ``max(n_text_merge - (n_text - R), 0)`` real tokens, only
    what its pads cannot cover. With texts padded to a fixed ``max_text_len`` (the official code's padding) this
    is a function of the example alone; with batch-longest padding it depends on the batch's longest text.

Counts are the same for every example of a batch (static shapes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

Importance = Literal["text", "cls", "random"]
IMPORTANCE_SOURCES = ("text", "cls", "random")
TextMergePolicy = Literal["real", "pads_first"]
TEXT_MERGE_POLICIES = ("real", "pads_first")
Partition = Literal["spatial", "score"]
PARTITIONS = ("spatial", "score")


def round_count(ratio: float, n: int) -> int:
    """``round(ratio * n)`` with Python's round-half-to-even (the official code's rounding)."""
    return int(round(ratio * n))


@dataclass(frozen=True)
class LayerPlan:
    """Token counts of one reduction step (static for the whole batch)."""

    layer: int
    image_in: int
    image_kept: int
    image_out: int
    text_in: int
    text_out: int
    text_ratio: float = 0.0
    """The schedule's text_merge_ratio: how many real tokens each example merges (the rest is padding dropped)."""
    text_policy: TextMergePolicy = "real"
    """The schedule's text_merge_policy: whether an example pays for ``n_text_merge`` with real tokens or pads first."""
    partition: Partition = "spatial"
    """The schedule's partition: the order in which surviving image tokens alternate between the two matching sets."""

    @property
    def n_prune(self) -> int:
        return self.image_in - self.image_kept

    @property
    def n_merge(self) -> int:
        return self.image_kept - self.image_out

    @property
    def n_text_merge(self) -> int:
        return self.text_in - self.text_out

    def text_counts(self, n_real: int) -> tuple[int, int]:
        """``(real tokens merged, pads dropped)`` for an example with ``n_real`` real tokens (right-padded)."""
        n_remove, n_pads = self.n_text_merge, self.text_in - n_real
        if self.text_policy == "pads_first":
            merged = max(n_remove - n_pads, 0)
        else:
            merged = min(round_count(self.text_ratio, n_real), max(n_real - 1, 0) // 2, n_remove)
        dropped = n_remove - merged
        if not (0 <= merged <= max(n_real - 1, 0) // 2 and 0 <= dropped <= n_pads):
            raise AssertionError(
                f"text counts {merged}/{dropped} impossible for {n_real} of {self.text_in} tokens"
            )
        return merged, dropped


@dataclass
class ReducerSchedule:
    """Where to reduce and by how much.

    Args:
        layers: 0-based indices of the blocks after whose attention a reducer runs (ViLT: transformer blocks
            0-11; METER: co-attention blocks 0-5, so PuMer's doubled "246" is ``[1, 2, 3]``).
        keep_ratio: fraction of the image tokens kept by text-informed pruning (1 - PuMer's ``p``), in (0, 1].
        merge_ratio: image tokens merged, as a fraction of the layer's input image tokens (PuMer's ``r``), in
            [0, 0.5]; capped at half of the non-CLS tokens left after pruning.
        text_merge_ratio: text tokens merged, as a fraction of the padded text length (PuMer's ``t``), in [0, 0.5].
        prop_attn: add ``log(size)`` of merged tokens to the attention logits of later layers (ToMe).
        importance: what ranks image tokens for pruning: ``text`` (text-to-image attention, PuMer), ``cls``
            (image-CLS attention) or ``random`` (an ablation baseline).
        text_merge_policy: how an example pays for the text tokens a step removes: ``real`` merges
            ``round(text_merge_ratio * R)`` of its ``R`` real tokens whatever its padding; ``pads_first`` gives up
            its pads first and merges real tokens only for the rest (closest to the official code, whose matching
            runs over texts padded to ``max_text_len``; pad to a fixed length for results that do not depend on
            the batch).
        partition: the order in which the surviving image tokens alternate between the two sets of bipartite
            matching: ``spatial`` (raster order, as ToMe) or ``score`` (descending importance, image CLS first,
            as the official PuMer code, whose released checkpoints were fine-tuned that way).
    """

    layers: list[int] = field(default_factory=list)
    keep_ratio: float = 1.0
    merge_ratio: float = 0.0
    text_merge_ratio: float = 0.0
    prop_attn: bool = False
    importance: Importance = "text"
    text_merge_policy: TextMergePolicy = "real"
    partition: Partition = "spatial"

    def __post_init__(self) -> None:
        layers = list(self.layers) if self.layers is not None else []
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ValueError(
                    f"ReducerSchedule.layers: expected non-negative block indices, got {layer!r}"
                )
        if len(set(layers)) != len(layers):
            raise ValueError(f"ReducerSchedule.layers: duplicate block index in {layers}")
        self.layers = sorted(layers)
        if not 0.0 < float(self.keep_ratio) <= 1.0:
            raise ValueError(f"ReducerSchedule.keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if not 0.0 <= float(self.merge_ratio) <= 0.5:
            raise ValueError(f"ReducerSchedule.merge_ratio must be in [0, 0.5], got {self.merge_ratio}")
        if not 0.0 <= float(self.text_merge_ratio) <= 0.5:
            raise ValueError(
                f"ReducerSchedule.text_merge_ratio must be in [0, 0.5], got {self.text_merge_ratio}"
            )
        if self.importance not in IMPORTANCE_SOURCES:
            raise ValueError(
                f"ReducerSchedule.importance must be one of {IMPORTANCE_SOURCES}, got {self.importance!r}"
            )
        if self.text_merge_policy not in TEXT_MERGE_POLICIES:
            raise ValueError(
                f"ReducerSchedule.text_merge_policy must be one of {TEXT_MERGE_POLICIES}, "
                f"got {self.text_merge_policy!r}"
            )
        if self.partition not in PARTITIONS:
            raise ValueError(f"ReducerSchedule.partition must be one of {PARTITIONS}, got {self.partition!r}")

    @classmethod
    def from_pumer(
        cls, p: float, r: float, t: float, layers: list[int], *, doubled: bool = False, **kwargs
    ) -> ReducerSchedule:
        """Build from the official notation: prune ratio ``p``, merge ``r``, text merge ``t`` and layer ids.

        ``doubled=True`` reads METER layer ids in the official code's doubled counter (block b is ``2b``).
        """
        if doubled:
            odd = [x for x in layers if x % 2]
            if odd:
                raise ValueError(f"doubled METER layer ids must be even, got {odd}")
            layers = [x // 2 for x in layers]
        return cls(
            layers=list(layers), keep_ratio=round(1.0 - p, 12), merge_ratio=r, text_merge_ratio=t, **kwargs
        )

    def __str__(self) -> str:
        """One line for logs and reports: ``keep 0.7 / merge 0.2 / text 0.2 @ [1, 2]`` (+ what differs from the
        defaults), or ``off`` when the schedule reduces nothing."""
        if not self.is_active:
            return "off"
        text = f"keep {self.keep_ratio:g} / merge {self.merge_ratio:g} / text {self.text_merge_ratio:g} @ {self.layers}"
        notes = [f"{self.importance} importance"] if self.importance != "text" else []
        if self.text_merge_ratio and self.text_merge_policy != "real":
            notes.append(f"text merge {self.text_merge_policy}")
        if self.merge_ratio and self.partition != "spatial":
            notes.append(f"{self.partition}-order partition")
        if self.prop_attn:
            notes.append("prop attn")
        return text + (f" ({', '.join(notes)})" if notes else "")

    @property
    def is_active(self) -> bool:
        """True when at least one layer would change a token count."""
        return bool(self.layers) and (
            self.keep_ratio < 1.0 or self.merge_ratio > 0 or self.text_merge_ratio > 0
        )

    def check_depth(self, num_layers: int, what: str = "backbone") -> None:
        """Raise if a scheduled block index does not exist in a model with ``num_layers`` reducible blocks."""
        bad = [x for x in self.layers if x >= num_layers]
        if bad:
            raise ValueError(
                f"ReducerSchedule.layers: block index {bad} out of range for {what} with {num_layers} "
                f"reducible blocks (valid: 0..{num_layers - 1})"
            )

    def step(self, layer: int, n_image: int, n_text: int) -> LayerPlan | None:
        """Counts for ``layer`` given the tokens entering it; None when the layer reduces nothing."""
        if layer not in self.layers:
            return None
        n_prune = round_count(round(1.0 - self.keep_ratio, 12), n_image)
        kept = max(n_image - n_prune, min(n_image, 2))
        n_merge = min(round_count(self.merge_ratio, n_image), max(kept - 1, 0) // 2)
        n_text_merge = min(round_count(self.text_merge_ratio, n_text), max(n_text - 1, 0) // 2)
        plan = LayerPlan(
            layer,
            n_image,
            kept,
            kept - n_merge,
            n_text,
            n_text - n_text_merge,
            float(self.text_merge_ratio),
            self.text_merge_policy,
            self.partition,
        )
        if plan.image_out == n_image and plan.text_out == n_text:
            return None
        return plan

    def plan(self, n_image: int, n_text: int) -> list[LayerPlan]:
        """Every reduction step of a forward pass that starts with ``n_image`` and ``n_text`` tokens."""
        steps = []
        for layer in self.layers:
            step = self.step(layer, n_image, n_text)
            if step is not None:
                steps.append(step)
                n_image, n_text = step.image_out, step.text_out
        return steps

    def tokens_per_layer(self, n_image: int, n_text: int, num_layers: int) -> tuple[list[int], list[int]]:
        """Image and text tokens entering each of ``num_layers`` blocks (what a `ReductionTrace` records).

        The reducer of block ``b`` acts inside the block, so its output is counted from block ``b + 1`` on.
        """
        image, text = [], []
        for layer in range(num_layers):
            image.append(n_image)
            text.append(n_text)
            step = self.step(layer, n_image, n_text)
            if step is not None:
                n_image, n_text = step.image_out, step.text_out
        return image, text


#: The ablations of a PuMer schedule, one meaning per name wherever a report uses it (bench, study, tune): each
#: changes one thing against the schedule it is applied to, at the same layers.
ABLATIONS: dict[str, tuple[str, dict]] = {
    "prune_only": (
        "text-informed pruning only: no image or text merging",
        {"merge_ratio": 0.0, "text_merge_ratio": 0.0},
    ),
    "merge_only": (
        "ToMe: image merging only, no pruning, no text merging",
        {"keep_ratio": 1.0, "text_merge_ratio": 0.0},
    ),
    "no_prune": ("image and text merging, no pruning", {"keep_ratio": 1.0}),
    "no_text_merge": ("no text merging", {"text_merge_ratio": 0.0}),
    "random_prune": ("image tokens pruned at random instead of by text attention", {"importance": "random"}),
    "cls_prune": (
        "image tokens pruned by the image CLS's attention instead of the text's",
        {"importance": "cls"},
    ),
}


def ablation(schedule: ReducerSchedule, name: str) -> ReducerSchedule:
    """``schedule`` with the one change that `ABLATIONS` names ``name`` (the original is not modified)."""
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation {name!r}; expected one of {sorted(ABLATIONS)}")
    return dataclasses.replace(schedule, layers=list(schedule.layers), **ABLATIONS[name][1])
