"""METER: original-format weights convert, load strictly and compute what the original architecture computes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from model_refs import make_inputs, meter_reference, original_meter_state
from torch.testing import assert_close

from pumer_lightning.models import (
    CheckpointError,
    build_backbone,
    build_head,
    load_head_weights,
    read_checkpoint,
)
from pumer_lightning.models.build import new_backbone
from pumer_lightning.models.convert import convert, main

CFG = new_backbone("meter_tiny").config
quiet = dict(log=lambda message: None)


def _write(tmp_path, state, name="meter.ckpt"):
    path = tmp_path / name
    torch.save({"state_dict": state, "epoch": 3, "global_step": 100}, path)
    return path


def _classifier(sd, name, x):
    x = F.linear(x, sd[f"{name}.0.weight"], sd[f"{name}.0.bias"])
    x = F.gelu(F.layer_norm(x, x.shape[-1:], sd[f"{name}.1.weight"], sd[f"{name}.1.bias"]))
    return F.linear(x, sd[f"{name}.3.weight"], sd[f"{name}.3.bias"])


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_converted_meter_matches_original_architecture(tmp_path, attn_impl):
    sd = original_meter_state(CFG, heads=("vqa",))
    out = convert("meter", _write(tmp_path, sd), tmp_path / "converted", preset="meter_tiny", **quiet)
    model = build_backbone("meter_tiny", out, attn_impl=attn_impl).eval()
    pixel_values, input_ids, mask = make_inputs(model, (9, 5, 3))
    with torch.no_grad():
        ref_pooled, ref_text, ref_image = meter_reference(sd, CFG, pixel_values, input_ids, mask)
        got = model(pixel_values, input_ids, mask)
        head = build_head("vqa2", model.hidden_size, num_answers=11, width=model.head_width)
        load_head_weights(head, out, "vqa2")
        logits = head(got.pooled)
    assert_close(got.pooled, ref_pooled, atol=1e-5, rtol=0)
    assert_close(got.text_states, ref_text, atol=1e-5, rtol=0)
    assert_close(got.image_states, ref_image, atol=1e-5, rtol=0)
    assert_close(logits, _classifier(sd, "vqa_classifier", ref_pooled), atol=1e-5, rtol=0)
    assert got.trace.image_tokens == [37, 37, 37] and got.trace.text_tokens == [9, 9, 9]


def test_converted_file_is_complete_and_names_its_task(tmp_path):
    sd = original_meter_state(CFG, heads=("vqa",))
    out = convert("meter", _write(tmp_path, sd), tmp_path / "converted", preset="meter_tiny", **quiet)
    config = json.loads((out / "pumer_config.json").read_text())
    assert config["family"] == "meter" and config["task"] == "vqa2" and config["preset"] == "meter_tiny"
    ckpt = read_checkpoint(out)
    # every backbone tensor came from the source: q/k/v are the thirds of the fused CLIP in_proj
    in_proj = sd["vit_model.visual.transformer.resblocks.1.attn.in_proj_weight"]
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        got = ckpt.backbone[f"vit_model.encoder.layers.1.self_attn.{name}.weight"]
        assert torch.equal(got, in_proj[i * CFG.vision_hidden : (i + 1) * CFG.vision_hidden])
    assert set(ckpt.head) == {"0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"}


def test_image_size_change_interpolates_positions_bicubically_keeping_cls(tmp_path):
    small = CFG.__class__(**{**CFG.__dict__, "image_size": 64})  # source trained at 64 px (4x4 grid)
    sd = original_meter_state(small, heads=())
    out = convert("meter", _write(tmp_path, sd), tmp_path / "c", preset="meter_tiny", image_size=96, **quiet)
    model = build_backbone("meter_tiny", out).eval()
    table = sd["vit_model.visual.positional_embedding"]
    grid = table[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    expected = torch.cat([table[:1], expected.permute(0, 2, 3, 1).reshape(36, -1)])
    assert_close(model.vit_model.embeddings.position_embedding.weight.detach(), expected)
    assert torch.equal(model.vit_model.embeddings.position_embedding.weight[0].detach(), table[0])
    # and the converted model computes the original architecture with the resized table
    pixel_values, input_ids, mask = make_inputs(model, (6, 4))
    with torch.no_grad():
        ref = meter_reference(
            {**sd, "vit_model.visual.positional_embedding": expected}, CFG, pixel_values, input_ids, mask
        )[0]
        assert_close(model(pixel_values, input_ids, mask).pooled, ref, atol=1e-5, rtol=0)


def test_nlvr2_from_pretrained_gets_type_row_2_from_row_1(tmp_path):
    sd = original_meter_state(CFG, heads=())
    out = convert("meter", _write(tmp_path, sd), tmp_path / "c", preset="meter_tiny", task="nlvr2", **quiet)
    ckpt = read_checkpoint(out)
    assert ckpt.head == {} and ckpt.task is None  # no NLVR2 classifier in a pretrained checkpoint
    types = ckpt.backbone["token_type_embeddings.weight"]
    assert (
        types.shape[0] == 3
        and torch.equal(types[2], types[1])
        and torch.equal(types[:2], sd["token_type_embeddings.weight"])
    )
    with pytest.raises(CheckpointError, match="num_token_types=3"):
        build_backbone("meter_tiny", out)
    model = build_backbone("meter_tiny", out, num_token_types=3).eval()
    pixel_values, input_ids, mask = make_inputs(model, (5, 3))
    with torch.no_grad():
        first, second = (model(pixel_values, input_ids, mask, image_index=i).pooled for i in (0, 1))
    assert torch.equal(first, second)


def test_nlvr2_checkpoint_second_image_uses_type_row_2(tmp_path):
    sd = original_meter_state(CFG, heads=("nlvr2",))
    sd["token_type_embeddings.weight"] = torch.randn(3, CFG.hidden)  # fine-tuned NLVR2 models have 3 rows
    out = convert("meter", _write(tmp_path, sd), tmp_path / "c", preset="meter_tiny", **quiet)
    model = build_backbone("meter_tiny", out, num_token_types=3).eval()
    head = build_head("nlvr2", model.hidden_size, width=model.head_width)
    load_head_weights(head, out, "nlvr2")
    pixel_values, input_ids, mask = make_inputs(model, (7, 4))
    second = torch.randn_like(pixel_values)
    with torch.no_grad():
        pair = torch.cat(
            [model(pixel_values, input_ids, mask, 0).pooled, model(second, input_ids, mask, 1).pooled], -1
        )
        ref = torch.cat(
            [
                meter_reference(sd, CFG, pixel_values, input_ids, mask, 0)[0],
                meter_reference(sd, CFG, second, input_ids, mask, 1)[0],
            ],
            -1,
        )
        assert_close(head(pair), _classifier(sd, "nlvr2_classifier", ref), atol=1e-5, rtol=0)


def test_retrieval_rank_head_comes_from_the_itm_match_row(tmp_path):
    sd = original_meter_state(CFG, heads=())
    out = convert(
        "meter", _write(tmp_path, sd), tmp_path / "c", preset="meter_tiny", task="retrieval", **quiet
    )
    model = build_backbone("meter_tiny", out)
    head = build_head("retrieval", model.hidden_size)
    load_head_weights(head, out, "retrieval")
    assert torch.equal(head.rank_output.weight.detach(), sd["itm_score.fc.weight"][1:])
    assert torch.equal(head.rank_output.bias.detach(), sd["itm_score.fc.bias"][1:])
    assert torch.equal(head.itm.weight.detach(), sd["itm_score.fc.weight"])


def test_unknown_source_key_is_named(tmp_path):
    sd = original_meter_state(CFG, heads=())
    sd["cross_modal_fusion.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match="cross_modal_fusion.weight"):
        convert("meter", _write(tmp_path, sd), tmp_path / "c", preset="meter_tiny", **quiet)


def test_missing_and_unexpected_keys_are_all_named(tmp_path):
    sd = original_meter_state(CFG, heads=())
    del sd["cross_modal_image_layers.2.crossattention.self.key.bias"]
    del sd["vit_model.visual.ln_post.weight"]
    sd["cross_modal_text_layers.7.output.dense.bias"] = torch.zeros(CFG.hidden)  # a block the preset lacks
    with pytest.raises(CheckpointError) as err:
        convert("meter", _write(tmp_path, sd), tmp_path / "c", preset="meter_tiny", **quiet)
    message = str(err.value)
    assert "missing (2)" in message and "unexpected (1)" in message
    for key in (
        "cross_modal_image_layers.2.crossattention.self.key.bias",
        "vit_model.post_layernorm.weight",
        "cross_modal_text_layers.7.output.dense.bias",
    ):
        assert key in message


def test_several_heads_need_a_task_choice(tmp_path):
    sd = original_meter_state(CFG, heads=("vqa", "snli"))
    with pytest.raises(ValueError, match="--task"):
        convert("meter", _write(tmp_path, sd), tmp_path / "c", preset="meter_tiny", **quiet)
    out = convert("meter", _write(tmp_path, sd), tmp_path / "c", preset="meter_tiny", task="snli_ve", **quiet)
    assert read_checkpoint(out).task == "snli_ve"


def test_cli(tmp_path, capsys):
    src = _write(tmp_path, original_meter_state(CFG, heads=("vqa",)))
    assert (
        main(["meter", str(src), str(tmp_path / "out"), "--preset", "meter_tiny", "--token-types", "3"]) == 0
    )
    printed = capsys.readouterr().out
    assert "vqa2" in printed and "dropped" in printed and "mlm_score" in printed
    assert read_checkpoint(tmp_path / "out").backbone["token_type_embeddings.weight"].shape[0] == 3
    assert main(["meter", str(tmp_path / "absent.ckpt"), str(tmp_path / "x")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_single_file_output_round_trips(tmp_path):
    sd = original_meter_state(CFG, heads=())
    out = convert("meter", _write(tmp_path, sd), tmp_path / "meter_tiny.pt", preset="meter_tiny", **quiet)
    assert out.is_file()
    model = build_backbone("meter_tiny", out)
    assert torch.equal(
        model.cross_modal_text_pooler.dense.weight.detach(), sd["cross_modal_text_pooler.dense.weight"]
    )


def test_converted_meter_checkpoint_records_its_architecture(tmp_path):
    """Build options (image size, vocabulary, type rows, dropout) are not the architecture; heads are."""
    from pumer_lightning.models import CheckpointError, build_backbone, save_checkpoint

    backbone = build_backbone("meter_tiny")
    arch = backbone.architecture
    assert arch["cross_heads"] == 2 and arch["vision_heads"] == 2 and arch["text_heads"] == 2
    assert not {"image_size", "vocab_size", "num_token_types", "dropout", "max_text_len"} & set(arch)
    path = save_checkpoint(tmp_path / "meter.pt", backbone, preset="meter_tiny")
    blob = torch.load(path, weights_only=False)
    blob["config"]["architecture"]["cross_heads"] = 4
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match=r"cross_heads: checkpoint 4 vs preset 'meter_tiny' 2"):
        build_backbone("meter_tiny", path)
