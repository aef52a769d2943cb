"""Fixtures of the reliability tests (helpers live in reliability_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shapes_snli(tmp_path_factory) -> tuple[Path, Path]:
    """SNLI-VE shapes at the tiny backbones' 96 px: 3 training shards and 3 validation shards (24, 24, 6
    examples), an odd count that does not split evenly over 2 ranks."""
    from pumer_lightning.data.shapes import ShapesSpec, World, generate

    spec = ShapesSpec(
        seed=5, num_train=72, num_val=54, num_test=8, world=World(image_size=96, patch_size=16), shard_size=8,
        tasks=("snli_ve",), types=("shape", "color"),
    )  # fmt: skip
    root = generate(spec, tmp_path_factory.mktemp("shapes") / "shapes", workers=1, progress=False)
    return root / "snli_ve", root / "tokenizer"
