"""Compare schedules on one model: FLOPs per example and interleaved timing, on top of `pumer_lightning.measure`.

`compare_schedules` counts the FLOPs of one forward of the first batch under every schedule (`count_flops`,
eagerly), then times one pass over all ``batches`` per schedule in interleaved rounds (`interleaved_times`, the
schedule swapped in by ``backbone.using`` outside the timed region), under ``torch.inference_mode`` and the
precision's autocast. Only ratios within one call mean anything: ``speedup`` is the ratio of median times to the
``reference`` schedule's, ``spread`` the slowest over the fastest round of a schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from pumer_lightning.measure import count_flops, interleaved_times, median_rates, speedup, spread
from pumer_lightning.reduce import ReducerSchedule

from .context import autocast


def examples_of(batch: dict[str, Any]) -> int:
    """Examples in a batch: its leading dimension of ``pixel_values``."""
    return int(batch["pixel_values"].shape[0])


def compare_schedules(
    model: Any,
    batches: list[dict[str, Any]],
    schedules: Mapping[str, ReducerSchedule | None],
    rounds: int,
    *,
    warmup: int = 1,
    reference: str | None = None,
    precision: str = "32-true",
    desc: str | None = None,
    forward: Callable[[dict[str, Any]], Any] | None = None,
) -> dict[str, dict[str, float]]:
    """FLOPs and speed of every named schedule of ``model`` on ``batches`` (already on the model's device).

    Returns name -> ``gflops_per_example``, ``examples_per_sec`` (examples of a pass over its median time),
    ``spread``, ``examples`` and ``rounds``, and with a ``reference`` schedule name ``speedup`` over it.
    ``forward``: the work on one batch (default: the task module's evaluation forward ``model(batch)``).
    """
    if reference is not None and reference not in schedules:
        raise ValueError(
            f"the reference {reference!r} is not among the schedules compared: {list(schedules)}"
        )
    forward = forward or model
    backbone = model.backbone
    device = next(model.parameters()).device
    examples = sum(examples_of(b) for b in batches)
    model.eval()
    if device.type == "cuda" and hasattr(model, "cuda_graphs"):
        from pumer_lightning.models.graphed import CudaGraphs

        # fresh CUDA graphs: room for one per schedule and batch shape, so none runs eagerly mid-session
        model.cuda_graphs = CudaGraphs(max_graphs=len(schedules) * len(batches) + 1)
    with torch.inference_mode(), autocast(device, precision):
        flops = {}
        for name, schedule in schedules.items():
            with backbone.using(schedule), model.eager_forwards():
                flops[name] = count_flops(lambda: forward(batches[0])) / examples_of(batches[0])

        def one_pass() -> None:
            for batch in batches:
                forward(batch)

        times = interleaved_times(
            {name: one_pass for name in schedules},
            rounds,
            warmup=warmup,
            sync=device,
            context=lambda name: backbone.using(schedules[name]),
            desc=desc,
        )
    rates = median_rates(times, examples)
    out = {}
    for name in schedules:
        out[name] = {
            "examples_per_sec": rates[name],
            "spread": spread(times[name]),
            "gflops_per_example": flops[name] / 1e9,
            "examples": examples,
            "rounds": rounds,
        }
        if reference is not None:
            out[name]["speedup"] = speedup(times, reference, name)
    return out
