"""Fixtures for the task tests: the session's small shapes world."""

from __future__ import annotations

import warnings

import pytest
import torch
from pumer_test_utils import shapes_session_root

warnings.filterwarnings("ignore", message=".*LeafSpec.*")


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    return shapes_session_root(tmp_path_factory)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    """LightningCLI warns that pytest's own argv is present when a test passes args=; that is expected here."""
    here = str(__import__("pathlib").Path(__file__).parent)
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.filterwarnings("ignore:LightningCLI's args parameter"))
            item.add_marker(pytest.mark.filterwarnings("ignore:.*LeafSpec.*"))
            item.add_marker(pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode"))
            item.add_marker(
                pytest.mark.filterwarnings("ignore:.*ckpt_path=None.* was called without a model")
            )
            item.add_marker(pytest.mark.filterwarnings("ignore:.*is set, but there is no last checkpoint"))
