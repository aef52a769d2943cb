"""Fixtures: the session's small shapes world (helpers live in tests/tasks/pumer_test_utils.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tasks"))

from pumer_test_utils import mark_expected_lightning_warnings, shapes_session_root  # noqa: E402


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    return shapes_session_root(tmp_path_factory)


def pytest_collection_modifyitems(config, items):
    mark_expected_lightning_warnings(items, Path(__file__).parent)
