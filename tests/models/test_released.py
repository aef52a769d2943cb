"""Each released checkpoint name spells the setting `reduce.released` holds under the same key."""

from __future__ import annotations

import re

import pytest

from pumer_lightning.models.released import RELEASED_CHECKPOINTS
from pumer_lightning.reduce import ReducerSchedule
from pumer_lightning.reduce.released import RELEASED

NAME = re.compile(r"p(?P<p>[\d.]+)-?r(?P<r>[\d.]+)-?t(?P<t>[\d.]+)-(?P<layers>\d+)$")


def test_every_released_setting_has_its_checkpoint_name():
    assert set(RELEASED_CHECKPOINTS) == set(RELEASED)


@pytest.mark.parametrize("key", sorted(RELEASED_CHECKPOINTS))
def test_checkpoint_name_spells_the_schedule(key):
    name = RELEASED_CHECKPOINTS[key]
    family = key.split("_", 1)[0]
    assert name.startswith(f"{family}-")
    m = NAME.search(name)
    assert m, name
    official = [int(c) for c in m["layers"]]
    expected = ReducerSchedule.from_pumer(
        float(m["p"]), float(m["r"]), float(m["t"]), official, doubled=family == "meter"
    )
    assert RELEASED[key].schedule == expected
