"""Converted original checkpoints keep every LayerNorm epsilon of the original architecture.

Original ViLT: text embeddings 1e-12 (transformers' `BertEmbeddings`), timm blocks and final norm 1e-6, VQA head
1e-5. Original METER: CLIP's visual tower and RoBERTa 1e-5, the co-attention layers 1e-12 (a default
`BertConfig`), heads 1e-5. Each original LayerNorm's weight is tagged with its own value before conversion, so the
converted model's norms are matched to the original ones by their weights, not by the converter's renaming.
"""

from __future__ import annotations

import logging

import torch
from model_refs import OriginalVilt, make_inputs, original_meter_state
from torch import nn
from torch.testing import assert_close

from pumer_lightning.models import build_backbone, build_head, load_head_weights, read_checkpoint
from pumer_lightning.models.build import new_backbone
from pumer_lightning.models.convert import convert

CONFIG = new_backbone("vilt_tiny").config
quiet = dict(log=lambda message: None)


def _tag_norms(state: dict[str, torch.Tensor], names: list[str]) -> dict[float, str]:
    """Give the weight of each named LayerNorm in ``state`` its own constant; returns value -> name."""
    tags = {}
    for i, name in enumerate(sorted(names)):
        value = 1.0 + (i + 1) / 128
        state[f"{name}.weight"] = torch.full_like(state[f"{name}.weight"], value)
        tags[value] = name
    return tags


def _converted_eps(tags: dict[float, str], *modules: nn.Module) -> dict[str, float]:
    """Original name -> eps of the converted LayerNorm that carries that original's tag."""
    found: dict[str, float] = {}
    for module in modules:
        for name, norm in module.named_modules():
            if isinstance(norm, nn.LayerNorm):
                weight = norm.weight.detach()
                assert torch.all(weight == weight[0]), f"{name} carries no single tag"
                original = tags[weight[0].item()]
                assert original not in found, f"{original} was converted into two LayerNorms"
                found[original] = norm.eps
    return found


def test_every_layer_norm_of_a_converted_original_vilt_has_the_original_eps(tmp_path):
    original = OriginalVilt(CONFIG, num_answers=11)
    original_eps = {n: m.eps for n, m in original.named_modules() if isinstance(m, nn.LayerNorm)}
    assert original_eps["text_embeddings.LayerNorm"] == 1e-12  # what the original architecture says
    assert original_eps["transformer.norm"] == original_eps["transformer.blocks.3.norm2"] == 1e-6
    assert original_eps["vqa_classifier.1"] == 1e-5
    state = original.state_dict()
    tags = _tag_norms(state, list(original_eps))
    torch.save({"state_dict": state}, tmp_path / "vilt.ckpt")
    out = convert("vilt", tmp_path / "vilt.ckpt", tmp_path / "c", preset="vilt_tiny", task="vqa2", **quiet)

    backbone = build_backbone("vilt_tiny", out)  # the load path every command uses
    head = build_head("vqa2", backbone.hidden_size, 11, width=backbone.head_width)
    load_head_weights(head, out, "vqa2")
    assert _converted_eps(tags, backbone, head) == original_eps
    arch = read_checkpoint(out).config["architecture"]
    assert (arch["layer_norm_eps"], arch["text_layer_norm_eps"]) == (1e-6, 1e-12)
    assert backbone.architecture == arch


def test_converted_original_vilt_matches_the_original_modules(tmp_path):
    """At the originals' initial scale, one wrong epsilon moves the states by ~5e-5 (see the last check)."""
    original = OriginalVilt(CONFIG).eval()
    torch.save({"state_dict": original.state_dict()}, tmp_path / "vilt.ckpt")
    out = convert("vilt", tmp_path / "vilt.ckpt", tmp_path / "c", preset="vilt_tiny", **quiet)
    backbone = build_backbone("vilt_tiny", out).eval()
    pixel_values, input_ids, mask = make_inputs(backbone, (9, 4, 1))
    with torch.no_grad():
        pooled, states = original(pixel_values, input_ids, mask)
        got = backbone(pixel_values, input_ids, mask)
        assert_close(got.pooled, pooled, atol=1e-5, rtol=0)
        ours = torch.cat([got.text_states, got.image_states], dim=1)
        assert_close(ours, states, atol=5e-6, rtol=0)
        backbone.embeddings.text_embeddings.LayerNorm.eps = 1e-6  # one epsilon everywhere: measurably off
        drifted = backbone(pixel_values, input_ids, mask)
        assert (torch.cat([drifted.text_states, drifted.image_states], 1) - states).abs().max() > 2e-5


def _meter_original_eps(key: str) -> float:
    """LayerNorm eps of original METER's module holding ``key`` (its clip_model.py, roberta-base, BertConfig)."""
    if key.startswith(("vit_model.", "text_transformer.")) or "_classifier." in key:
        return 1e-5  # CLIP's nn.LayerNorm subclass, roberta-base's layer_norm_eps, nn.LayerNorm in the heads
    if key.startswith(("cross_modal_", "mlm_score.")):
        return 1e-12  # BertConfig() default in the co-attention layers and the MLM head
    raise AssertionError(f"no LayerNorm expected at {key}")


def test_every_layer_norm_of_a_converted_original_meter_has_the_original_eps(tmp_path):
    state = original_meter_state(new_backbone("meter_tiny").config, heads=("vqa",))
    norms = [k[: -len(".weight")] for k in state if _is_norm(k)]
    unused = {
        n for n in norms if n.startswith(("vit_model.ln_final", "mlm_score."))
    }  # dropped by the converter
    tags = _tag_norms(state, norms)
    torch.save({"state_dict": state}, tmp_path / "meter.ckpt")
    out = convert("meter", tmp_path / "meter.ckpt", tmp_path / "c", preset="meter_tiny", **quiet)
    backbone = build_backbone("meter_tiny", out)
    head = build_head("vqa2", backbone.hidden_size, 11, width=backbone.head_width)
    load_head_weights(head, out, "vqa2")
    found = _converted_eps(tags, backbone, head)
    assert set(found) == set(norms) - unused
    assert found == {n: _meter_original_eps(n) for n in found}
    assert set(found.values()) == {1e-5, 1e-12}


def _is_norm(key: str) -> bool:
    """Whether ``key`` is the weight of a LayerNorm in original METER's layout."""
    norms = ("LayerNorm", "ln_pre", "ln_post", "ln_1", "ln_2", "ln_final", "_classifier.1")
    return key.endswith(".weight") and key[: -len(".weight")].endswith(norms)


def test_hf_vilt_directories_keep_their_own_eps(tmp_path):
    from transformers import ViltModel

    config = CONFIG.__class__.from_dict({**CONFIG.to_dict(), "layer_norm_eps": 1e-12})
    ViltModel(config).save_pretrained(tmp_path / "hf")
    backbone = build_backbone("vilt_tiny", tmp_path / "hf")
    assert {m.eps for m in backbone.modules() if isinstance(m, nn.LayerNorm)} == {1e-12}
    assert backbone.architecture["text_layer_norm_eps"] == 1e-12


def test_an_older_conversion_without_the_text_eps_loads_as_written_and_says_so(tmp_path, caplog):
    """Converted before the text embeddings kept 1e-12: rebuilt as it was converted (1e-6 everywhere), with a
    warning naming the source to convert again."""
    torch.save({"state_dict": OriginalVilt(CONFIG).state_dict()}, tmp_path / "vilt.ckpt")
    out = convert("vilt", tmp_path / "vilt.ckpt", tmp_path / "old.pt", preset="vilt_tiny", **quiet)
    blob = torch.load(out, weights_only=True)
    del blob["config"]["text_layer_norm_eps"], blob["config"]["architecture"]["text_layer_norm_eps"]
    torch.save(blob, out)
    with caplog.at_level(logging.WARNING, logger="pumer_lightning.models.build"):
        backbone = build_backbone("vilt_tiny", out)
    assert {m.eps for m in backbone.modules() if isinstance(m, nn.LayerNorm)} == {1e-6}
    (record,) = [r for r in caplog.records if "older version" in r.getMessage()]
    assert str(out) in record.getMessage() and str(tmp_path / "vilt.ckpt") in record.getMessage()


def test_the_convert_log_names_the_epsilons(tmp_path):
    torch.save({"state_dict": OriginalVilt(CONFIG).state_dict()}, tmp_path / "vilt.ckpt")
    lines: list[str] = []
    convert("vilt", tmp_path / "vilt.ckpt", tmp_path / "c", preset="vilt_tiny", log=lines.append)
    assert "LayerNorm eps as original ViLT: 1e-06 (blocks, final norm), 1e-12 (text embeddings)" in lines


def test_a_converted_vilt_saved_again_keeps_its_epsilons(tmp_path):
    """A converted original ViLT written again by `save_checkpoint` (a pre-training export, say) rebuilds with the
    same epsilons; before, it was rebuilt at the preset's 1e-12 and refused by the architecture check."""
    from pumer_lightning.models import save_checkpoint

    torch.save({"state_dict": OriginalVilt(CONFIG).state_dict()}, tmp_path / "vilt.ckpt")
    out = convert("vilt", tmp_path / "vilt.ckpt", tmp_path / "c", preset="vilt_tiny", **quiet)
    again = save_checkpoint(tmp_path / "again.pt", build_backbone("vilt_tiny", out), preset="vilt_tiny")
    rebuilt = build_backbone("vilt_tiny", again)
    assert (rebuilt.embeddings.text_embeddings.LayerNorm.eps, rebuilt.layernorm.eps) == (1e-12, 1e-6)
    assert {m.eps for m in rebuilt.encoder.modules() if isinstance(m, nn.LayerNorm)} == {1e-6}
