"""Importance of image tokens and top-k pruning with the image CLS protected.

Scores are computed in fp32 whatever the autocast dtype: rankings of near-equal fp16 probabilities are noise.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import Tensor

from .static import cached


def attention_probs(
    q: Tensor, k: Tensor, key_mask: Tensor | None = None, bias: Tensor | None = None
) -> Tensor:
    """Softmax attention probabilities of a few query rows, in fp32.

    This is the one small extra matmul a backbone runs next to its fused attention kernel to get PuMer's
    importance without materialising the full attention matrix.

    Args:
        q: (B, H, Lq, D) queries (already projected, not scaled).
        k: (B, H, N, D) keys.
        key_mask: (B, N) bool or 0/1; False/0 keys get zero probability. Backbones fold the mask into ``bias``
            instead (one tensor per step for every consumer).
        bias: (B, N) additive fp32 logit bias (proportional attention's ``log size``, a large negative value on
            masked keys).
    Returns:
        (B, H, Lq, N) fp32 probabilities.

    Queries and keys hold values of ``q``'s dtype (``k`` may be their fp32 copy, `fp32_contiguous`). When that is
    bf16 and the CPU has bf16 matrix instructions, the logits are computed by oneDNN's bf16 kernels with fp32
    output (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``, for that one matmul): a product of two bf16
    values is exact in fp32 and the sums stay fp32, so the logits are the fp32 logits up to summation order, 1.4 to
    1.8 times as fast as fp32 (MKL) on these small matrices (measured on a Xeon with AMX, one thread).
    """
    exact_bf16 = q.dtype == torch.bfloat16 and q.device.type == "cpu" and not torch.compiler.is_compiling()
    head = q.shape[-1]
    scale = head**-0.5
    if key_mask is not None:
        masked = torch.zeros(key_mask.shape, device=q.device).masked_fill_(~key_mask.bool(), float("-inf"))
        bias = masked if bias is None else bias.float() + masked
    # without a bias, a power-of-two scale (head size a power of 4: 16, 64, 256) goes on the few query rows instead of
    # the logits: scaling by a power of two is exact, so the logits are the same (and so are bf16 queries' products)
    prescale = bias is None and head & (head - 1) == 0 and (head.bit_length() - 1) % 2 == 0
    q = fp32_contiguous(q) * scale if prescale else fp32_contiguous(q)
    # contiguous (B, H, N, D) keys: the matmul reads them transposed without another copy
    if exact_bf16 and cpu_bf16_matmul():
        with bf16_products():
            logits = torch.matmul(q, fp32_contiguous(k).mT)
    else:
        logits = torch.matmul(q, fp32_contiguous(k).mT)
    if bias is not None:
        logits = torch.add(bias.float()[:, None, None, :], logits, alpha=scale)
    elif not prescale:
        logits = logits.mul_(scale)
    return logits.softmax(dim=-1)


def text_importance(probs: Tensor, text_mask: Tensor, normalize: bool = True) -> Tensor:
    """PuMer's text-informed importance: attention that real text tokens pay to each image token.

    Args:
        probs: (B, H, Lt, Ni) attention probabilities of the text queries over the image keys.
        text_mask: (B, Lt) 1/True for real text tokens; padded query rows are excluded
            (docs/official_code_differences.md#b5).
        normalize: divide by heads x real rows (the official scale). Ranking does not need it, so the
            backbones skip it (two fewer ops per step).
    Returns:
        (B, Ni) fp32 scores: attention summed over heads and real text rows (averaged when ``normalize``).
    """
    batch, heads, n_rows, _ = probs.shape
    # one (1 x H Lt) @ (H Lt x Ni) matmul per example: the 0/1 row weights repeated per head, in the probabilities'
    # row order (head-major); flattening heads and rows is a view, even of the image columns of wider probabilities
    weights = text_mask[:, None, :].expand(batch, heads, n_rows).to(torch.float32)
    total = torch.bmm(weights.reshape(batch, 1, heads * n_rows), probs.float().flatten(1, 2)).squeeze(1)
    if not normalize:
        return total
    rows = text_mask.sum(dim=1, keepdim=True).clamp(min=1) * probs.shape[1]
    return total / rows


def fp32_contiguous(x: Tensor) -> Tensor:
    """``x`` as a contiguous fp32 tensor, with one copy at most.

    ``x.to(torch.float32, memory_format=torch.contiguous_format)`` returns a non-contiguous fp32 tensor as it is
    (a head-split view of the keys, say), and a matmul then copies it transposed: several times slower.
    """
    if x.dtype == torch.float32 and x.is_contiguous():
        return x
    return x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)


@functools.cache
def cpu_bf16_matmul() -> bool:
    """Whether oneDNN runs bf16 matmuls on this CPU's own bf16 instructions (AVX512-BF16 or AMX)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@contextlib.contextmanager
def bf16_products() -> Iterator[None]:
    """fp32 matmuls inside the block run on oneDNN's bf16 kernels (fp32 output): only for operands whose values are
    bf16, where that loses nothing. A process-wide setting, restored on exit (eager only: not for traced code)."""
    matmul = torch.backends.mkldnn.matmul
    saved = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = saved


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


def topk_keep_index(scores: Tensor, n_keep: int, order: str = "spatial") -> Tensor:
    """Indices (B, n_keep) of the image CLS (index 0) and the ``n_keep - 1`` best other tokens.

    ``order="spatial"`` returns them in original order; ``"score"`` in descending score, the CLS first (the order
    the official code partitions its bipartite matching in).
    """
    protected = scores.float().index_fill(1, _zero_index(scores.device), float("inf"))
    keep = protected.topk(n_keep, dim=1, sorted=order == "score").indices
    return keep if order == "score" else keep.sort(dim=1).values


def _zero_index(device: torch.device) -> Tensor:
    return cached(("zero",), device, lambda dev: torch.tensor([0], device=dev))
