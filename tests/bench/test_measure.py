"""The bench's instruments and inputs: FLOP counting with SDPA, tensor memory tracking, op counting, the
reducer's profiler ranges, inductor's kernel count, memory kept for backward and its bound."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pumer_lightning.bench import EXPERIMENTS, Options, build_task, get_experiment, make_batch, make_settings
from pumer_lightning.bench.__main__ import parse_args
from pumer_lightning.bench.experiments import SPECIAL_IDS
from pumer_lightning.bench.measure import (
    REDUCE_RANGE,
    OpCounter,
    SavedBytesByPart,
    TensorMemoryTracker,
    compiled_kernel_count,
    count_ops,
    flops_by_module,
    parse_inductor_code,
    reduce_range_profile,
)
from pumer_lightning.bench.parts import part_of, tokens_by_part
from pumer_lightning.bench.results import memory_bound
from pumer_lightning.bench.runner import select_settings
from pumer_lightning.models import build_backbone
from pumer_lightning.reduce import ReducerSchedule
from pumer_lightning.reduce.released import RELEASED


# ---- FLOPs ------------------------------------------------------------------------------------------------------
def test_sdpa_flops_are_counted_with_and_without_a_mask():
    """Plain FlopCounterMode counts 0 for the CPU fused kernel; ours counts QK^T and AV, 2 FLOPs per MAC."""
    b, h, lq, lk, d = 2, 3, 5, 7, 8
    q, k, v = torch.randn(b, h, lq, d), torch.randn(b, h, lk, d), torch.randn(b, h, lk, d)
    bias = torch.zeros(b, 1, 1, lk)
    with torch.inference_mode(), flops_by_module() as flops:
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
        inputs = make_batch(exp, backbone, 2)
        for reducer in (None, schedule):
            backbone.reducer = reducer
            with torch.inference_mode(), flops_by_module() as flops:
                backbone(inputs["pixel_values"][:, 0], inputs["input_ids"], inputs["attention_mask"])
            totals[impl, reducer is None] = flops["total"]
    assert totals["sdpa", True] == totals["eager", True]
    assert totals["sdpa", False] == totals["eager", False] < totals["sdpa", True]


def test_flops_of_one_vilt_layer_match_the_formula():
    """A ViLT block of N tokens, width C, MLP width I: 2 (4 N C^2 + 2 N^2 C + 2 N C I) FLOPs."""
    backbone = build_backbone("vilt_tiny").eval()
    exp = get_experiment("vilt_vqa2", tiny=True)
    inputs = make_batch(exp, backbone, 1)
    with torch.inference_mode(), flops_by_module() as flops:
        backbone(inputs["pixel_values"][:, 0], inputs["input_ids"], inputs["attention_mask"])
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


# ---- op counter -------------------------------------------------------------------------------------------------
def test_op_counter_counts_ops_that_do_work_and_those_in_reducer_ranges():
    x = torch.randn(4, 6)
    with torch.inference_mode(), OpCounter() as ops:
        y = x * 2  # 1
        y.view(6, 4)  # a view: not counted
        y.t()  # a view
        torch.empty(3)  # a bare allocation
        y.detach()  # bookkeeping
        with torch.profiler.record_function(REDUCE_RANGE):
            z = y + 1  # 2, in range
            z.topk(2, dim=1)  # 3, in range
            with torch.profiler.record_function("inner"):
                z.sum()  # 4, still inside the reducer range
        with torch.profiler.record_function("other"):
            z.mean()  # 5, not in a reducer range
        with torch.profiler.record_function(REDUCE_RANGE):
            torch.cat([z, z])  # 6, in range
    assert ops.total == 6 and ops.in_range == 4 and ops.ranges == 2
    assert ops.by_op == {
        "aten.mul": 1,
        "aten.add": 1,
        "aten.topk": 1,
        "aten.sum": 1,
        "aten.mean": 1,
        "aten.cat": 1,
    }
    assert ops.in_range_by_op["aten.mean"] == 0


def _vilt_tiny_counts(reduced: bool) -> OpCounter:
    """One vilt_tiny backbone pass, batch 2, the tiny NLVR2 released schedule (blocks 1 and 2), eager step."""
    exp = get_experiment("vilt_nlvr2", tiny=True)
    torch.manual_seed(0)
    backbone = build_backbone("vilt_tiny").eval()
    backbone.reducer_impl = "eager"
    backbone.reducer = exp.released if reduced else None
    inputs = make_batch(exp, backbone, 2)
    return count_ops(
        lambda: backbone(inputs["pixel_values"][:, 0], inputs["input_ids"], inputs["attention_mask"])
    )


# Pinned for torch 2.13 and the eager reduction step as it is: a change to the model or the reduction step that
# adds or removes ops must update these on purpose (and say why in its commit).
VILT_TINY_BASELINE_OPS = 79
VILT_TINY_REDUCED_OPS = (
    167  # 169 before the importance summed its real text rows in one matmul (mul + sum before)
)


def test_op_counts_of_vilt_tiny_are_exact_and_pinned():
    base, reduced = _vilt_tiny_counts(False), _vilt_tiny_counts(True)
    again = _vilt_tiny_counts(True)
    assert (again.total, again.in_range, again.by_op) == (reduced.total, reduced.in_range, reduced.by_op)
    assert base.total == VILT_TINY_BASELINE_OPS, f"baseline ops {base.total}"
    assert reduced.total == VILT_TINY_REDUCED_OPS, f"reduced ops {reduced.total}"
    assert base.ranges == base.in_range == 0
    # the backbone opens one pumer.reduce range per reduction step, and the reducer's ops are inside them
    assert reduced.ranges == 2
    assert 0 < reduced.in_range <= reduced.total - base.total + reduced.in_range


def test_bench_reports_reducer_ops_per_step_from_the_same_counter(tmp_path):
    from pumer_lightning.bench import run_bench

    (result,) = run_bench(
        ["vilt_nlvr2"],
        Options(
            tiny=True, settings=["pumer"], keep_sweep=(), rounds=1, warmup=0, train=False, threads=1,
            kernel_count="none", cpu_bf16="off", out_dir=tmp_path, verbose=False, plot=False,
        ),
    )  # fmt: skip
    settings = {s["name"]: s for s in result["settings"]}
    base, pumer = settings["baseline"], settings["pumer"]
    # the task forward: two backbone passes of batch 2 and the head
    assert pumer["reduction_steps_per_forward"] == 4 and base["reduction_steps_per_forward"] == 0
    assert pumer["reducer_ops_per_step"] == (pumer["ops_per_forward"] - base["ops_per_forward"]) / 4
    assert pumer["reducer_ops_per_step"] == (VILT_TINY_REDUCED_OPS - VILT_TINY_BASELINE_OPS) / 2
    assert base["reducer_ops_per_step"] is None and pumer["ops_ratio"] > 1
    assert sum(pumer["extra_ops_by_op"].values()) == pumer["ops_per_forward"] - base["ops_per_forward"]
    assert pumer["reduce_ranges_counted"] == 4 and pumer["ops_in_reduce_ranges_per_step"] > 0


# ---- reducer share through profiler ranges -----------------------------------------------------------------------
def test_reduce_range_profile_times_the_ranges_code_opens():
    a = torch.randn(256, 256)

    def forward():
        a @ a  # outside the reducer
        with torch.profiler.record_function(REDUCE_RANGE):
            (a @ a).topk(4, dim=1)
        with torch.profiler.record_function(REDUCE_RANGE):
            a.sum()

    with torch.inference_mode():
        prof = reduce_range_profile(forward, torch.device("cpu"), forwards=3)
    assert prof["ranges"] == 2 and prof["forwards"] == 3
    assert 0 < prof["range_host_s"] < prof["wall_s"] and 0 < prof["share"] < 1
    assert prof["share"] == prof["host_share"]
    none = reduce_range_profile(lambda: a @ a, torch.device("cpu"))
    assert none["ranges"] == 0 and none["share"] == 0


# ---- compiled reduction step -------------------------------------------------------------------------------------
INDUCTOR_CODE = """
class Runner:
    def call(self, args):
        arg0_1, arg1_1 = args
        buf0 = empty_strided_cpu((20, 8), (8, 1), torch.float32)
        extern_kernels.mm(reinterpret_tensor(arg0_1, (20, 8), (8, 1), 0), arg1_1, out=buf0)
        cpp_fused__softmax_mean_0(buf2, buf5, buf1)
        buf6 = torch.ops.aten.topk.default(buf5, 5, 1, True, True)
        buf9 = torch.ops.aten.sort.stable(buf8, stable=False, dim=1, descending=False)
        assert_size_stride(buf8, (2, 5), (5, 1), 'torch.ops.aten.topk.default')
        cpp_fused_add_gather_mul_1(buf10, arg0_1, buf12)
        triton_poi_fused_add_2.run(buf1, buf2, 16, stream=stream0)
        return (buf12, buf10, )

runner = Runner(partitions=[])
call = runner.call

def get_args():
    cpp_fused_not_a_call_3(x)
"""


def test_inductor_code_is_parsed_into_kernel_and_extern_calls():
    parsed = parse_inductor_code(INDUCTOR_CODE)
    assert parsed["kernel_calls"] == 3
    assert parsed["extern_calls"] == {"mm": 1, "aten.topk": 1, "aten.sort": 1}


@pytest.mark.slow
def test_compiled_kernel_count_uses_inductors_own_count():
    def step(x, w):
        scores = (x @ w).softmax(-1).mean(-1)
        index = scores.topk(3, dim=1).indices
        return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1])) * 2

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    x, w = torch.randn(2, 10, 8), torch.randn(8, 8)
    with torch.inference_mode():
        first = compiled_kernel_count(lambda: compiled(x, w))
        again = compiled_kernel_count(lambda: compiled(x, w))  # caches cleared: compiled and counted again
    torch._dynamo.reset()
    assert first["graphs"] == again["graphs"] == 1
    assert first["generated_kernels"] == again["generated_kernels"] >= first["kernel_calls"] >= 1
    assert first["extern_calls"]["mm"] == 1 and first["extern_calls"]["aten.topk"] == 1


# ---- memory kept for backward -------------------------------------------------------------------------------------
def test_saved_bytes_are_attributed_to_the_module_that_saved_them():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    x = torch.randn(5, 8)
    with SavedBytesByPart(model, lambda name: name or "root", [*model.parameters(), x]) as saved:
        y = model(x)
    y.sum().backward()
    # Linear 0 saves only its input (static: not counted); tanh saves its output (5 x 16 floats); Linear 2 saves
    # its input, the same storage as tanh's output (counted once, by tanh)
    assert saved.by_part == {"1": 5 * 16 * 4}


def test_parts_split_blocks_at_the_reduction():
    assert part_of("backbone.encoder.layer.3.attention.attention.query") == "3"
    assert part_of("backbone.encoder.layer.3.attention.output.dense") == "3"
    assert part_of("backbone.encoder.layer.3.layernorm_after") == "3+"
    assert part_of("backbone.encoder.layer.11.output.dense") == "11+"
    assert part_of("backbone.cross_modal_text_layers.2.crossattention.self.key") == "2t"
    assert part_of("backbone.cross_modal_text_layers.2.output.dense") == "2t+"
    assert part_of("backbone.cross_modal_image_layers.2.attention.self.query") == "2i+"
    assert part_of("backbone.vit_model.encoder.layers.3.mlp.fc1") == "other"
    assert part_of("backbone.embeddings.patch_embeddings") == "other"
    assert part_of("backbone.layernorm") == part_of("backbone.cross_modal_image_pooler.dense") == "tail"
    assert part_of("head.0") == "tail"


def test_tokens_by_part_follow_the_plan_and_the_bound_weights_them():
    schedule = ReducerSchedule(layers=[1], keep_ratio=0.5, merge_ratio=0.0, text_merge_ratio=0.0)
    parts = ["other", "0", "0+", "1", "1+", "2", "2+", "tail"]
    base = tokens_by_part(None, 11, 4, 3, 2, parts)
    reduced = tokens_by_part(schedule, 11, 4, 3, 2, parts)
    assert base == {p: 2 * 15 for p in parts if p != "other"}
    # block 1 prunes the image tokens: its MLP half and everything after see the kept ones and the 4 text tokens
    after = 2 * (schedule.plan(11, 4)[0].image_out + 4)
    assert after < 30
    assert reduced == {"0": 30, "0+": 30, "1": 30, "1+": after, "2": after, "2+": after, "tail": after}
    saved = {"other": 100, "0": 50, "0+": 50, "1": 50, "1+": 50, "2": 50, "2+": 50, "tail": 0}
    assert memory_bound(saved, base, reduced) == pytest.approx((100 + 3 * 50 + 3 * 50 * after / 30) / 400)
    assert memory_bound(saved, base, base) == 1.0


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
    inputs = make_batch(exp, backbone, 16, seed=3)
    cls_id, sep_id, pad_id = SPECIAL_IDS[family]
    lengths = inputs["attention_mask"].sum(1)
    assert lengths[0] == exp.text_len
    assert lengths.min() >= round(0.4 * exp.text_len) and len(set(lengths.tolist())) > 3
    assert (inputs["input_ids"][:, 0] == cls_id).all()
    for row, n in zip(inputs["input_ids"], lengths.tolist()):
        assert row[n - 1] == sep_id and (row[n:] == pad_id).all()
        assert (row[1 : n - 1] >= 1000).all()
    # the collate's layout: (B, images per example, 3, H, W), two different images
    assert inputs["pixel_values"].shape == (16, 2, 3, 64, 64)
    assert not torch.equal(*inputs["pixel_values"].unbind(1))
    again = make_batch(exp, backbone, 16, seed=3)
    assert torch.equal(again["input_ids"], inputs["input_ids"])


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


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_ablation_settings_come_from_the_one_table(name):
    """The bench's ablations are `pumer_lightning.reduce.ablation` of the released schedule, with their meanings."""
    from pumer_lightning.bench.experiments import ABLATIONS as BENCH_ABLATIONS
    from pumer_lightning.reduce import ABLATIONS, ablation

    assert BENCH_ABLATIONS == ("prune_only", "merge_only", "no_text_merge", "random_prune")
    assert set(BENCH_ABLATIONS) <= set(ABLATIONS)
    for tiny in (False, True):
        exp = get_experiment(name, tiny=tiny)
        rel = exp.released
        settings = {s.name: s for s in make_settings(exp, keep_sweep=())}
        assert [s.name for s in settings.values() if s.kind == "ablation"] == list(BENCH_ABLATIONS)
        for ab in BENCH_ABLATIONS:
            assert settings[ab].schedule == ablation(rel, ab)
            assert settings[ab].description == str(settings[ab].schedule)
            assert settings[ab].schedule.layers == rel.layers
        assert settings["pumer"].schedule is rel and settings["pumer"].description == f"released PuMer: {rel}"
        prune, tome = settings["prune_only"].schedule, settings["merge_only"].schedule
        assert (prune.keep_ratio, prune.merge_ratio, prune.text_merge_ratio) == (rel.keep_ratio, 0.0, 0.0)
        assert (tome.keep_ratio, tome.merge_ratio, tome.text_merge_ratio) == (1.0, rel.merge_ratio, 0.0)
        assert settings["no_text_merge"].schedule.text_merge_ratio == 0.0
        assert settings["random_prune"].schedule.importance == "random"
    extra = make_settings(get_experiment(name), keep_sweep=(), ablations=("cls_prune",))
    assert [s.name for s in extra] == ["baseline", "pumer", "cls_prune"]


def test_setting_selection_always_keeps_the_baseline():
    exp = get_experiment("vilt_vqa2", tiny=True)
    names = [s.name for s in select_settings(exp, Options(settings=["random_prune"]))]
    assert names == ["baseline", "random_prune"]
    with pytest.raises(ValueError, match="unknown setting 'keep_0.3'"):
        select_settings(exp, Options(settings=["keep_0.3"]))
    # any ablation of the one table can be asked for, beside the default ones
    names = [s.name for s in select_settings(exp, Options(settings=["cls_prune", "no_prune", "pumer"]))]
    assert names == ["baseline", "pumer", "cls_prune", "no_prune"]


def test_cli_options():
    exps, opts = parse_args(["vilt_nlvr2", "meter_nlvr2", "--quick"])
    assert exps == ["vilt_nlvr2", "meter_nlvr2"]
    assert opts.settings == ["baseline", "pumer"] and opts.keep_sweep == () and opts.rounds == 3
    _, opts = parse_args(["tiny_vilt_vqa2", "--batch", "1", "8", "--keep-sweep", "--precision", "bf16"])
    assert opts.batch_sizes == [1, 8] and opts.keep_sweep == () and opts.precision == "bf16"
    with pytest.raises(SystemExit):
        parse_args(["vilt_nlvr2", "--batch", "0"])


def test_the_bench_builds_the_tasks_own_module_and_forward():
    """NLVR2: the task's `compute_logits`, two backbone passes per example."""
    from pumer_lightning.tasks import NLVR2Task

    exp = get_experiment("vilt_nlvr2", tiny=True)
    model = build_task(exp, reducer_impl="eager")
    assert isinstance(model, NLVR2Task) and not model.training and not model.spec.cuda_graphs
    assert model.backbone.reducer_impl == "eager" and not model.backbone.reducer.is_active
    inputs = make_batch(exp, model.backbone, 2)
    with torch.inference_mode():
        logits, tokens = model.compute_logits(inputs, model.backbone, model.head)
    assert logits.shape == (2, 2) and tokens.rows == 4


def test_flops_by_part_add_up_to_the_total():
    from pumer_lightning.bench.results import group_modules

    exp = get_experiment("meter_nlvr2", tiny=True)
    model = build_task(exp)
    model.backbone.reducer = exp.released
    inputs = make_batch(exp, model.backbone, 2)
    with torch.inference_mode(), flops_by_module() as flops:
        model.compute_logits(inputs, model.backbone, model.head)
    roots = {type(model.backbone).__name__: "backbone", type(model.head).__name__: "head"}
    parts = group_modules(flops["by_module"], flops["total"], roots)
    assert sum(parts.values()) == flops["total"]
    assert {"vit_model", "text_transformer", "head", "image_layers.0", "text_layers.2"} <= set(parts)
    # reduced blocks cost less than the unreduced first one
    assert parts["image_layers.2"] < parts["image_layers.0"]
