"""ViLT: parity with transformers' ViLT, HF directories, and original timm-style checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from model_refs import make_inputs, original_vilt_state, vilt_reference
from safetensors.torch import load_file, save_file
from torch.testing import assert_close
from transformers import ViltForImagesAndTextClassification, ViltForQuestionAnswering, ViltModel

from pumer_lightning.models import (
    CheckpointError,
    build_backbone,
    build_head,
    load_head_weights,
    read_checkpoint,
    save_checkpoint,
)
from pumer_lightning.models.build import new_backbone
from pumer_lightning.models.convert import convert

CONFIG = new_backbone("vilt_tiny").config
quiet = dict(log=lambda message: None)


def _hf_config(**changes):
    config = CONFIG.__class__.from_dict({**CONFIG.to_dict(), **changes})
    return config


def _raster_order(hf_model, pixel_values, seed):
    """The patch order HF's `visual_embed` draws with ``seed``, as indices into our raster-ordered image tokens."""
    torch.manual_seed(seed)
    mask = torch.ones(pixel_values.shape[0], *pixel_values.shape[-2:], dtype=torch.long)
    _, _, (patch_index, _) = hf_model.embeddings.visual_embed(pixel_values, mask)
    grid_w = pixel_values.shape[-1] // CONFIG.patch_size
    return patch_index[..., 0] * grid_w + patch_index[..., 1] + 1  # +1: our image CLS is at 0


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_matches_transformers_vilt_model(tmp_path, attn_impl):
    hf = ViltModel(_hf_config()).eval()
    hf.save_pretrained(tmp_path)
    ours = build_backbone("vilt_tiny", tmp_path, attn_impl=attn_impl).eval()
    pixel_values, input_ids, mask = make_inputs(ours, (8, 5, 2))
    length = input_ids.shape[1]
    with torch.no_grad():
        order = _raster_order(hf, pixel_values, seed=7)
        torch.manual_seed(7)  # HF shuffles patches; replay its draw to align image tokens
        ref = hf(input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values)
        got = ours(pixel_values, input_ids, mask)
    assert_close(got.pooled, ref.pooler_output, atol=1e-5, rtol=0)
    assert_close(got.text_states, ref.last_hidden_state[:, :length], atol=1e-5, rtol=0)
    image = got.image_states
    aligned = torch.cat([image[:, :1], image.gather(1, order[..., None].expand(-1, -1, image.shape[-1]))], 1)
    assert_close(aligned, ref.last_hidden_state[:, length:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_matches_transformers_nlvr2_model(tmp_path, attn_impl):
    hf = ViltForImagesAndTextClassification(
        _hf_config(modality_type_vocab_size=3, num_images=2, num_labels=2)
    )
    hf.eval().save_pretrained(tmp_path)
    backbone = build_backbone("vilt_tiny", tmp_path, num_token_types=3, attn_impl=attn_impl).eval()
    head = build_head("nlvr2", backbone.hidden_size)
    load_head_weights(head, tmp_path, "nlvr2")
    pixel_values, input_ids, mask = make_inputs(backbone, (6, 3))
    pair = torch.stack([pixel_values, torch.randn_like(pixel_values)], dim=1)  # (B, 2, 3, H, W)
    with torch.no_grad():
        ref = hf(input_ids=input_ids, attention_mask=mask, pixel_values=pair).logits
        pooled = [backbone(pair[:, i], input_ids, mask, image_index=i).pooled for i in range(2)]
        logits = head(torch.cat(pooled, dim=-1))
    assert_close(logits, ref, atol=1e-5, rtol=0)


def test_hf_vqa_directory_loads_backbone_and_head(tmp_path):
    hf = ViltForQuestionAnswering(_hf_config(num_labels=13)).eval()
    hf.save_pretrained(tmp_path)
    ckpt = read_checkpoint(tmp_path)
    assert ckpt.kind == "hf_vilt" and ckpt.task == "vqa2"
    backbone = build_backbone("vilt_tiny", tmp_path).eval()
    # no missing or unexpected keys: every tensor of HF's ViltModel is ours under the same name
    assert set(backbone.state_dict()) == set(hf.vilt.state_dict())
    for name, value in hf.vilt.state_dict().items():
        assert torch.equal(backbone.state_dict()[name], value), name
    head = build_head("vqa2", backbone.hidden_size, num_answers=13)
    load_head_weights(head, tmp_path, "vqa2")
    pixel_values, input_ids, mask = make_inputs(backbone, (5, 5))
    with torch.no_grad():
        ref = hf(input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values).logits
        assert_close(head(backbone(pixel_values, input_ids, mask).pooled), ref, atol=1e-5, rtol=0)
    with pytest.raises(CheckpointError, match="'vqa2' head, not 'nlvr2'"):
        load_head_weights(build_head("nlvr2", backbone.hidden_size), tmp_path, "nlvr2")


def test_hf_directory_of_another_architecture_is_rejected(tmp_path):
    ViltModel(_hf_config(hidden_size=48, intermediate_size=96)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="hidden_size: checkpoint 48 vs preset 32"):
        build_backbone("vilt_tiny", tmp_path)


def test_type_rows_and_vocab_follow_the_checkpoint(tmp_path):
    ViltModel(_hf_config()).save_pretrained(tmp_path)
    extended = build_backbone("vilt_tiny", tmp_path, num_token_types=3)
    types = extended.embeddings.token_type_embeddings.weight
    assert types.shape[0] == 3 and torch.equal(types[2], types[1])
    with pytest.raises(CheckpointError, match="vocab_size=50"):
        build_backbone("vilt_tiny", tmp_path, vocab_size=50)
    assert (
        build_backbone("vilt_tiny", vocab_size=50).embeddings.text_embeddings.word_embeddings.num_embeddings
        == 50
    )


def test_strict_loading_names_every_bad_key(tmp_path):
    save_checkpoint(tmp_path, build_backbone("vilt_tiny"), preset="vilt_tiny")
    state = load_file(tmp_path / "model.safetensors")
    del state["backbone.encoder.layer.1.attention.attention.key.bias"]
    state["backbone.encoder.layer.9.output.dense.weight"] = torch.zeros(2, 2)
    state["backbone.pooler.dense.weight"] = torch.zeros(3, 3)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        build_backbone("vilt_tiny", tmp_path)
    message = str(err.value)
    assert "missing (1)" in message and "encoder.layer.1.attention.attention.key.bias" in message
    assert "unexpected (1)" in message and "encoder.layer.9.output.dense.weight" in message
    assert "pooler.dense.weight: checkpoint (3, 3) vs model (32, 32)" in message


def test_wrong_family_and_unknown_preset_are_clear(tmp_path):
    save_checkpoint(tmp_path, build_backbone("vilt_tiny"), preset="vilt_tiny")
    with pytest.raises(CheckpointError, match="holds a vilt backbone"):
        build_backbone("meter_tiny", tmp_path)
    with pytest.raises(ValueError, match="unknown backbone preset 'vilt_b16'"):
        build_backbone("vilt_b16")
    (tmp_path / "pumer_config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="format"):
        build_backbone("vilt_tiny", tmp_path)


def test_original_vilt_checkpoint_converts_and_matches_the_original_architecture(tmp_path):
    sd = original_vilt_state(CONFIG, heads=("vqa",))
    torch.save({"state_dict": sd}, tmp_path / "vilt.ckpt")
    out = convert("vilt", tmp_path / "vilt.ckpt", tmp_path / "c", preset="vilt_tiny", **quiet)
    backbone = build_backbone("vilt_tiny", out).eval()
    head = build_head("vqa2", backbone.hidden_size, num_answers=11)
    load_head_weights(head, out, "vqa2")
    pixel_values, input_ids, mask = make_inputs(backbone, (9, 4, 1))
    with torch.no_grad():
        # converted weights keep the original's epsilons (timm blocks 1e-6, BERT text embeddings 1e-12)
        ref = vilt_reference(sd, CONFIG, pixel_values, input_ids, mask)
        assert_close(backbone(pixel_values, input_ids, mask).pooled, ref, atol=1e-5, rtol=0)
    qkv = sd["transformer.blocks.2.attn.qkv.weight"]
    assert torch.equal(backbone.encoder.layer[2].attention.attention.value.weight.detach(), qkv[2 * 32 :])


def test_original_vilt_nlvr2_and_retrieval_conversions(tmp_path):
    sd = original_vilt_state(CONFIG, heads=())
    torch.save({"state_dict": sd}, tmp_path / "vilt.ckpt")
    nlvr2 = convert("vilt", tmp_path / "vilt.ckpt", tmp_path / "n", preset="vilt_tiny", task="nlvr2", **quiet)
    types = read_checkpoint(nlvr2).backbone["embeddings.token_type_embeddings.weight"]
    assert types.shape[0] == 3 and torch.equal(types[2], sd["token_type_embeddings.weight"][1])
    irtr = convert(
        "vilt", tmp_path / "vilt.ckpt", tmp_path / "r", preset="vilt_tiny", task="retrieval", **quiet
    )
    head = build_head("retrieval", 32)
    load_head_weights(head, irtr, "retrieval")
    assert torch.equal(head.rank_output.weight.detach(), sd["itm_score.fc.weight"][1:])


def test_hf_mlm_and_retrieval_directories(tmp_path):
    from transformers import ViltForImageAndTextRetrieval, ViltForMaskedLM

    ViltForMaskedLM(_hf_config()).save_pretrained(tmp_path / "mlm")
    mlm = read_checkpoint(tmp_path / "mlm")
    assert mlm.task is None and mlm.head == {}  # the MLM head has no counterpart here
    build_backbone("vilt_tiny", tmp_path / "mlm")

    hf = ViltForImageAndTextRetrieval(_hf_config()).eval()
    hf.save_pretrained(tmp_path / "irtr")
    backbone = build_backbone("vilt_tiny", tmp_path / "irtr").eval()
    head = build_head("retrieval", backbone.hidden_size)
    with pytest.raises(CheckpointError, match=r"missing \(2\):\n    itm.bias\n    itm.weight"):
        load_head_weights(head, tmp_path / "irtr", "retrieval")  # HF keeps only rank_output
    pixel_values, input_ids, mask = make_inputs(backbone, (6, 2))
    head.rank_output.load_state_dict(hf.rank_output.state_dict())
    with torch.no_grad():
        ref = hf(input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values).logits[:, 0]
        assert_close(head(backbone(pixel_values, input_ids, mask).pooled).rank, ref, atol=1e-5, rtol=0)


def test_position_table_resized_at_load_matches_hf_runtime_interpolation(tmp_path):
    hf = ViltModel(_hf_config(image_size=64)).eval()  # trained at 64 px: a 4x4 grid
    hf.save_pretrained(tmp_path)
    ours = build_backbone("vilt_tiny", tmp_path).eval()  # the preset's 96 px: 6x6, resized once at load
    assert ours.embeddings.position_embeddings.shape == (1, 37, 32)
    pixel_values, input_ids, mask = make_inputs(ours, (5, 3))
    with torch.no_grad():  # HF resizes the 4x4 table to the 6x6 input grid on every call, bilinearly
        ref = hf(input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values).pooler_output
        assert_close(ours(pixel_values, input_ids, mask).pooled, ref, atol=1e-5, rtol=0)
