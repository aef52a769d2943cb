"""Mixed-precision forwards of both tiny backbones, reducers on, stay finite on adversarial inputs.

CPU autocast runs both float16 and bfloat16 for every op these backbones use (torch 2.13), so both dtypes are
tested. The inputs are the ones that break reducers in practice: text rows with only [CLS] or no real token at
all (masked softmax over nothing), identical tokens (every top-k and matching score tied) and huge activations
(logits far outside the range a float16 softmax survives without max-subtraction).
"""

from __future__ import annotations

import pytest
import torch

from pumer_lightning.models import build_backbone
from pumer_lightning.reduce import ReducerSchedule

LAYERS = {"vilt_tiny": [1, 2, 3], "meter_tiny": [0, 1, 2]}
B, L = 4, 8


# text importance is the adversarial one: it averages text-query attention over the real text tokens
@pytest.fixture(scope="module", params=list(LAYERS))
def model(request):
    preset, importance = request.param, "text"
    torch.manual_seed(0)
    schedule = ReducerSchedule(
        layers=LAYERS[preset], keep_ratio=0.5, merge_ratio=0.3, text_merge_ratio=0.3, prop_attn=True,
        importance=importance,
    )  # fmt: skip
    return build_backbone(preset, reducer=schedule).eval()


def _text(model):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 900, (B, L), generator=gen)
    ids[:, 0] = 0 if model.__class__.__name__.startswith("Meter") else 101
    return ids, torch.ones(B, L, dtype=torch.long)


def _inputs(model, case):
    size = model.image_size
    pixels = torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(2))
    ids, mask = _text(model)
    if case == "pad_rows":
        mask[0, 1:] = 0  # only [CLS]
        mask[1, :] = 0  # no real token at all
        mask[2, 3:] = 0
    elif case == "identical":
        pixels = torch.zeros_like(pixels)  # every patch equal: ties everywhere in top-k and matching
        ids = torch.full_like(ids, 7)
    elif case == "huge":
        pixels = pixels * 1e4
    return pixels, ids, mask


def _forward(model, inputs, dtype):
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        return model(*inputs, track_maps=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["pad_rows", "identical", "huge"])
def test_autocast_forward_stays_finite(model, case, dtype):
    pixels, ids, mask = inputs = _inputs(model, case)
    out = _forward(model, inputs, dtype)
    assert out.pooled.dtype == dtype, "the forward did not run under autocast"  # the pooler is a Linear
    for name in ("pooled", "image_states", "text_states"):  # final LayerNorms return float32 under autocast
        value = getattr(out, name)
        assert torch.isfinite(value.float()).all(), f"{case}/{dtype}: non-finite {name}"
    # the reducer did what the schedule says, ties or not
    plan = model.reducer.plan(model.num_image_tokens, L)
    assert out.image_states.shape[1] == plan[-1].image_out
    assert out.text_states.shape[1] == plan[-1].text_out
    assert set(out.text_mask.unique().tolist()) <= {0, 1}
    # ties must not lose or duplicate patches: every output token stands for at least one original patch
    for step, patch_map in zip(plan, out.trace.patch_maps):
        for row in patch_map:
            assert set(row[row >= 0].tolist()) == set(range(step.image_out))


def test_pad_rows_do_not_leak_into_other_examples(model):
    """An all-pad row in the batch leaves the other examples' features as they are without it."""
    pixels, ids, mask = _inputs(model, "pad_rows")
    full = _forward(model, (pixels, ids, mask), torch.bfloat16).pooled.float()
    rest = _forward(model, (pixels[2:], ids[2:], mask[2:]), torch.bfloat16).pooled.float()
    torch.testing.assert_close(full[2:], rest, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autocast_backward_gives_finite_gradients(model, dtype):
    """Training under autocast: the gradients through merge/prune of tied, huge inputs stay finite."""
    pixels, ids, mask = _inputs(model, "huge")
    pixels[:2] = 0.0  # mix tied and huge examples in one batch
    model.zero_grad()
    with torch.autocast("cpu", dtype=dtype):
        loss = model(pixels, ids, mask).pooled.float().square().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads, "no gradient reached the parameters"
    assert all(torch.isfinite(g).all() for g in grads)
    model.zero_grad()
