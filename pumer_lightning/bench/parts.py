"""The parts of a task model that the training-memory bound weighs: every block before and after its reduction,
the tail, and the unreduced rest (`part_of`), and the tokens each part sees under a schedule (`tokens_by_part`)."""

from __future__ import annotations

import re

_BLOCK = re.compile(r"^backbone\.(?:(encoder\.layer)|cross_modal_(text|image)_layers)\.(\d+)(?:\.(\w+))?")
_TAIL = re.compile(r"^(?:head|backbone\.(?:layernorm|pooler|cross_modal_\w+_pooler))(?:\.|$)")
_POST = ("layernorm_after", "intermediate", "output")  # the modules of a block that run after its reduction
_PART = re.compile(r"^(\d+)([ti]?)(\+?)$")


def part_of(name: str) -> str:
    """The part of the task model a module belongs to, for attributing what is saved for backward.

    Block ``l`` of ViLT (``backbone.encoder.layer.l``) is split at its reduction: ``"l"`` (norm and attention,
    before it) and ``"l+"`` (norm and MLP, after it). METER's text layer ``l`` likewise gives ``"lt"`` (self- and
    cross-attention, before the reduction) and ``"lt+"`` (its MLP, after it), and its image layer ``"li+"`` (it
    runs on the reduced image tokens). Ops between module calls belong to the last module entered. ``"tail"``: the final norm,
    the poolers and the head; ``"other"``: everything before the blocks (embeddings, METER's unimodal towers).
    """
    match = _BLOCK.match(name)
    if match:
        vilt, stream, layer, sub = match.groups()
        post = "+" if sub in _POST else ""
        if vilt:
            return f"{layer}{post}"
        return f"{layer}i+" if stream == "image" else f"{layer}t{post}"
    return "tail" if _TAIL.match(name) else "other"


def tokens_by_part(
    schedule, n_image: int, n_text: int, num_layers: int, passes: int, parts: list[str]
) -> dict[str, int]:
    """Tokens each part (`part_of`) sees in one forward of ``passes`` backbone passes, from the schedule's plan.

    A part before the reduction of block ``l`` sees the tokens entering it, a part after it those leaving it
    (entering block ``l + 1``); METER's ``lt+`` counts the text stream only and ``li+`` the image stream only,
    while ``lt`` counts both (its cross-attention reads the image tokens); the tail sees what leaves the last
    block. Parts without a count (``other``) are left out.
    """
    if schedule is None:
        image, text = [n_image] * (num_layers + 1), [n_text] * (num_layers + 1)
    else:
        image, text = schedule.tokens_per_layer(n_image, n_text, num_layers + 1)
    out: dict[str, int] = {}
    for part in parts:
        if part == "tail":
            out[part] = passes * (image[num_layers] + text[num_layers])
            continue
        match = _PART.match(part)
        if not match:
            continue
        layer, stream, post = int(match.group(1)), match.group(2), match.group(3)
        idx = layer + 1 if post else layer
        count = {
            "": image[idx] + text[idx],
            "t": text[idx] if post else image[idx] + text[idx],
            "i": image[idx],
        }
        out[part] = passes * count[stream]
    return out


def part_key(part: str) -> tuple:
    """Sort key of a part: everything before the blocks, then the blocks in order, then the tail."""
    match = _PART.match(part)
    if match:
        return (1, int(match.group(1)), match.group(2), match.group(3))
    return (0,) if part == "other" else (2,)
