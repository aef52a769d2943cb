"""Reducers inside the backbones: token counts, identity when off, batch independence, gradients."""

from __future__ import annotations

import pytest
import torch
from model_refs import make_inputs
from torch.testing import assert_close

from pumer_lightning.models import build_backbone
from pumer_lightning.reduce import ReducerSchedule

PRESETS = ["vilt_tiny", "meter_tiny"]
# reduce at the last three reducible layers of each tiny model (ViLT: 4 blocks, METER: 3 co-attention blocks)
LAYERS = {"vilt_tiny": [1, 2, 3], "meter_tiny": [0, 1, 2]}


def _schedule(preset, **changes):
    kwargs = dict(layers=LAYERS[preset], keep_ratio=0.7, merge_ratio=0.3, text_merge_ratio=0.3)
    return ReducerSchedule(**{**kwargs, **changes})


@pytest.mark.parametrize("preset", PRESETS)
def test_trace_follows_the_schedule_exactly(preset):
    schedule = _schedule(preset)
    model = build_backbone(preset, reducer=schedule).eval()
    pixel_values, input_ids, mask = make_inputs(model, (9, 5, 3))
    with torch.no_grad():
        out = model(pixel_values, input_ids, mask, track_maps=True)
    trace = out.trace
    assert trace.layers == list(range(model.num_layers))
    expected_image, expected_text = schedule.tokens_per_layer(model.num_image_tokens, 9, model.num_layers)
    assert (trace.image_tokens, trace.text_tokens) == (expected_image, expected_text)
    # hand-computed: 37 -> keep 26 (round(11.1) pruned) -> merge 11 -> 15 -> keep 10 -> merge 3 (cap 4) -> 7
    offset = model.num_layers - 3
    assert trace.image_tokens[offset:] == [37, 15, 7]
    assert trace.text_tokens[offset:] == [9, 6, 4]  # round(2.7) = 3 merged, then round(1.8) = 2
    plan = schedule.plan(model.num_image_tokens, 9)
    assert out.image_states.shape[1] == plan[-1].image_out == 3
    assert out.text_states.shape[1] == out.text_mask.shape[1] == plan[-1].text_out == 3
    assert out.pooled.shape == (3, model.hidden_size)
    # patch maps: one per reduction; the image CLS stays at 0; every output token holds some original patch
    assert len(trace.patch_maps) == len(plan)
    for step, patch_map in zip(plan, trace.patch_maps):
        assert patch_map.shape == (3, model.num_image_tokens)
        assert (patch_map[:, 0] == 0).all()
        for row in patch_map:
            assert set(row[row >= 0].tolist()) == set(range(step.image_out))
    # text CLS stays first and real; masks stay binary
    assert (out.text_mask[:, 0] == 1).all() and set(out.text_mask.unique().tolist()) <= {0, 1}


@pytest.mark.parametrize("preset", PRESETS)
def test_identity_schedule_equals_reducer_off(preset):
    model = build_backbone(preset).eval()
    pixel_values, input_ids, mask = make_inputs(model, (8, 3))
    with torch.no_grad():
        off = model(pixel_values, input_ids, mask)
        model.reducer = ReducerSchedule(
            layers=list(range(model.num_layers)),
            keep_ratio=1.0,
            merge_ratio=0.0,
            text_merge_ratio=0.0,
            prop_attn=True,
        )
        on = model(pixel_values, input_ids, mask)
    for name in ("pooled", "text_states", "image_states", "text_mask"):
        assert torch.equal(getattr(on, name), getattr(off, name)), name
    assert on.trace.image_tokens == off.trace.image_tokens == [model.num_image_tokens] * model.num_layers


@pytest.mark.parametrize("prop_attn", [False, True])
@pytest.mark.parametrize("preset", PRESETS)
def test_example_does_not_depend_on_its_batch(preset, prop_attn):
    model = build_backbone(preset, reducer=_schedule(preset, prop_attn=prop_attn)).eval()
    pixel_values, input_ids, mask = make_inputs(model, (11, 5, 2), seed=3)
    with torch.no_grad():
        in_batch = model(pixel_values, input_ids, mask)
        alone = model(pixel_values[1:2], input_ids[1:2, :5], mask[1:2, :5])  # no padding at all
        shuffled = model(pixel_values[[2, 1]], input_ids[[2, 1], :6], mask[[2, 1], :6])  # other pad length
    assert in_batch.trace.text_tokens != alone.trace.text_tokens  # the batches really are shaped differently
    assert_close(in_batch.pooled[1:2], alone.pooled, atol=1e-5, rtol=0)
    assert_close(shuffled.pooled[1:2], alone.pooled, atol=1e-5, rtol=0)
    assert_close(in_batch.image_states[1:2], alone.image_states, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", PRESETS)
def test_gradients_flow_in_train_mode(preset):
    model = build_backbone(preset, reducer=_schedule(preset, prop_attn=True)).train()
    pixel_values, input_ids, mask = make_inputs(model, (9, 4))
    out = model(pixel_values, input_ids, mask)
    (
        out.pooled.square().sum() + out.image_states.square().mean() + out.text_states.square().mean()
    ).backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None]
    assert no_grad == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    first_patch = next(p for name, p in model.named_parameters() if "patch" in name)
    assert first_patch.grad.abs().sum() > 0


@pytest.mark.parametrize("preset", PRESETS)
def test_proportional_attention_and_ablation_importances(preset):
    model = build_backbone(preset).eval()
    pixel_values, input_ids, mask = make_inputs(model, (9, 5, 3))
    outputs = {}
    with torch.no_grad():
        for key, changes in {
            "text": {},
            "prop": dict(prop_attn=True),
            "cls": dict(importance="cls"),
            "random": dict(importance="random"),
        }.items():
            model.reducer = _schedule(preset, **changes)
            outputs[key] = model(pixel_values, input_ids, mask, track_maps=True)
    counts = {key: (o.trace.image_tokens, o.trace.text_tokens) for key, o in outputs.items()}
    assert len(set(map(str, counts.values()))) == 1  # same budget whatever ranks the tokens
    assert not torch.allclose(outputs["prop"].pooled, outputs["text"].pooled, atol=1e-4)
    kept = {key: o.trace.patch_maps[0] >= 0 for key, o in outputs.items()}
    assert not torch.equal(kept["text"], kept["random"])


@pytest.mark.parametrize("preset", PRESETS)
def test_reducer_layers_are_checked_against_the_depth(preset):
    depth = {"vilt_tiny": 4, "meter_tiny": 3}[preset]
    with pytest.raises(ValueError, match=rf"\[{depth}\].*{depth} reducible blocks"):
        build_backbone(preset, reducer=ReducerSchedule(layers=[0, depth], keep_ratio=0.5))
    model = build_backbone(preset, reducer=ReducerSchedule(layers=[0], keep_ratio=0.5))
    with pytest.raises(ValueError, match=str(depth + 2)):
        model.reducer = ReducerSchedule(layers=[depth + 2], keep_ratio=0.5)
    assert model.reducer.layers == [0]
    with pytest.raises(TypeError):
        model.reducer = {"layers": [0]}


@pytest.mark.parametrize("preset", PRESETS)
def test_bf16_autocast_and_other_image_sizes(preset):
    model = build_backbone(preset, reducer=_schedule(preset, prop_attn=True)).eval()
    pixel_values, input_ids, mask = make_inputs(model, (7, 3), image_size=64)  # 4x4 grid instead of 6x6
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(pixel_values, input_ids, mask)
    assert torch.isfinite(out.pooled.float()).all()
    assert out.trace.image_tokens[-3:] == [17, 7, 3]


def test_inputs_are_validated(tiny_vilt, tiny_meter):
    pixel_values, input_ids, mask = make_inputs(tiny_vilt, (4, 2))
    with pytest.raises(ValueError, match="num_token_types=3"):
        tiny_vilt(pixel_values, input_ids, mask, image_index=1)
    with pytest.raises(ValueError, match="exceeds the 40 positions"):
        long = torch.ones(2, 41, dtype=torch.long)
        tiny_vilt(pixel_values, long, long)
    with pytest.raises(ValueError, match="batch sizes differ"):
        tiny_vilt(pixel_values[:1], input_ids, mask)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny_meter(torch.zeros(2, 3, 90, 90), input_ids, mask)


@pytest.mark.parametrize("preset", PRESETS)
def test_padding_ids_do_not_matter(preset):
    model = build_backbone(preset, reducer=_schedule(preset)).eval()
    pixel_values, input_ids, mask = make_inputs(model, (9, 4, 2))
    other = input_ids.clone()
    other[mask == 0] = 7  # a tokenizer with another pad id (positions come from the mask, not the ids)
    with torch.no_grad():
        assert_close(model(pixel_values, other, mask).pooled, model(pixel_values, input_ids, mask).pooled)


@pytest.mark.parametrize("preset", PRESETS)
def test_a_reducer_at_the_last_vilt_block_leaves_the_pooled_output_unchanged(preset):
    """ViLT pools the text CLS, which reduction protects, and its last MLP is per token: a reducer at the last
    block saves FLOPs there and changes no prediction (why the study's placement control skips it), while one a
    block earlier does. METER's last co-attention block still cross-attends after its reducer: it changes."""
    model = build_backbone(preset).eval()
    pixel_values, input_ids, mask = make_inputs(model, (9, 5, 3))
    last = model.num_layers - 1
    with torch.no_grad():
        off = model(pixel_values, input_ids, mask).pooled
        at = {}
        for layer in (last, last - 1):
            with model.using(_schedule(preset, layers=[layer], keep_ratio=0.5)):
                at[layer] = model(pixel_values, input_ids, mask)
    assert at[last].image_states.shape[1] < model.num_image_tokens
    if preset == "vilt_tiny":
        assert_close(at[last].pooled, off, rtol=1e-5, atol=1e-6)
    else:
        assert not torch.allclose(at[last].pooled, off, atol=1e-4)
    assert not torch.allclose(at[last - 1].pooled, off, atol=1e-4)
