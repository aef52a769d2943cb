"""Importance of image tokens and top-k pruning with the image CLS protected.

Scores are computed in fp32 whatever the autocast dtype: rankings of near-equal fp16 probabilities are noise.
"""

from __future__ import annotations

import torch
from torch import Tensor


def attention_probs(
    q: Tensor, k: Tensor, key_mask: Tensor | None = None, bias: Tensor | None = None
) -> Tensor:
    """Softmax attention probabilities of a few query rows, in fp32.

    This is the one small extra matmul a backbone runs next to its fused attention kernel to get PuMer's
    importance without materialising the full attention matrix.

    Args:
        q: (B, H, Lq, D) queries (already projected, not scaled).
        k: (B, H, N, D) keys.
        key_mask: (B, N) bool or 0/1; False/0 keys get zero probability.
        bias: (B, N) additive logit bias (e.g. proportional attention's ``log size``).
    Returns:
        (B, H, Lq, N) fp32 probabilities.
    """
    scale = q.shape[-1] ** -0.5
    logits = torch.matmul(q.float() * scale, k.float().transpose(-1, -2))
    additive = None if bias is None else bias.float()
    if key_mask is not None:
        masked = torch.zeros(key_mask.shape, device=logits.device).masked_fill_(
            ~key_mask.bool(), float("-inf")
        )
        additive = masked if additive is None else additive + masked
    if additive is not None:
        logits += additive[:, None, None, :]
    return logits.softmax(dim=-1)


def text_importance(probs: Tensor, text_mask: Tensor) -> Tensor:
    """PuMer's text-informed importance: attention that real text tokens pay to each image token.

    Args:
        probs: (B, H, Lt, Ni) attention probabilities of the text queries over the image keys.
        text_mask: (B, Lt) 1 for real text tokens; padded query rows are excluded
            (official bug B5: docs/official_code_differences.md#b5).
    Returns:
        (B, Ni) fp32 scores: head mean, summed over real text rows, divided by the number of real rows.
    """
    weights = text_mask.to(torch.float32)
    per_row = probs.float().mean(dim=1)  # (B, Lt, Ni)
    total = torch.einsum("bt,bti->bi", weights, per_row)
    return total / weights.sum(dim=1, keepdim=True).clamp(min=1.0)


def cls_importance(probs: Tensor) -> Tensor:
    """Ablation: importance as the image CLS query's attention over the image tokens, head-averaged.

    Args:
        probs: (B, H, Ni) or (B, H, 1, Ni) probabilities of the image CLS query.
    """
    if probs.dim() == 4:
        probs = probs[:, :, 0]
    return probs.float().mean(dim=1)


def random_importance(
    batch: int,
    n_image: int,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Ablation: uniform random scores, so pruning keeps a random subset at the same budget."""
    return torch.rand(batch, n_image, device=device, generator=generator)


def topk_keep_index(scores: Tensor, n_keep: int) -> Tensor:
    """Indices (B, n_keep) of the image CLS (index 0) and the ``n_keep - 1`` best other tokens, in original order."""
    batch = scores.shape[0]
    rest = scores[:, 1:].float().topk(n_keep - 1, dim=1, sorted=False).indices + 1
    rest = rest.sort(dim=1).values
    cls = torch.zeros(batch, 1, dtype=rest.dtype, device=rest.device)
    return torch.cat([cls, rest], dim=1)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b]]`` for (B, N) or (B, N, C) tensors."""
    if x.dim() == 2:
        return x.gather(1, index)
    batch, n = x.shape[:2]
    flat = (index + torch.arange(batch, device=index.device)[:, None] * n).reshape(-1)
    return x.reshape(batch * n, -1).index_select(0, flat).view(batch, index.shape[1], *x.shape[2:])


def remap_after_gather(token_map: Tensor, index: Tensor, n_before: int) -> Tensor:
    """Update a map from original tokens to current positions after keeping ``index`` (-1 = removed)."""
    inverse = torch.full((index.shape[0], n_before), -1, dtype=torch.long, device=index.device)
    inverse.scatter_(1, index, torch.arange(index.shape[1], device=index.device).expand_as(index))
    moved = inverse.gather(1, token_map.clamp(min=0))
    return torch.where(token_map >= 0, moved, token_map)
