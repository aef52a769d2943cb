"""The bench's instruments and inputs: FLOP counting with SDPA, tensor memory tracking, reducer timing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pumer_lightning.bench import EXPERIMENTS, Options, get_experiment, make_inputs, make_settings
from pumer_lightning.bench.__main__ import parse_args
from pumer_lightning.bench.experiments import SPECIAL_IDS, build_model
from pumer_lightning.bench.measure import ReducerTimer, TensorMemoryTracker, count_flops
from pumer_lightning.bench.runner import select_settings
from pumer_lightning.models import build_backbone
from pumer_lightning.models import meter as meter_module
from pumer_lightning.reduce import ReducerSchedule
from pumer_lightning.reduce.released import RELEASED


# ---- FLOPs ------------------------------------------------------------------------------------------------------
def test_sdpa_flops_are_counted_with_and_without_a_mask():
    """Plain FlopCounterMode counts 0 for the CPU fused kernel; ours counts QK^T and AV, 2 FLOPs per MAC."""
    b, h, lq, lk, d = 2, 3, 5, 7, 8
    q, k, v = torch.randn(b, h, lq, d), torch.randn(b, h, lk, d), torch.randn(b, h, lk, d)
    bias = torch.zeros(b, 1, 1, lk)
    with torch.inference_mode(), count_flops() as flops:
        F.scaled_dot_product_attention(q, k, v)
        F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert flops["total"] == 2 * (2 * b * h * lq * lk * d * 2)
    assert flops["uncounted_ops"] == []


@pytest.mark.parametrize("preset", ["vilt_tiny", "meter_tiny"])
def test_fused_and_explicit_attention_count_the_same_flops(preset):
    """The SDPA formula agrees with the matmuls of the explicit-softmax path, reducer on or off."""
    schedule = ReducerSchedule(layers=[1, 2], keep_ratio=0.7, merge_ratio=0.3, text_merge_ratio=0.2)
    exp = get_experiment("vilt_vqa2" if preset == "vilt_tiny" else "meter_vqa2", tiny=True)
    totals = {}
    for impl in ("sdpa", "eager"):
        torch.manual_seed(0)
        backbone = build_backbone(preset, attn_impl=impl).eval()
        inputs = make_inputs(exp, backbone, 2)
        for reducer in (None, schedule):
            backbone.reducer = reducer
            with torch.inference_mode(), count_flops() as flops:
                backbone(inputs.pixel_values[0], inputs.input_ids, inputs.attention_mask)
            totals[impl, reducer is None] = flops["total"]
    assert totals["sdpa", True] == totals["eager", True]
    assert totals["sdpa", False] == totals["eager", False] < totals["sdpa", True]


def test_flops_of_one_vilt_layer_match_the_formula():
    """A ViLT block of N tokens, width C, MLP width I: 2 (4 N C^2 + 2 N^2 C + 2 N C I) FLOPs."""
    backbone = build_backbone("vilt_tiny").eval()
    exp = get_experiment("vilt_vqa2", tiny=True)
    inputs = make_inputs(exp, backbone, 1)
    with torch.inference_mode(), count_flops() as flops:
        backbone(inputs.pixel_values[0], inputs.input_ids, inputs.attention_mask)
    n, c, i = (
        backbone.num_image_tokens + exp.text_len,
        backbone.hidden_size,
        backbone.config.intermediate_size,
    )
    per_layer = 2 * (4 * n * c * c + 2 * n * n * c + 2 * n * c * i)
    patches = 2 * (backbone.num_image_tokens - 1) * c * 3 * backbone.patch_size**2
    pooler = 2 * c * c
    assert flops["total"] == backbone.num_layers * per_layer + patches + pooler


# ---- memory -----------------------------------------------------------------------------------------------------
def test_memory_tracker_counts_live_storages_once():
    weights = torch.randn(1000)  # 4000 bytes, alive before the block
    with torch.inference_mode(), TensorMemoryTracker([weights]) as tracker:
        a = weights * 2  # +4000
        view = a.view(10, 100)  # a view: no new storage
        b = view + 1  # +4000 -> 8000 live
        del a, view  # a's storage is freed
        c = b * 3  # +4000 -> 8000 live again
        d = torch.cat([c, c])  # +8000 -> 16000 peak
        del d
        e = weights[:10]  # a view of a static storage: not counted
    assert tracker.static_bytes == 4000
    assert tracker.peak_new_bytes == 16000
    assert tracker.peak_bytes == 20000
    assert tracker.current_new_bytes == 8000  # b and c are still alive
    del b, c, e


# ---- reducer timer ----------------------------------------------------------------------------------------------
def test_reducer_timer_times_reducer_calls_and_restores_the_backbone():
    backbone = build_backbone("meter_tiny").eval()
    exp = get_experiment("meter_vqa2", tiny=True)
    inputs = make_inputs(exp, backbone, 2)
    original = meter_module.reduce
    timer = ReducerTimer(backbone, torch.device("cpu"))
    assert timer.available
    with torch.inference_mode(), timer:
        assert meter_module.reduce is not original
        for reducer, calls in ((None, 0), (exp.released, 2 * len(exp.released.layers))):
            backbone.reducer = reducer
            timer.start()
            backbone(inputs.pixel_values[0], inputs.input_ids, inputs.attention_mask)
            assert timer.calls == calls  # _reduction_inputs + reduce at every reduce block
            assert (timer.elapsed() > 0) == (calls > 0)
    assert meter_module.reduce is original and "_reduction_inputs" not in vars(backbone)


def test_reducer_timer_reports_unavailable_for_a_backbone_without_reducer_calls():
    class Plain(torch.nn.Module):
        pass

    timer = ReducerTimer(Plain(), torch.device("cpu"))
    with timer:
        pass
    assert not timer.available


# ---- experiments, inputs, settings -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_full_size_experiments_match_the_released_shapes(name):
    exp = get_experiment(name)
    released = RELEASED[name]
    assert exp.released == released.schedule and exp.text_len == released.n_text
    from pumer_lightning.models.build import preset_image_size

    size = preset_image_size(exp.preset)
    patch = 32 if exp.family == "vilt" else 16
    assert (size // patch) ** 2 + 1 == released.n_image
    assert size == {"vilt": 384, "meter": 288 if exp.task == "nlvr2" else 384}[exp.family]
    assert exp.images_per_example == (2 if exp.task == "nlvr2" else 1)


@pytest.mark.parametrize("family", ["vilt", "meter"])
def test_inputs_have_real_masks_and_special_tokens(family):
    backbone = SimpleNamespace(family=family, config=SimpleNamespace(vocab_size=30522), image_size=64)
    exp = get_experiment(f"{family}_nlvr2")
    inputs = make_inputs(exp, backbone, 16, seed=3)
    cls_id, sep_id, pad_id = SPECIAL_IDS[family]
    lengths = inputs.attention_mask.sum(1)
    assert lengths.tolist() == inputs.text_lengths and lengths[0] == exp.text_len
    assert lengths.min() >= round(0.4 * exp.text_len) and len(set(lengths.tolist())) > 3
    assert (inputs.input_ids[:, 0] == cls_id).all()
    for row, n in zip(inputs.input_ids, lengths.tolist()):
        assert row[n - 1] == sep_id and (row[n:] == pad_id).all()
        assert (row[1 : n - 1] >= 1000).all()
    assert len(inputs.pixel_values) == 2 and not torch.equal(*inputs.pixel_values)
    assert inputs.pixel_values[0].shape == (16, 3, 64, 64)
    again = make_inputs(exp, backbone, 16, seed=3)
    assert torch.equal(again.input_ids, inputs.input_ids)


def test_settings_are_one_change_from_the_released_one():
    exp = get_experiment("meter_nlvr2")
    settings = {s.name: s for s in make_settings(exp, keep_sweep=(0.5, 0.7))}
    rel = settings["pumer"].schedule
    assert rel.layers == [1, 2, 3] and (rel.keep_ratio, rel.merge_ratio, rel.text_merge_ratio) == (
        0.7,
        0.5,
        0.2,
    )
    assert settings["baseline"].schedule is None
    assert settings["random_prune"].schedule.importance == "random"
    assert settings["random_prune"].schedule.plan(325, 40) == rel.plan(325, 40)
    assert settings["no_text_merge"].schedule.text_merge_ratio == 0.0
    assert "keep_0.7" not in settings and settings["keep_0.5"].schedule.merge_ratio == 0.5


def test_setting_selection_always_keeps_the_baseline():
    exp = get_experiment("vilt_vqa2", tiny=True)
    names = [s.name for s in select_settings(exp, Options(settings=["random_prune"]))]
    assert names == ["baseline", "random_prune"]
    with pytest.raises(ValueError, match="unknown setting 'keep_0.3'"):
        select_settings(exp, Options(settings=["keep_0.3"]))


def test_cli_options():
    exps, opts = parse_args(["vilt_nlvr2", "meter_nlvr2", "--quick"])
    assert exps == ["vilt_nlvr2", "meter_nlvr2"]
    assert opts.settings == ["baseline", "pumer"] and opts.keep_sweep == () and opts.rounds == 3
    _, opts = parse_args(["tiny_vilt_vqa2", "--batch", "1", "8", "--keep-sweep", "--precision", "bf16"])
    assert opts.batch_sizes == [1, 8] and opts.keep_sweep == () and opts.precision == "bf16"
    with pytest.raises(SystemExit):
        parse_args(["vilt_nlvr2", "--batch", "0"])


def test_nlvr2_model_runs_two_backbone_passes():
    exp = get_experiment("vilt_nlvr2", tiny=True)
    model = build_model(exp)
    inputs = make_inputs(exp, model.backbone, 2)
    with torch.inference_mode():
        logits, traces = model(*inputs.args())
    assert logits.shape == (2, 2) and len(traces) == 2


def test_flops_by_part_add_up_to_the_total():
    from pumer_lightning.bench.runner import _group_modules

    exp = get_experiment("meter_nlvr2", tiny=True)
    model = build_model(exp)
    model.backbone.reducer = exp.released
    inputs = make_inputs(exp, model.backbone, 2)
    with torch.inference_mode(), count_flops() as flops:
        model(*inputs.args())
    parts = _group_modules(flops["by_module"], flops["total"])
    assert sum(parts.values()) == flops["total"]
    assert {"vit_model", "text_transformer", "head", "image_layers.0", "text_layers.2"} <= set(parts)
    # reduced blocks cost less than the unreduced first one
    assert parts["image_layers.2"] < parts["image_layers.0"]
