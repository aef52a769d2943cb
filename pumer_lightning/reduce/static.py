"""Per-plan constant tensors, built once per device and reused by every step that needs them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

_CACHE: dict[tuple, Tensor] = {}


def cached(key: tuple, device: torch.device, build: Callable[[torch.device], Tensor]) -> Tensor:
    """The tensor ``build(device)`` for ``key``, built once per device.

    Tensors are built outside inference mode and without autograd, so they serve training and inference alike.
    A compiled region looks them up (the eager warm-up call that precedes a compiled step built them), so tracing
    need not walk the Python that builds them; the compiled graph takes them as inputs. A region compiled without
    that warm-up (a whole compiled forward) builds them in the graph, slower to trace but the same values.
    """
    full_key = (*key, device)
    if (
        torch.compiler.is_compiling()
    ):  # traced without an eager warm-up (a whole compiled forward): build in-graph
        value = _CACHE.get(full_key)
        return value if value is not None else build(device)
    value = _CACHE.get(full_key)
    if value is None:
        with torch.inference_mode(False), torch.no_grad():
            value = build(device)
        _CACHE[full_key] = value
    return value


def positions(n: int, device: torch.device) -> Tensor:
    """``arange(n)`` (long), cached."""
    return cached(
        ("arange", n), device, lambda dev: torch.tensor(list(range(n)), dtype=torch.long, device=dev)
    )


def flat_offsets(batch: int, n: int, device: torch.device) -> Tensor:
    """(B, 1) long: the first row of each example in a (B * n, ...) flattened batch, cached."""
    return cached(
        ("row_offsets", batch, n),
        device,
        lambda dev: torch.tensor([[b * n] for b in range(batch)], dtype=torch.long, device=dev),
    )


def flat_rows(index: Tensor, n: int) -> Tensor:
    """(B, K) positions in sequences of length ``n`` -> (B * K,) rows of the (B * n, ...) flattened batch."""
    return (index + flat_offsets(index.shape[0], n, index.device)).flatten()
