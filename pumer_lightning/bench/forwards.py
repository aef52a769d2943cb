"""The forwards the bench times and instruments: eager, compiled whole forward, CUDA-graph replay.

Every forward runs one setting's schedule through ``backbone.using(schedule)``, which restores the backbone's own
schedule when the call returns or raises: the bench never leaves a setting behind on the model.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any

import torch

from pumer_lightning.lab.context import AUTOCAST_DTYPES
from pumer_lightning.tasks import Scored, VLTask

from .experiments import Setting


def eager_runner(model: VLTask, setting: Setting, batch: dict[str, Any]) -> Callable[[], Scored]:
    """One forward of ``batch``, the task's own (`VLTask.compute_logits`), with the setting's schedule
    (``backbone.using``: restored after the call)."""

    def run() -> Scored:
        with model.backbone.using(setting.schedule):
            return model.compute_logits(batch, model.backbone, model.head)

    return run


def compiled_runner(
    model: VLTask, setting: Setting, batch: dict[str, Any], backend: str = "inductor", mode: str | None = None
) -> Callable[[], Scored]:
    """``torch.compile(fullgraph=True, dynamic=False)`` of the task forward with this setting's reducer.

    Each setting gets a shallow copy of the backbone (parameters shared) that runs its schedule (set by
    ``backbone.using`` around each call), so the compiled graphs specialise on it and all settings stay compiled
    side by side.
    """
    backbone = copy.copy(model.backbone)

    def forward(batch: dict[str, Any]) -> Scored:
        return model.compute_logits(batch, backbone, model.head)

    compiled = torch.compile(forward, fullgraph=True, dynamic=False, backend=backend, mode=mode)

    def run() -> Scored:
        with backbone.using(setting.schedule):
            return compiled(batch)

    return run


def graphed_runner(run: Callable, device: torch.device, precision: str) -> Callable:
    """The forward captured once as a CUDA graph and replayed: no Python or kernel-launch cost per call.

    Every shape in a reduced forward is static (the counts come from the schedule, never from the data), so one
    capture per setting holds the whole forward, the reducer's top-k, matching and merging included. Warm-up runs
    on a side stream first, as capture requires; autocast's weight cache is off while capturing (cached casts
    made inside a capture would point into the graph's private pool).
    """
    dtype = AUTOCAST_DTYPES.get(precision)

    def amp():
        return torch.autocast("cuda", dtype=dtype, cache_enabled=False) if dtype else contextlib.nullcontext()

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.inference_mode(), amp():
        for _ in range(2):
            run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), amp(), torch.cuda.graph(graph):
        out = run()

    def replay():
        graph.replay()
        return out

    return replay


def raise_recompile_limits(n: int) -> None:
    """Let dynamo keep ``n`` compiled variants of one code object (one per setting, plan and batch size)."""
    config = torch._dynamo.config
    for name in (
        "recompile_limit",
        "cache_size_limit",
        "accumulated_recompile_limit",
        "accumulated_cache_size_limit",
    ):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 4 * n + 8))
