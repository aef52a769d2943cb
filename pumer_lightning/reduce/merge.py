"""Bipartite soft matching (ToMe) expressed as output slots, and size-weighted merging.

Every merge is described by ``slot`` (B, N): the output position each input token goes to. Tokens that share a
slot are averaged, weighted by their sizes; a slot equal to ``n_out`` means "drop" (used for padding). Surviving
tokens keep their original relative order, which keeps the image CLS and the text CLS at position 0 and keeps
text in reading order (official bug B13 scrambled it: docs/official_code_differences.md#b13).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .schedule import round_count_tensor


def _rank_of(values: Tensor) -> Tensor:
    """Rank (0 = largest) of every entry along the last dim; ties broken by position."""
    order = values.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(values.shape[-1], device=values.device).expand_as(order))
    return ranks


def _slots(keep: Tensor, is_src: Tensor, partner: Tensor, drop: Tensor | None, n_out: int) -> Tensor:
    """Slot of each token: kept tokens in order, sources follow their partner, dropped tokens go to ``n_out``."""
    kept_slot = keep.long().cumsum(dim=1) - 1
    slot = torch.where(is_src, kept_slot.gather(1, partner), kept_slot)
    if drop is not None:
        slot = slot.masked_fill(drop, n_out)
    return slot


@torch.no_grad()
def image_merge_slots(metric: Tensor, n_merge: int) -> Tensor:
    """Bipartite soft matching over image tokens with the image CLS (index 0) protected.

    Tokens alternate between set A (even positions) and set B (odd positions); the ``n_merge`` A tokens most
    similar (cosine of ``metric``) to some B token merge into it.

    Args:
        metric: (B, N, D) similarity features (head-averaged attention keys).
        n_merge: how many tokens to remove; at most ``(N - 1) // 2``.
    Returns:
        (B, N) slots into ``N - n_merge`` outputs.
    """
    batch, n = metric.shape[:2]
    if not 0 <= n_merge <= (n - 1) // 2:
        raise ValueError(f"image_merge_slots: n_merge={n_merge} outside [0, {(n - 1) // 2}] for {n} tokens")
    metric = F.normalize(metric.float(), dim=-1)
    a, b = metric[:, ::2], metric[:, 1::2]
    sim = a @ b.transpose(-1, -2)
    sim[:, 0] = float("-inf")  # the image CLS never merges
    best, best_b = sim.max(dim=-1)
    src_a = _rank_of(best) < n_merge  # (B, Na)
    is_src = torch.zeros(batch, n, dtype=torch.bool, device=metric.device)
    is_src[:, ::2] = src_a
    partner = torch.zeros(batch, n, dtype=torch.long, device=metric.device)
    partner[:, ::2] = 2 * best_b + 1
    return _slots(~is_src, is_src, partner, None, n - n_merge)


@torch.no_grad()
def text_merge_slots(metric: Tensor, mask: Tensor, n_remove: int, ratio: float) -> Tensor:
    """Pad-aware bipartite matching over text tokens.

    Each example merges ``min(round(ratio * R), (R - 1) // 2)`` of its ``R`` real tokens (the first real token,
    the text CLS, never merges; a real token never absorbs a pad) and drops pads for the rest of the
    ``n_remove`` tokens the batch gives up. What happens to an example's real tokens therefore depends only on
    that example, not on its batch's padding.

    Args:
        metric: (B, L, D) similarity features (head-averaged attention keys).
        mask: (B, L) 1 for real tokens.
        n_remove: tokens every example gives up; at most ``(L - 1) // 2``.
        ratio: the schedule's ``text_merge_ratio``.
    Returns:
        (B, L) slots into ``L - n_remove`` outputs, ``L - n_remove`` meaning "dropped pad".
    """
    batch, length = mask.shape
    if not 0 <= n_remove <= (length - 1) // 2:
        raise ValueError(
            f"text_merge_slots: n_remove={n_remove} outside [0, {(length - 1) // 2}] for {length}"
        )
    real = mask.bool()
    n_real = real.sum(dim=1)
    n_merge = torch.minimum(round_count_tensor(ratio, n_real), (n_real - 1).clamp(min=0) // 2)
    n_merge = n_merge.clamp(max=n_remove)
    n_drop = n_remove - n_merge  # <= number of pads, see schedule.py

    real_rank = real.long().cumsum(dim=1) - 1
    in_a = real & (real_rank % 2 == 0) & (real_rank > 0)
    in_b = real & (real_rank % 2 == 1)
    metric = F.normalize(metric.float(), dim=-1)
    sim = metric @ metric.transpose(-1, -2)
    sim = sim.masked_fill(~(in_a[:, :, None] & in_b[:, None, :]), float("-inf"))
    best, partner = sim.max(dim=-1)
    is_src = in_a & (_rank_of(best) < n_merge[:, None])

    pad = ~real
    pad_rank_from_end = pad.long().flip(1).cumsum(dim=1).flip(1) - 1
    drop = pad & (pad_rank_from_end < n_drop[:, None])
    return _slots(~(is_src | drop), is_src, partner, drop, length - n_remove)


def merge_by_slots(x: Tensor, size: Tensor, slot: Tensor, n_out: int) -> tuple[Tensor, Tensor]:
    """Size-weighted average of the tokens that share a slot; slot ``n_out`` is discarded.

    Args:
        x: (B, N, C) token features.
        size: (B, N) how many original tokens each token stands for.
        slot: (B, N) output slot of each token, in ``[0, n_out]``.
    Returns:
        ``(x_out (B, n_out, C), size_out (B, n_out))``; sizes add up, features are size-weighted means.
    """
    batch, n, channels = x.shape
    work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    flat = (slot + torch.arange(batch, device=slot.device)[:, None] * (n_out + 1)).reshape(-1)
    weighted = (x.to(work) * size.to(work)[..., None]).reshape(batch * n, channels)
    total = torch.zeros(batch * (n_out + 1), channels, dtype=work, device=x.device).index_add_(
        0, flat, weighted
    )
    new_size = torch.zeros(batch * (n_out + 1), dtype=size.dtype, device=x.device).index_add_(
        0, flat, size.reshape(-1)
    )
    total = total.view(batch, n_out + 1, channels)[:, :n_out]
    new_size = new_size.view(batch, n_out + 1)[:, :n_out]
    return (total / new_size.to(work)[..., None]).to(x.dtype), new_size


def gather_slot_max(values: Tensor, slot: Tensor, n_out: int) -> Tensor:
    """Per-slot maximum of integer ``values`` (B, N), e.g. to carry a binary mask through a merge."""
    out = torch.zeros(values.shape[0], n_out + 1, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(1, slot, values, reduce="amax", include_self=True)[:, :n_out]


def remap_through_slots(token_map: Tensor, slot: Tensor, n_out: int) -> Tensor:
    """Update a map from original tokens to current positions after a merge (-1 = removed)."""
    moved = slot.gather(1, token_map.clamp(min=0))
    moved = moved.masked_fill(moved == n_out, -1)
    return torch.where(token_map >= 0, moved, token_map)


def size_bias(size: Tensor) -> Tensor:
    """Proportional attention bias: ``log(size)`` per key, to add to attention logits (B, N)."""
    return size.float().log()
