"""Full-size presets build and run one CPU forward; the released PuMer schedules give the official token counts."""

from __future__ import annotations

import pytest
import torch
from model_refs import make_inputs

from pumer_lightning.models import build_backbone, build_head
from pumer_lightning.reduce import ReducerSchedule

pytestmark = pytest.mark.slow

# preset -> (released schedule, text length, image tokens entering each reduction, text tokens likewise)
RELEASED = {
    # ViLT-VQA, p.1 r.3 t.2 at blocks 2, 5, 8 (docs/reducer.md): 145 -> 87 -> 52 -> 31, text 32 -> 26 -> 21 -> 17
    "vilt_b32": (
        ReducerSchedule.from_pumer(0.1, 0.3, 0.2, [2, 5, 8]),
        32,
        [145, 87, 52, 31],
        [32, 26, 21, 17],
    ),
    # METER-NLVR2, p.3 r.5 t.2 at "246" = blocks 1-3 (docs/reducer.md): 325 -> 114 -> 41 -> 15
    "meter_b16_288": (
        ReducerSchedule.from_pumer(0.3, 0.5, 0.2, [2, 4, 6], doubled=True),
        40,
        [325, 114, 41, 15],
        [40, 32, 26, 21],
    ),
    # METER-VQA, p.2 r.2 t.2 at "0246" = blocks 0-3 (docs/reducer.md): 577 -> 347 -> 209 -> 125 -> 75
    "meter_b16_384": (
        ReducerSchedule.from_pumer(0.2, 0.2, 0.2, [0, 2, 4, 6], doubled=True),
        32,
        [577, 347, 209, 125, 75],
        [32, 26, 21, 17, 14],
    ),
}


@pytest.mark.parametrize("preset", list(RELEASED))
def test_full_size_forward_on_cpu(preset):
    schedule, length, image_steps, text_steps = RELEASED[preset]
    model = build_backbone(preset, num_token_types=3).eval()
    head = build_head("vqa2", model.hidden_size, width=model.head_width)
    pixel_values, input_ids, mask = make_inputs(model, (length, length // 2))
    with torch.inference_mode():
        base = model(pixel_values, input_ids, mask, image_index=1)
        model.reducer = schedule
        reduced = model(pixel_values, input_ids, mask, image_index=1)
        logits = head(reduced.pooled)
    assert base.pooled.shape == reduced.pooled.shape == (2, model.hidden_size)
    assert logits.shape == (2, 3129) and torch.isfinite(logits).all()
    assert base.trace.image_tokens == [model.num_image_tokens] * model.num_layers
    plan = schedule.plan(model.num_image_tokens, length)
    assert [p.image_in for p in plan] + [plan[-1].image_out] == image_steps
    assert [p.text_in for p in plan] + [plan[-1].text_out] == text_steps
    assert reduced.image_states.shape[1] == image_steps[-1] and reduced.text_states.shape[1] == text_steps[-1]
