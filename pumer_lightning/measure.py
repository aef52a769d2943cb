"""The measurement core of the package: the one FLOP counter and the one interleaved timer.

It imports nothing heavier than torch (and tqdm), so the callbacks, ``exp``, ``study`` and the bench all count FLOPs
and time settings the same way without importing each other.

**FLOPs**: `flop_counter` is `torch.utils.flop_counter.FlopCounterMode` with the formulas it lacks. FLOPs are matmul, conv and attention work, 2 per multiply-add; softmax, norms,
activations, gathers and top-k are not counted.

Torch's registry has no formula for the CPU fused attention kernel
``aten._scaled_dot_product_flash_attention_for_cpu``, so on CPU every SDPA call would count 0 FLOPs;
`SDPA_FLOP_MAPPING` adds torch's own SDPA formula (QK^T + AV) for it.

```python
with flop_counter() as counter:
    model(batch)
flops = counter.get_total_flops()
```

**Time**: `interleaved_times` times N named settings in rounds, each round running every setting once in an
order rotated by one per round (two settings alternate), so that a drifting machine (a shared CPU, a GPU warming
up) biases no setting; only ratios of medians over rounds mean anything (`median_rates`, `speedup`).

```python
times = interleaved_times(
    {"reduced": forward, "unreduced": forward}, rounds=5, sync=device,
    context=lambda name: backbone.using(schedules[name]),  # restored after every sample, error or not
)
speedup(times, "unreduced", "reduced")         # ratio of medians
paired_speedups(times, "unreduced", "reduced")  # the same, round by round (cancels drift between rounds)
```
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count
from tqdm.auto import tqdm

__all__ = [
    "SDPA_FLOP_MAPPING",
    "count_flops",
    "flop_counter",
    "interleaved_times",
    "median_rates",
    "paired_speedups",
    "register_flop_formulas",
    "rotated_order",
    "speedup",
    "spread",
]


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


SDPA_FLOP_MAPPING: dict = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}
"""Formulas `FlopCounterMode` lacks (torch 2.13): the CPU fused SDPA kernel."""


def flop_counter() -> FlopCounterMode:
    """A silent `FlopCounterMode` that also counts the CPU fused attention kernel (`SDPA_FLOP_MAPPING`)."""
    return FlopCounterMode(display=False, custom_mapping=SDPA_FLOP_MAPPING)


def register_flop_formulas() -> None:
    """Add `SDPA_FLOP_MAPPING` to torch's own FLOP registry (once, idempotent), so that every `FlopCounterMode`
    counts what `flop_counter` counts: Lightning's model summary builds its own counter."""
    for op, formula in SDPA_FLOP_MAPPING.items():
        if op not in flop_registry:
            register_flop_formula(op)(formula)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (`flop_counter`)."""
    with flop_counter() as counter:
        fn()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------- timing
def _synchronizer(sync: torch.device | str | Callable[[], None] | None) -> Callable[[], None]:
    """``sync`` as a function: a device synchronises when it is a CUDA device; a callable is used as given."""
    if callable(sync):
        return sync
    device = torch.device(sync) if sync is not None else None
    if device is not None and device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def rotated_order(names: Sequence[str], round_index: int) -> list[str]:
    """The order of round ``round_index``: ``names`` rotated left by ``round_index`` (two names alternate)."""
    names = list(names)
    k = round_index % len(names) if names else 0
    return names[k:] + names[:k]


def interleaved_times(
    runs: Mapping[str, Callable[[], Any]],
    rounds: int,
    warmup: int = 1,
    sync: torch.device | str | Callable[[], None] | None = None,
    *,
    inner: int | Mapping[str, int] = 1,
    context: Callable[[str], AbstractContextManager[Any]] | None = None,
    desc: str | None = "interleaved timing",
    on_round: Callable[[int, dict[str, list[float]]], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of every named setting, ``rounds`` samples each, interleaved.

    Args:
        runs: setting name -> the work to time (e.g. one evaluation pass over the timing batches).
        rounds: samples per setting. Round ``r`` runs the settings in `rotated_order` (``r``): every setting
            goes first equally often and two settings alternate.
        warmup: untimed calls of every setting before the first round (allocator, kernels, caches).
        sync: a device (synchronised before and after each sample when it is a CUDA device), a function to call
            there instead, or None.
        inner: calls per sample (one number, or one per setting); a sample is its time divided by ``inner``.
        context: setting name -> a context manager entered around each warm-up call and each sample, outside
            the timed region (e.g. ``lambda name: backbone.using(schedules[name])``); it restores whatever it
            changed when the work raises.
        desc: the progress bar's label (None: no progress bar).
        on_round: called after every round with its index and the samples so far (logging).

    Returns:
        setting name -> ``rounds`` samples in seconds per call, in round order.
    """
    if rounds < 0 or warmup < 0:
        raise ValueError(f"rounds and warmup must be >= 0, got {rounds} and {warmup}")
    names = list(runs)
    calls = {name: inner if isinstance(inner, int) else int(inner[name]) for name in names}
    if any(n < 1 for n in calls.values()):
        raise ValueError(f"inner must be >= 1 per setting, got {calls}")
    synchronize = _synchronizer(sync)
    enter = context or (lambda name: contextlib.nullcontext())

    for _ in range(warmup):
        for name in names:
            with enter(name):
                runs[name]()
                synchronize()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in tqdm(range(rounds), desc=desc, leave=False, disable=desc is None):
        for name in rotated_order(names, r):
            run, n = runs[name], calls[name]
            with enter(name):
                synchronize()
                start = time.perf_counter()
                for _ in range(n):
                    run()
                synchronize()
                times[name].append((time.perf_counter() - start) / n)
        if on_round is not None:
            on_round(r, times)
    return times


def median_rates(times: Mapping[str, Sequence[float]], examples: float) -> dict[str, float]:
    """Examples per second of every setting: ``examples`` (per call) over its median time."""
    return {name: examples / statistics.median(samples) for name, samples in times.items()}


def speedup(times: Mapping[str, Sequence[float]], reference: str, setting: str) -> float:
    """How many times faster ``setting`` is than ``reference``: the ratio of their median times."""
    return statistics.median(times[reference]) / statistics.median(times[setting])


def paired_speedups(times: Mapping[str, Sequence[float]], reference: str, setting: str) -> list[float]:
    """``reference`` / ``setting`` round by round: the speedup within each round of `interleaved_times`.

    Both settings ran in the same round, close in time, so a paired speedup cancels drift of the machine's speed
    between rounds; its median and range sit beside `speedup` (the ratio of medians).
    """
    ref, own = times[reference], times[setting]
    if len(ref) != len(own):
        raise ValueError(
            f"{reference!r} has {len(ref)} samples and {setting!r} {len(own)}: not paired by round"
        )
    return [r / s for r, s in zip(ref, own)]


def spread(samples: Sequence[float]) -> float:
    """Slowest over fastest sample: the round-to-round noise of one setting on this machine."""
    return max(samples) / min(samples)
