"""Whole-forward CUDA graphs for inference: a reduced forward replayed without per-op launch cost.

Every shape inside a reduced forward follows from the input shapes and the schedule (never from the data), so a
backbone forward captured once per input signature replays exactly. `CudaGraphs` keeps one graph per signature
(batch size, text length, image size, dtype, image index), copies each new batch into the captured input
buffers, replays, and returns copies of the outputs. Pad texts to a fixed length (``--data.text_padding
max_length``) so that a whole evaluation needs one or two graphs; after ``max_graphs`` signatures it falls back to
eager calls and says so once.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from .base import Backbone, BackboneOutput

logger = logging.getLogger(__name__)


class CudaGraphs:
    """Replays ``backbone(pixel_values, input_ids, attention_mask, image_index=...)`` from CUDA graphs.

    Args:
        max_graphs: distinct input signatures to capture before falling back to eager calls.
    """

    def __init__(self, max_graphs: int = 8) -> None:
        self.max_graphs = max_graphs
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple[Tensor, ...], BackboneOutput]] = {}
        self._pool = None
        self._warned = False

    @staticmethod
    def applies(backbone: Backbone, pixel_values: Tensor) -> bool:
        """Capture only what replays safely: CUDA, eval mode, no autograd."""
        return pixel_values.is_cuda and not backbone.training and not torch.is_grad_enabled()

    def __call__(
        self,
        backbone: Backbone,
        pixel_values: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        image_index: int,
    ) -> BackboneOutput:
        inputs = (pixel_values, input_ids, attention_mask)
        autocast = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda") if autocast else None
        key = (id(backbone), repr(backbone.reducer), image_index, autocast, dtype) + tuple(
            (t.shape, t.dtype, t.device) for t in inputs
        )
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                if not self._warned:
                    logger.warning(
                        "CUDA graphs: %d input shapes captured; later shapes run eagerly (pad texts to a fixed "
                        "length with --data.text_padding max_length)",
                        self.max_graphs,
                    )
                    self._warned = True
                return backbone(*inputs, image_index=image_index)
            entry = self._capture(backbone, inputs, image_index, dtype)
            self._graphs[key] = entry
        graph, static, out = entry
        for buffer, value in zip(static, inputs):
            buffer.copy_(value)
        graph.replay()
        return replace(
            out,
            pooled=out.pooled.clone(),
            text_states=out.text_states.clone(),
            text_mask=out.text_mask.clone(),
            image_states=out.image_states.clone(),
        )

    def _capture(
        self, backbone: Backbone, inputs: tuple[Tensor, ...], image_index: int, dtype: torch.dtype | None
    ) -> tuple[torch.cuda.CUDAGraph, tuple[Tensor, ...], BackboneOutput]:
        """Warm up on a side stream (compiles reduction steps, fills caches), then capture one forward."""
        device = inputs[0].device
        static = tuple(t.clone() for t in inputs)

        def amp() -> (
            Any
        ):  # autocast's weight cache must be off inside a capture (its casts would live in the pool)
            return (
                torch.autocast("cuda", dtype=dtype, cache_enabled=False)
                if dtype
                else contextlib.nullcontext()
            )

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), amp():
            for _ in range(2):
                backbone(*static, image_index=image_index)
        torch.cuda.current_stream(device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with amp(), torch.cuda.graph(graph, pool=self._pool):
            out = backbone(*static, image_index=image_index)
        return graph, static, out
