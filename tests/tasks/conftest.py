"""Fixtures for the task tests: the session's small shapes world."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from pumer_test_utils import mark_expected_lightning_warnings, shapes_session_root

warnings.filterwarnings("ignore", message=".*LeafSpec.*")


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    return shapes_session_root(tmp_path_factory)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    mark_expected_lightning_warnings(items, Path(__file__).parent)
