"""Streaming data for pumer-lightning: WebDataset shards, the shapes world, converters and the DataModule.

Public API:

- :class:`VLDataModule`: the LightningDataModule for ``nlvr2``, ``vqa2``, ``snli_ve`` and ``retrieval``.
- :class:`DataFacts`: what a task module knows of its data, handed over once at setup.
- :func:`backbone_image_config`: image size, mean/std and resize rule for ``"clip"`` or ``"vilt"`` backbones.
- :func:`ensure_shapes`: generate the synthetic shapes world unless it is already there.
- :class:`ImageTransform`, :class:`RandAugment`, :func:`decode_image`: the image pipeline pieces.
- :class:`SplitMeta`, :func:`read_split_meta`: the per-split metadata file.
- :data:`SKIP_REASONS`: why examples get dropped (keys of ``VLDataModule.skipped``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Attributes load on first use, so the command-line tools (shapes, prepare, throughput) start without
# importing Lightning.
_EXPORTS = {
    "CLIP_MEAN": "transforms",
    "CLIP_STD": "transforms",
    "ImageConfig": "transforms",
    "ImageTransform": "transforms",
    "RandAugment": "transforms",
    "backbone_image_config": "transforms",
    "decode_image": "transforms",
    "Collator": "collate",
    "Example": "collate",
    "load_tokenizer": "collate",
    "VLDataModule": "datamodule",
    "DataFacts": "facts",
    "TASKS": "schema",
    "SplitMeta": "schema",
    "read_split_meta": "schema",
    "ensure_shapes": "shapes",
    "SKIP_REASONS": "stream",
    "RetrievalTexts": "stream",
}
__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "SKIP_REASONS",
    "TASKS",
    "Collator",
    "DataFacts",
    "Example",
    "ImageConfig",
    "ImageTransform",
    "RandAugment",
    "RetrievalTexts",
    "SplitMeta",
    "VLDataModule",
    "backbone_image_config",
    "decode_image",
    "ensure_shapes",
    "load_tokenizer",
    "read_split_meta",
]

if TYPE_CHECKING:
    from .collate import Collator, Example, load_tokenizer
    from .datamodule import VLDataModule
    from .facts import DataFacts
    from .schema import TASKS, SplitMeta, read_split_meta
    from .shapes import ensure_shapes
    from .stream import SKIP_REASONS, RetrievalTexts
    from .transforms import (
        CLIP_MEAN,
        CLIP_STD,
        ImageConfig,
        ImageTransform,
        RandAugment,
        backbone_image_config,
        decode_image,
    )


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
