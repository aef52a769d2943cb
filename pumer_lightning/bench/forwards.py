"""The forwards the bench times and instruments: eager, compiled whole forward, CUDA-graph replay.

Every forward runs one setting's schedule through ``backbone.using(schedule)``, which restores the backbone's own
schedule when the call returns or raises: the bench never leaves a setting behind on the model.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch

from .experiments import Inputs, Setting, TaskModel


def has_reducer_impl(backbone: torch.nn.Module) -> bool:
    """Whether the backbone offers a choice of reduction step (``reducer_impl``: auto, eager or compiled)."""
    return hasattr(backbone, "reducer_impl")


@contextlib.contextmanager
def reducer_impl(backbone: torch.nn.Module, impl: str | None):
    """Use reduction step ``impl`` inside the block (nothing when ``impl`` is None or the backbone has no choice)."""
    if impl is None or not has_reducer_impl(backbone):
        yield
        return
    saved = backbone.reducer_impl
    backbone.reducer_impl = impl
    try:
        yield
    finally:
        backbone.reducer_impl = saved


def eager_runner(model: TaskModel, setting: Setting, inputs: Inputs) -> Callable:
    """One forward of ``inputs`` with the setting's schedule (``backbone.using``: restored after the call)."""

    def run():
        with model.backbone.using(setting.schedule):
            return model(*inputs.args())

    return run


def compiled_runner(
    model: TaskModel, setting: Setting, inputs: Inputs, backend: str = "inductor", mode: str | None = None
) -> Callable:
    """``torch.compile(fullgraph=True, dynamic=False)`` of the task forward with this setting's reducer.

    Each setting gets a shallow copy of the backbone (parameters shared) that runs its schedule
    (``backbone.using`` around each call), so the compiled graphs specialise on it and all settings stay compiled
    side by side.
    """
    backbone = copy.copy(model.backbone)
    head = model.head

    def forward(pixel_values, input_ids, attention_mask):
        outs = [
            backbone(images, input_ids, attention_mask, image_index=i)
            for i, images in enumerate(pixel_values)
        ]
        return head(torch.cat([o.pooled for o in outs], dim=-1)), [o.trace for o in outs]

    compiled = torch.compile(forward, fullgraph=True, dynamic=False, backend=backend, mode=mode)

    def run():
        with backbone.using(setting.schedule):
            return compiled(*inputs.args())

    return run


def graphed_runner(run: Callable, device: torch.device, precision: str) -> Callable:
    """The forward captured once as a CUDA graph and replayed: no Python or kernel-launch cost per call.

    Every shape in a reduced forward is static (the counts come from the schedule, never from the data), so one
    capture per setting holds the whole forward, the reducer's top-k, matching and merging included. Warm-up runs
    on a side stream first, as capture requires; autocast's weight cache is off while capturing (cached casts
    made inside a capture would point into the graph's private pool).
    """
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

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
