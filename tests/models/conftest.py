"""Fixtures for the backbone tests (helpers and reference forwards live in model_refs.py; tests/conftest.py
seeds torch before each test)."""

from __future__ import annotations

import pytest

from pumer_lightning.models import build_backbone


@pytest.fixture(scope="session")
def tiny_meter():
    """A tiny METER built once per session (tests that change it deep-copy it)."""
    return build_backbone("meter_tiny").eval()


@pytest.fixture(scope="session")
def tiny_vilt():
    return build_backbone("vilt_tiny").eval()
