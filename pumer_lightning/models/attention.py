"""Multi-head attention pieces shared by the ViLT and METER backbones.

Both backbones run attention through `scaled_dot_product_attention` ("sdpa", fused kernels) or an explicit
matmul + softmax ("eager", kept for parity tests). Masks and proportional attention enter as one additive
float bias per key, so the two paths compute the same function.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

AttnImpl = Literal["sdpa", "eager"]
ATTN_IMPLS = ("sdpa", "eager")


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, N, C) -> (B, H, N, C / H)."""
    batch, n, channels = x.shape
    return x.view(batch, n, num_heads, channels // num_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, N, D) -> (B, N, H * D)."""
    batch, heads, n, dim = x.shape
    return x.transpose(1, 2).reshape(batch, n, heads * dim)


def key_bias(mask: Tensor | None, size: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Additive attention bias per key, shaped (B, 1, 1, N) to broadcast over heads and queries.

    Args:
        mask: (B, N) 1/True for keys that may be attended, or None when every key is valid.
        size: (B, N) token sizes for proportional attention (adds ``log size``), or None.
        dtype: the dtype of the attention logits (the query dtype, which autocast may have lowered).
    Returns:
        None when there is nothing to add (lets SDPA pick its fastest kernel).
    """
    if mask is None and size is None:
        return None
    bias = None
    if size is not None:
        bias = size.to(torch.float32).log()
    if mask is not None:
        blocked = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        blocked = blocked.masked_fill(~mask.bool(), torch.finfo(dtype).min)
        bias = blocked if bias is None else bias + blocked
    return bias.clamp(min=torch.finfo(dtype).min).to(dtype)[:, None, None, :]


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, dropout_p: float, impl: AttnImpl) -> Tensor:
    """Softmax attention of (B, H, Lq, D) queries over (B, H, N, D) keys/values with an additive key bias."""
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if bias is not None:
        scores = scores + bias
    probs = scores.softmax(dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


def check_attn_impl(impl: str) -> AttnImpl:
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
    return impl  # type: ignore[return-value]
