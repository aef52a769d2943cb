"""Converted original ViLT checkpoints carry original ViLT's LayerNorm epsilon (1e-6, timm's blocks), not
transformers' ViltConfig default (1e-12); HF ViLT directories keep their own."""

from __future__ import annotations

import torch
from model_refs import make_inputs, original_vilt_state, vilt_reference
from torch.testing import assert_close

from pumer_lightning.models import build_backbone, read_checkpoint
from pumer_lightning.models import convert as convert_module
from pumer_lightning.models.build import new_backbone
from pumer_lightning.models.convert import ORIGINAL_VILT_LAYER_NORM_EPS, convert

CONFIG = new_backbone("vilt_tiny").config
quiet = dict(log=lambda message: None)


def test_a_converted_original_vilt_checkpoint_carries_eps_1e_6(tmp_path, monkeypatch):
    assert ORIGINAL_VILT_LAYER_NORM_EPS == 1e-6 and CONFIG.layer_norm_eps == 1e-12  # transformers' default
    built = []

    def spy(*args, **kwargs):
        built.append(new_backbone(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(convert_module, "new_backbone", spy)
    sd = original_vilt_state(CONFIG, heads=("vqa",))
    torch.save({"state_dict": sd}, tmp_path / "vilt.ckpt")
    out = convert("vilt", tmp_path / "vilt.ckpt", tmp_path / "c", preset="vilt_tiny", **quiet)

    (backbone,) = built
    assert backbone.config.layer_norm_eps == 1e-6
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert (
        len(norms) == 2 * CONFIG.num_hidden_layers + 2
    )  # two per block, the final norm, the text embeddings
    assert all(m.eps == 1e-6 for m in norms)
    assert read_checkpoint(out).config["layer_norm_eps"] == 1e-6  # the written checkpoint says so
    reloaded = build_backbone("vilt_tiny", out, num_token_types=backbone.num_token_types)
    assert all(m.eps == 1e-6 for m in reloaded.modules() if isinstance(m, torch.nn.LayerNorm))  # and keeps it

    # with eps 1e-6 the converted model is the original (timm blocks at 1e-6) to float precision
    pixel_values, input_ids, mask = make_inputs(backbone, (9, 4, 1))
    with torch.no_grad():
        ref = vilt_reference(sd, CONFIG, pixel_values, input_ids, mask, block_eps=1e-6)
        assert_close(backbone.eval()(pixel_values, input_ids, mask).pooled, ref, atol=1e-5, rtol=0)


def test_hf_vilt_directories_keep_their_own_eps(tmp_path):
    from transformers import ViltModel

    config = CONFIG.__class__.from_dict({**CONFIG.to_dict(), "layer_norm_eps": 1e-12})
    ViltModel(config).save_pretrained(tmp_path / "hf")
    assert build_backbone("vilt_tiny", tmp_path / "hf").config.layer_norm_eps == 1e-12
