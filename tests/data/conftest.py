"""Fixtures of the data tests (builders live in tests/data_helpers.py; tests/conftest.py sets the offline env)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from pumer_lightning.data.shapes import save_tokenizer

    return save_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory) -> Path:
    """A small shapes world at 64 px / 8 px cells, several shards per split, all four tasks."""
    from pumer_lightning.data.shapes import ShapesSpec, World, generate

    spec = ShapesSpec(
        seed=3,
        num_train=120,
        num_val=45,
        num_test=30,
        world=World(image_size=64, patch_size=8),
        shard_size=8,
    )
    return generate(spec, tmp_path_factory.mktemp("shapes") / "shapes", workers=1, progress=False)
