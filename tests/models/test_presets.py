"""Backbone presets through their public names (`preset_config`, `preset_depth`, `preset_image_size`), and the
backbone's reduction step chosen for a block without editing its field."""

from __future__ import annotations

import pytest
from transformers import ViltConfig

from pumer_lightning.models import (
    PRESETS,
    MeterConfig,
    preset_config,
    preset_depth,
    preset_family,
    preset_image_size,
)
from pumer_lightning.models.build import new_backbone


@pytest.mark.parametrize("preset", ["vilt_tiny", "vilt_mini", "vilt_small", "meter_tiny"])
def test_preset_facts_match_the_backbone_they_build(preset):
    backbone = new_backbone(preset)
    config = preset_config(preset)
    assert isinstance(config, ViltConfig if preset_family(preset) == "vilt" else MeterConfig)
    assert preset_depth(preset) == backbone.num_layers
    assert preset_image_size(preset) == backbone.image_size == config.image_size


def test_full_size_presets_without_building_them():
    assert [preset_depth(p) for p in PRESETS if not p.endswith(("tiny", "mini", "small"))] == [12, 6, 6]
    assert [preset_image_size(p) for p in ("vilt_b32", "meter_b16_288", "meter_b16_384")] == [384, 288, 384]
    assert preset_config("vilt_b32").hidden_size == 768 and preset_config("meter_b16_288").cross_layers == 6


def test_a_vilt_preset_config_is_a_fresh_copy():
    config = preset_config("vilt_tiny")
    config.layer_norm_eps = 1e-6
    assert preset_config("vilt_tiny").layer_norm_eps == 1e-12
    assert new_backbone("vilt_tiny").config.layer_norm_eps == 1e-12


def test_an_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown backbone preset 'vilt_huge'; choose one of \['vilt_b32'"):
        preset_config("vilt_huge")


def test_using_reducer_impl_restores_the_backbones_own():
    backbone = new_backbone("vilt_tiny", reducer_impl="eager")
    with backbone.using_reducer_impl("compiled") as same:
        assert same is backbone and backbone.reducer_impl == "compiled"
    assert backbone.reducer_impl == "eager"
    with pytest.raises(RuntimeError), backbone.using_reducer_impl("auto"):
        raise RuntimeError("inside the block")
    assert backbone.reducer_impl == "eager"
    with pytest.raises(ValueError, match="reducer_impl must be one of"), backbone.using_reducer_impl("fast"):
        pass
    assert backbone.reducer_impl == "eager"
