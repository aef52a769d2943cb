"""The environment set-up of the entry points (``python -m pumer_lightning``, ``exp``, ``study``), done once.

Import it before anything that imports torch, transformers or tokenizers::

    import pumer_lightning.env  # noqa: F401  (the environment, before torch is imported)

    # isort: split
    import torch

What it sets (each only where the environment does not say otherwise, as the Makefile exports them):

* ``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP threads sleep instead of busy-waiting. With busy-waiting threads (the
  default) a CPU shared with other jobs runs a small model ~10x slower (measured: 3.5 s vs 0.24 s per step on 2
  contended cores). Read when torch loads its OpenMP runtime, hence before torch is imported.
* ``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``: nothing is downloaded; tokenizers and checkpoints are local
  paths (the CLI's input checks say how to make them).
* ``TOKENIZERS_PARALLELISM=false``: no fork warnings from tokenizers in DataLoader workers.
* a warnings filter for a torch 2.13 deprecation (``isinstance(treespec, LeafSpec)``) that Lightning 2.6 still
  triggers; it says nothing about this project.
"""

from __future__ import annotations

import os
import warnings

#: Environment variables set (``setdefault``) on import.
ENVIRONMENT: dict[str, str] = {
    "OMP_WAIT_POLICY": "PASSIVE",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

#: Warning messages (regular expressions) ignored on import.
IGNORED_WARNINGS: tuple[str, ...] = (r".*isinstance\(treespec, LeafSpec\)",)


def setup() -> None:
    """Apply `ENVIRONMENT` and `IGNORED_WARNINGS` (idempotent; runs on import)."""
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    for message in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


setup()
