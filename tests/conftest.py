"""What every test package shares: offline Hugging Face, a seeded torch, the Lightning warnings the CLI-driven
tests trigger on purpose, the shapes tokenizer and the session's three generated shapes worlds.

The three worlds differ in what their tests need, not in taste: ``shapes`` is the tiny presets' geometry with all
four tasks in one shard per split (tasks, CLI, lab, tune, callbacks); ``tiny_shapes`` has several shards per
split of every task at 64 px (the data tests: sharding, worker splits, resume); ``shapes_snli`` has SNLI-VE
shards whose example counts do not split evenly over 2 ranks (the reliability tests: DDP, resume, data errors).
Each is generated once per session; tests that change data copy it first.

pytest puts this folder on ``sys.path`` (no ``__init__.py``), so ``from pumer_test_utils import ...`` works from
every package. Package conftests keep only their own fixtures (tests/models).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")

TESTS = Path(__file__).resolve().parent

#: Lightning warnings the tests of these packages trigger on purpose (runs through the real CLI).
EXPECTED_LIGHTNING_WARNINGS = (
    "ignore:LightningCLI's args parameter",  # pytest's own argv is present when a test passes args=
    "ignore:.*LeafSpec.*",
    "ignore:Found .* module\\(s\\) in eval mode",
    "ignore:.*ckpt_path=None.* was called without a model",
    "ignore:.*is set, but there is no last checkpoint",
)
CLI_DRIVEN = tuple(str(TESTS / name) for name in ("tasks", "cli", "callbacks"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if str(item.path).startswith(CLI_DRIVEN):
            for spec in EXPECTED_LIGHTNING_WARNINGS:
                item.add_marker(pytest.mark.filterwarnings(spec))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    """The session's shapes world at 96 px / 16 px patches (the tiny presets' geometry), all four tasks,
    generated once for every package."""
    from pumer_lightning.data import ensure_shapes

    return ensure_shapes(
        tmp_path_factory.getbasetemp() / "shapes96",
        num_train=96,
        num_val=40,
        num_test=40,
        tasks=("nlvr2", "vqa2", "snli_ve", "retrieval"),
        image_size=96,
        patch_size=16,
        workers=1,
        progress=False,
    )


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The shapes world's word-level tokenizer, saved once (every generated world holds the same one)."""
    from pumer_lightning.data.shapes import save_tokenizer

    return save_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory) -> Path:
    """A small shapes world at 64 px / 8 px cells, several shards per split, all four tasks."""
    from pumer_lightning.data.shapes import ShapesSpec, World, generate

    spec = ShapesSpec(
        seed=3, num_train=120, num_val=45, num_test=30, world=World(image_size=64, patch_size=8), shard_size=8
    )
    return generate(spec, tmp_path_factory.mktemp("shapes") / "shapes", workers=1, progress=False)


@pytest.fixture(scope="session")
def shapes_snli(tmp_path_factory) -> tuple[Path, Path]:
    """SNLI-VE shapes at the tiny backbones' 96 px: 3 training shards and 3 validation shards (24, 24, 6
    examples), an odd count that does not split evenly over 2 ranks; returns (data dir, tokenizer dir)."""
    from pumer_lightning.data.shapes import ShapesSpec, World, generate

    spec = ShapesSpec(
        seed=5,
        num_train=72,
        num_val=54,
        num_test=8,
        world=World(image_size=96, patch_size=16),
        shard_size=8,
        tasks=("snli_ve",),
        types=("shape", "color"),
    )
    root = generate(spec, tmp_path_factory.mktemp("shapes_snli") / "shapes", workers=1, progress=False)
    return root / "snli_ve", root / "tokenizer"
