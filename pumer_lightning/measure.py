"""The one FLOP counter of the package: `torch.utils.flop_counter.FlopCounterMode` with the formulas it lacks.

It imports nothing but torch, so the callbacks, ``exp``, ``study`` and the bench all count FLOPs the same way
without importing each other. FLOPs are matmul, conv and attention work, 2 per multiply-add; softmax, norms,
activations, gathers and top-k are not counted.

Torch's registry has no formula for the CPU fused attention kernel
``aten._scaled_dot_product_flash_attention_for_cpu``, so on CPU every SDPA call would count 0 FLOPs;
`SDPA_FLOP_MAPPING` adds torch's own SDPA formula (QK^T + AV) for it.

```python
with flop_counter() as counter:
    model(batch)
flops = counter.get_total_flops()
```
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ["SDPA_FLOP_MAPPING", "flop_counter"]


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


SDPA_FLOP_MAPPING: dict = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}
"""Formulas `FlopCounterMode` lacks (torch 2.13): the CPU fused SDPA kernel."""


def flop_counter() -> FlopCounterMode:
    """A silent `FlopCounterMode` that also counts the CPU fused attention kernel (`SDPA_FLOP_MAPPING`)."""
    return FlopCounterMode(display=False, custom_mapping=SDPA_FLOP_MAPPING)
