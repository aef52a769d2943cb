"""Converters from the official dataset files to shards: ``python -m pumer_lightning.data.prepare <dataset>``.

Datasets: ``nlvr2``, ``vqa2``, ``snli_ve`` (tasks of the same name) and ``flickr30k``, ``coco`` (task
``retrieval``). Each converter plans its records from the annotation files (no pixels held in memory), then
:class:`~pumer_lightning.data.writer.SplitWriter` streams the images into shards, resumably.
"""

from __future__ import annotations

from .cli import DATASETS, convert, main

__all__ = ["DATASETS", "convert", "main"]
