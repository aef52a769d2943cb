from pathlib import Path

import pytest

from pumer_lightning.reduce import LayerPlan, ReducerSchedule
from pumer_lightning.reduce.released import RELEASED, markdown_table


def counts(plan: list[LayerPlan]) -> list[tuple[int, int, int, int, int]]:
    return [(p.layer, p.image_in, p.image_kept, p.image_out, p.text_in, p.text_out) for p in plan]


# Token schedules of the released settings, computed by hand from the official code's rules (docs/reducer.md).
OFFICIAL_COUNTS = {
    "vilt_vqa2": [(2, 145, 131, 87, 32, 26), (5, 87, 78, 52, 26, 21), (8, 52, 47, 31, 21, 17)],
    "vilt_snli_ve": [(2, 145, 131, 87, 40, 32), (4, 87, 78, 52, 32, 26), (6, 52, 47, 31, 26, 21),
                     (8, 31, 28, 19, 21, 17)],
    "vilt_nlvr2": [(2, 145, 131, 87, 40, 32), (5, 87, 78, 52, 32, 26), (8, 52, 47, 31, 26, 21)],
    "meter_vqa2": [(0, 577, 462, 347, 32, 26), (1, 347, 278, 209, 26, 21), (2, 209, 167, 125, 21, 17),
                   (3, 125, 100, 75, 17, 14)],
    "meter_snli_ve": [(0, 577, 404, 203, 40, 32), (1, 203, 142, 72, 32, 26), (2, 72, 50, 26, 26, 21),
                      (3, 26, 18, 10, 21, 17)],
    "meter_nlvr2": [(1, 325, 227, 114, 40, 32), (2, 114, 80, 41, 32, 26), (3, 41, 29, 15, 26, 21)],
}  # fmt: skip


def test_every_released_setting_is_checked():
    assert set(RELEASED) == set(OFFICIAL_COUNTS)


@pytest.mark.parametrize("name", sorted(OFFICIAL_COUNTS))
def test_released_schedules_match_official_counts(name):
    setting = RELEASED[name]
    assert counts(setting.schedule.plan(setting.n_image, setting.n_text)) == OFFICIAL_COUNTS[name]
    setting.schedule.check_depth(setting.num_layers)


def test_released_table_lists_every_step():
    table = markdown_table()
    assert table.count("\n") == 2 + sum(len(v) for v in OFFICIAL_COUNTS.values()) - 1
    assert "| 1 | 325 → 227 → 114 | 40 → 32 |" in table
    docs = Path(__file__).resolve().parents[2] / "docs" / "reducer.md"
    assert table in docs.read_text(), (
        "docs/reducer.md: regenerate with python -m pumer_lightning.reduce.released"
    )


def test_doubled_meter_ids_are_real_block_ids():
    assert ReducerSchedule.from_pumer(0.3, 0.5, 0.2, [2, 4, 6], doubled=True).layers == [1, 2, 3]
    with pytest.raises(ValueError, match="must be even"):
        ReducerSchedule.from_pumer(0.3, 0.5, 0.2, [1, 4], doubled=True)


def test_tokens_per_layer_counts_from_the_next_block():
    schedule = ReducerSchedule.from_pumer(0.1, 0.3, 0.2, [2, 5, 8])
    image, text = schedule.tokens_per_layer(145, 40, 12)
    assert image == [145, 145, 145, 87, 87, 87, 52, 52, 52, 31, 31, 31]
    assert text == [40, 40, 40, 32, 32, 32, 26, 26, 26, 21, 21, 21]


def test_merge_is_capped_at_half_of_the_tokens_left_after_pruning():
    plan = ReducerSchedule(layers=[0], keep_ratio=0.7, merge_ratio=0.5).step(0, 577, 40)
    assert plan.image_kept == 404 and plan.n_merge == (404 - 1) // 2


def test_off_is_identity_schedule():
    schedule = ReducerSchedule(layers=[0, 1, 2])
    assert not schedule.is_active
    assert schedule.plan(145, 40) == []
    assert all(schedule.step(layer, 145, 40) is None for layer in range(3))


def test_each_step_switches_on_by_its_own_ratio():
    prune_only = ReducerSchedule(layers=[0], keep_ratio=0.5).step(0, 101, 20)
    # round(0.5 * 101) = round(50.5) = 50 pruned (half to even)
    assert (prune_only.image_kept, prune_only.image_out, prune_only.text_out) == (51, 51, 20)
    merge_only = ReducerSchedule(layers=[0], merge_ratio=0.25).step(0, 101, 20)
    assert (merge_only.image_kept, merge_only.image_out, merge_only.text_out) == (101, 76, 20)
    text_only = ReducerSchedule(layers=[0], text_merge_ratio=0.25).step(0, 101, 20)
    assert (text_only.image_kept, text_only.image_out, text_only.text_out) == (101, 101, 15)


def test_at_least_cls_and_one_token_survive():
    plan = ReducerSchedule(layers=[0], keep_ratio=0.001, merge_ratio=0.5, text_merge_ratio=0.5).step(0, 10, 3)
    assert plan.image_kept == 2 and plan.image_out == 2
    assert plan.text_out == 2


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"keep_ratio": 0.0}, "keep_ratio"),
        ({"keep_ratio": 1.5}, "keep_ratio"),
        ({"merge_ratio": 0.6}, "merge_ratio"),
        ({"merge_ratio": -0.1}, "merge_ratio"),
        ({"text_merge_ratio": 0.9}, "text_merge_ratio"),
        ({"importance": "gradient"}, "importance"),
        ({"layers": [-1]}, "layers"),
        ({"layers": [2, 2]}, "layers"),
    ],
)
def test_invalid_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"ReducerSchedule.{field}"):
        ReducerSchedule(**kwargs)


def test_check_depth_names_the_bad_layer():
    schedule = ReducerSchedule(layers=[2, 6], keep_ratio=0.5)
    schedule.check_depth(7)
    with pytest.raises(ValueError, match=r"\[6\] out of range .* 6 reducible blocks"):
        schedule.check_depth(6, "METER")


def test_layers_are_sorted():
    assert ReducerSchedule(layers=[8, 2, 5]).layers == [2, 5, 8]


def test_schedule_prints_as_one_line():
    from pumer_lightning.reduce import ReducerSchedule

    assert str(ReducerSchedule()) == "off"
    assert (
        str(ReducerSchedule(layers=[1, 2], keep_ratio=0.7, merge_ratio=0.2))
        == "keep 0.7 / merge 0.2 / text 0 @ [1, 2]"
    )
    odd = ReducerSchedule(
        layers=[3], keep_ratio=0.5, merge_ratio=0.1, text_merge_ratio=0.2, importance="random",
        text_merge_policy="pads_first", partition="score", prop_attn=True,
    )  # fmt: skip
    assert str(odd) == (
        "keep 0.5 / merge 0.1 / text 0.2 @ [3] "
        "(random importance, text merge pads_first, score-order partition, prop attn)"
    )


def test_ablations_change_one_thing_each_and_keep_the_original():
    from pumer_lightning.reduce import ABLATIONS, ablation

    base = ReducerSchedule(layers=[1, 2], keep_ratio=0.7, merge_ratio=0.2, text_merge_ratio=0.2)
    got = {name: ablation(base, name) for name in ABLATIONS}
    assert str(got["merge_only"]) == "keep 1 / merge 0.2 / text 0 @ [1, 2]"
    assert str(got["no_prune"]) == "keep 1 / merge 0.2 / text 0.2 @ [1, 2]"
    assert str(got["prune_only"]) == "keep 0.7 / merge 0 / text 0 @ [1, 2]"
    assert got["random_prune"].importance == "random" and got["cls_prune"].importance == "cls"
    got["no_text_merge"].layers.append(3)
    assert base.layers == [1, 2] and base.text_merge_ratio == 0.2
    with pytest.raises(ValueError, match="unknown ablation 'tome'.*merge_only"):
        ablation(base, "tome")
