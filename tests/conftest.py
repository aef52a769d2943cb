"""What every test package shares: offline Hugging Face, a seeded torch, the session's small shapes world and
the Lightning warnings the CLI-driven tests trigger on purpose.

pytest puts this folder on ``sys.path`` (no ``__init__.py``), so ``from pumer_test_utils import ...`` works from
every package. Package conftests keep only their own fixtures (tests/data, tests/models, tests/reliability).
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
