"""Bipartite soft matching (ToMe) over the joint ``[text; image]`` sequence, and size-weighted merging as one matmul.

One reduction step matches text and image tokens together, in one similarity matrix, with every per-layer
constant (which pairs may match, which positions are text, the per-length text counts) built once per plan and
cached, so a step dispatches a few dozen small ops instead of a hundred (each op is a kernel launch on a GPU).

Every merge is described by ``slot`` (B, n): the output position each input token goes to. Tokens that share a
slot are averaged, weighted by their sizes; a slot equal to ``n_out`` means "drop" (used for padding). Surviving
tokens keep their original relative order, which keeps the image CLS and the text CLS at position 0 of their
stream and keeps text in reading order (the official code scrambles it: docs/official_code_differences.md#b13).

Layout assumptions (the backbones guarantee them): text is right-padded, so an example's ``R`` real tokens are
positions ``0..R-1``; the image CLS is the first image token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .schedule import LayerPlan
from .static import cached, flat_rows, positions


def count_table(plan: LayerPlan, n_image: int, device: torch.device) -> Tensor:
    """(text_in + 1, n + 2) long, row ``R`` for an example with ``R`` real text tokens (``n = text_in + n_image``):
    how many sources each token's stream gives up (``n`` entries: the real text tokens it merges at text positions,
    ``plan.n_merge`` at image positions), then its first dropped text position, then its real text tokens left.

    Pads are dropped from the end of the text, so "first dropped position" is ``text_in - pads dropped``.
    """

    def build(dev: torch.device) -> Tensor:
        rows = []
        for n_real in range(plan.text_in + 1):
            merged, dropped = plan.text_counts(n_real)
            quota = [merged] * plan.text_in + [plan.n_merge] * n_image
            rows.append((*quota, plan.text_in - dropped, n_real - merged))
        return torch.tensor(rows, dtype=torch.long, device=dev)

    key = (
        "counts",
        plan.text_in,
        plan.n_text_merge,
        plan.text_ratio,
        plan.text_policy,
        n_image,
        plan.n_merge,
    )
    return cached(key, device, build)


@dataclass(frozen=True)
class Layout:
    """Per-plan constants of the joint sequence ``[text (n_text); image (n_image)]``.

    Attributes:
        text_pos: (n,) position of each text token, -1 for image tokens (``text_pos < R`` marks real text).
        blocked: (n, n) fp32, 0 for a pair the bipartite matching may join whatever the text's length (an A token
            and a B token of the same stream), -inf otherwise: added to the similarities in the matmul that computes
            them. A = even positions after the CLS, B = odd positions, counted within each stream.
        text_pairs: (n_text, n_text) long, for an allowed (A, B) text pair the larger of the two positions, else
            ``n_text + 1``: ``text_pairs >= R`` blocks the pairs that involve a pad of an example with ``R`` real
            tokens.
        pos: (n,) ``0..n-1``.
        same: (n, n) bool, both tokens in the same stream.
        earlier: (n, n) bool, token j precedes token i in the same stream (breaks ties when ranking).
    """

    text_pos: Tensor
    blocked: Tensor
    text_pairs: Tensor
    pos: Tensor
    same: Tensor
    earlier: Tensor


def layout(n_text: int, n_image: int, device: torch.device) -> Layout:
    """The constants of a joint sequence of ``n_text`` text and ``n_image`` image tokens (built in Python, once)."""
    n = n_text + n_image

    def text_pos(dev: torch.device) -> Tensor:
        within, is_text, _, _ = _roles(n_text, n_image)
        return torch.tensor([w if t else -1 for w, t in zip(within, is_text)], dtype=torch.long, device=dev)

    def blocked(dev: torch.device) -> Tensor:
        ok = _allowed(n_text, n_image)
        rows = [[0.0 if ok(i, j) else float("-inf") for j in range(n)] for i in range(n)]
        return torch.tensor(rows, dtype=torch.float32, device=dev)

    def text_pairs(dev: torch.device) -> Tensor:
        ok = _allowed(n_text, n_image)
        rows = [[max(i, j) if ok(i, j) else n_text + 1 for j in range(n_text)] for i in range(n_text)]
        return torch.tensor(rows, dtype=torch.long, device=dev)

    def same(dev: torch.device) -> Tensor:
        is_text = _roles(n_text, n_image)[1]
        rows = [[is_text[i] == is_text[j] for j in range(n)] for i in range(n)]
        return torch.tensor(rows, dtype=torch.bool, device=dev)

    def earlier(dev: torch.device) -> Tensor:
        is_text = _roles(n_text, n_image)[1]
        rows = [[is_text[i] == is_text[j] and j < i for j in range(n)] for i in range(n)]
        return torch.tensor(rows, dtype=torch.bool, device=dev)

    key = (n_text, n_image)
    return Layout(
        cached(("text_pos", *key), device, text_pos),
        cached(("blocked", *key), device, blocked),
        cached(("text_pairs", *key), device, text_pairs),
        positions(n, device),
        cached(("same", *key), device, same),
        cached(("earlier", *key), device, earlier),
    )


def _allowed(n_text: int, n_image: int) -> Callable[[int, int], bool]:
    """Whether the matching may join token ``i`` (an A token) to token ``j`` (a B token of the same stream)."""
    _, is_text, is_a, is_b = _roles(n_text, n_image)
    return lambda i, j: is_a[i] and is_b[j] and is_text[i] == is_text[j]


def _roles(n_text: int, n_image: int) -> tuple[list[int], list[bool], list[bool], list[bool]]:
    """Each token's position inside its own stream, whether it is text, and its role in the matching (A: 2, 4, ...;
    B: 1, 3, ...); computed only when a constant is built, never on a step that finds them cached."""
    within = [*range(n_text), *range(n_image)]
    is_text = [True] * n_text + [False] * n_image
    is_a = [w % 2 == 0 and w > 0 for w in within]
    is_b = [w % 2 == 1 for w in within]
    return within, is_text, is_a, is_b


def _stream_ranks(values: Tensor, lay: Layout, n_text: int) -> Tensor:
    """Rank (0 = largest) of every entry of (B, n) ``values`` within its stream; ties broken by position.

    Eager: two stable sorts per stream (the fewest ops). Compiled: counted from a comparison matrix instead, which
    inductor fuses into one reduction kernel where sorts would stay separate library calls. Both give the same
    ranks.
    """
    if torch.compiler.is_compiling():
        above = values[:, None, :] > values[:, :, None]
        tied_before = (values[:, None, :] == values[:, :, None]) & lay.earlier
        return ((above & lay.same) | tied_before).sum(dim=-1)
    streams = (values[:, :n_text], values[:, n_text:])
    return torch.cat([v.argsort(dim=1, descending=True, stable=True).argsort(dim=1) for v in streams], dim=1)


@torch.no_grad()
def match_slots(
    metric: Tensor, n_real: Tensor, plan: LayerPlan, n_image: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Bipartite soft matching of text and image tokens in one pass.

    Within each stream, tokens alternate between set A (even positions after the CLS) and set B (odd positions);
    an A token may merge into its most similar (cosine of ``metric``) B token of the same stream. The image stream
    gives up its ``plan.n_merge`` best-matched A tokens; each example's text gives up the ``merged`` best of its
    real A tokens (never a pad, and no real token absorbs a pad) and drops its last ``dropped`` pads, with
    ``(merged, dropped) = plan.text_counts(R)``.

    Args:
        metric: (B, n_text + n_image, D) similarity features, text first.
        n_real: (B,) real text tokens per example.
        plan: the step's counts (text side: ``text_in``, ``n_text_merge``, the policy).
        n_image: image tokens in ``metric`` (after pruning).
    Returns:
        ``(slot, n_real_out, is_src)``: (B, n) output slots into ``n_out = text_out + n_image - n_merge`` outputs
        (``n_out`` = dropped), (B,) real text tokens left, and (B, n) which tokens merged into another.
    """
    n_text = plan.text_in
    n_out = plan.text_out + n_image - plan.n_merge
    lay = layout(n_text, n_image, metric.device)
    counts = count_table(plan, n_image, metric.device).index_select(0, n_real)  # (B, n + 2)
    quota, first_drop, n_left = counts[:, : n_text + n_image], counts[:, -2:-1], counts[:, -1]
    unit = metric.float()
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    # similarities with every pair the layout rules out at -inf (one op), then the text pairs that involve a pad
    sim = torch.baddbmm(lay.blocked, unit, unit.transpose(1, 2))
    sim[:, :n_text, :n_text].masked_fill_(lay.text_pairs >= n_real[:, None, None], float("-inf"))
    best, partner = sim.max(dim=-1)
    is_src = _stream_ranks(best, lay, n_text) < quota
    drop = lay.text_pos >= first_drop
    kept_slot = lay.pos - (is_src | drop).cumsum(dim=1)
    slot = torch.where(is_src, kept_slot.gather(1, partner), kept_slot).masked_fill_(drop, n_out)
    return slot, n_left, is_src


def merge_by_slots(x: Tensor, size: Tensor, slot: Tensor, n_out: int) -> tuple[Tensor, Tensor]:
    """Size-weighted average of the tokens that share a slot; slot ``n_out`` is discarded.

    On a CPU the sums are index additions over the flattened batch (work proportional to the tokens); on other
    devices one batched matmul with a (B, n_out, N) weight matrix (one deterministic kernel, where an index addition
    would add in a varying order).

    Args:
        x: (B, N, C) token features.
        size: (B, N) how many original tokens each token stands for.
        slot: (B, N) output slot of each token, in ``[0, n_out]``.
    Returns:
        ``(x_out (B, n_out, C), size_out (B, n_out))``; sizes add up, features are size-weighted means (a token
        alone in its slot comes out bit-identical).
    """
    if x.device.type != "cpu":
        return merge_by_matmul(x, size, slot, n_out)
    batch, _, channels = x.shape
    rows = flat_rows(slot, n_out + 1)  # every example's slot n_out is a row of its own, left out at the end
    new_size = size.new_zeros(batch * (n_out + 1)).index_add_(0, rows, size.flatten())
    weights = size.flatten() / new_size.index_select(0, rows)  # exactly 1 for a token alone in its slot
    out = x.new_zeros(batch * (n_out + 1), channels)
    out = out.index_add_(0, rows, x.flatten(0, 1) * weights[:, None].to(x.dtype))
    return out.view(batch, n_out + 1, channels)[:, :n_out], new_size.view(batch, n_out + 1)[:, :n_out]


def merge_by_matmul(x: Tensor, size: Tensor, slot: Tensor, n_out: int) -> tuple[Tensor, Tensor]:
    """`merge_by_slots` as one batched matmul (any device): (B, n_out, N) size-weighted, fp32-normalised weights."""
    n_slots = positions(n_out, slot.device)
    weights = torch.where(n_slots[:, None] == slot[:, None, :], size[:, None, :], 0.0)  # (B, n_out, N)
    new_size = weights.sum(dim=-1)
    weights = weights / new_size[..., None]
    return torch.bmm(weights.to(x.dtype), x), new_size


def key_metric(keys: Tensor) -> Tensor:
    """The similarity metric of the matching: (B, H, N, D) attention keys summed over heads, in fp32, (B, N, D).

    The sum is the head mean up to a constant factor, which the cosine similarity ignores; accumulating in fp32
    spares half-precision keys a rounding (and the copy to fp32 that the matching would make).
    """
    return keys.sum(dim=1, dtype=torch.float32)


def remap(token_map: Tensor, moved: Tensor, offset: tuple[int, int], n_out: int) -> Tensor:
    """Update a map from original tokens to current positions (-1 = removed) after a step.

    Args:
        token_map: (B, N0) current index of each original token within its stream, -1 once removed.
        moved: (B, n_in) output slot of each current joint position (``n_out`` = removed).
        offset: the stream's first joint position before (text 0, image ``text_in``) and after the step.
    """
    slot = moved.gather(1, token_map.clamp(min=0) + offset[0])
    gone = (token_map < 0) | (slot == n_out)
    return (slot - offset[1]).masked_fill(gone, -1)


def size_bias(size: Tensor) -> Tensor:
    """Proportional attention bias: ``log(size)`` per key, to add to attention logits (B, N)."""
    return size.float().log()
