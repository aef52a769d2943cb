"""The reducer against a slow per-example reference, plus invariants under generated inputs."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pumer_lightning.reduce import (
    LayerPlan,
    ReducerSchedule,
    ReductionState,
    attention_probs,
    cls_importance,
    match_slots,
    merge_by_slots,
    reduce,
    size_bias,
    text_importance,
)

# ---------------------------------------------------------------------------------------------------------
# An obviously-correct reference: one example at a time, Python lists, no vectorisation.


def ref_prune(x, size, metric, scores, n_keep):
    rest = sorted(range(1, len(scores)), key=lambda j: -float(scores[j]))[: n_keep - 1]
    keep = [0] + sorted(rest)
    return x[keep], size[keep], metric[keep]


def ref_merge(x, size, metric, n_merge, candidates_a, candidates_b):
    """Merge n_merge tokens of set A into their most similar token of set B; keep order of the rest."""
    unit = F.normalize(metric.float(), dim=-1)
    best = {}
    for i in candidates_a:
        sims = [(float(unit[i] @ unit[j]), j) for j in candidates_b]
        best[i] = max(sims)  # (similarity, partner)
    ranked = sorted(candidates_a, key=lambda i: (-best[i][0], i))
    sources = {i: best[i][1] for i in ranked[:n_merge]}
    groups = {j: [j] for j in range(len(x)) if j not in sources}
    for i, j in sources.items():
        groups[j].append(i)
    out_x, out_size = [], []
    for j in sorted(groups):
        members = groups[j]
        total = sum(float(size[m]) for m in members)
        out_x.append(sum(x[m] * size[m] for m in members) / total)
        out_size.append(total)
    return torch.stack(out_x), torch.tensor(out_size), sorted(groups)


def ref_image(x, size, metric, scores, plan):
    x, size, metric = ref_prune(x, size, metric, scores, plan.image_kept)
    a = list(range(2, len(x), 2))  # even positions except the CLS
    b = list(range(1, len(x), 2))
    return ref_merge(x, size, metric, plan.n_merge, a, b)[:2]


def ref_text(x, size, mask, metric, plan, ratio, policy="real"):
    real = [i for i in range(len(mask)) if mask[i]]
    pads = [i for i in range(len(mask)) if not mask[i]]
    n_real = len(real)
    if policy == "real":
        n_merge = min(round(ratio * n_real), max(n_real - 1, 0) // 2, plan.n_text_merge)
    else:  # pads first: real tokens merge only for what the pads cannot cover
        n_merge = max(plan.n_text_merge - len(pads), 0)
    n_drop = plan.n_text_merge - n_merge
    a = [real[r] for r in range(2, n_real, 2)]
    b = [real[r] for r in range(1, n_real, 2)]
    dropped = set(pads[len(pads) - n_drop :]) if n_drop else set()
    keep_idx = [i for i in range(len(mask)) if i not in dropped]
    remap = {old: new for new, old in enumerate(keep_idx)}
    x, size, metric = x[keep_idx], size[keep_idx], metric[keep_idx]
    new_mask = mask[keep_idx]
    a, b = [remap[i] for i in a], [remap[i] for i in b]
    out_x, out_size, survivors = ref_merge(x, size, metric, n_merge, a, b)
    return out_x, out_size, new_mask[survivors]


# ---------------------------------------------------------------------------------------------------------


def make_inputs(batch, n_image, n_text, lengths, channels=8, dim=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, n_image, channels, generator=gen, dtype=torch.float64)
    text = torch.randn(batch, n_text, channels, generator=gen, dtype=torch.float64)
    mask = (torch.arange(n_text)[None] < torch.as_tensor(lengths)[:, None]).long()
    scores = torch.rand(batch, n_image, generator=gen, dtype=torch.float64)
    image_metric = torch.randn(batch, n_image, dim, generator=gen, dtype=torch.float64)
    text_metric = torch.randn(batch, n_text, dim, generator=gen, dtype=torch.float64)
    return image, text, mask, scores, image_metric, text_metric


def step(state, scores, image_metric, text_metric, plan, compiled=False):
    metric = torch.cat([text_metric, image_metric], dim=1)
    return reduce(state, plan, scores=scores, metric=metric, compiled=compiled)


def run(schedule, layer, image, text, mask, scores, image_metric, text_metric, track_maps=False):
    plan = schedule.step(layer, image.shape[1], text.shape[1])
    state = ReductionState.init(image, text, mask, track_maps=track_maps)
    state = replace(state, size=state.size.double())
    out = step(state, scores, image_metric, text_metric, plan)
    return plan, state, out


@pytest.mark.parametrize("policy", ["real", "pads_first"])
@pytest.mark.parametrize("seed", range(4))
def test_vectorised_matches_per_example_reference(seed, policy):
    batch, n_image, n_text = 4, 37, 12
    lengths = [12, 9, 3, 1]
    image, text, mask, scores, im_metric, tx_metric = make_inputs(batch, n_image, n_text, lengths, seed=seed)
    schedule = ReducerSchedule(
        layers=[0], keep_ratio=0.7, merge_ratio=0.3, text_merge_ratio=0.3, text_merge_policy=policy
    )
    plan, _, out = run(schedule, 0, image, text, mask, scores, im_metric, tx_metric)
    for b in range(batch):
        ref_x, ref_size = ref_image(image[b], torch.ones(n_image), im_metric[b], scores[b], plan)
        torch.testing.assert_close(out.image[b], ref_x)
        torch.testing.assert_close(out.image_size[b], ref_size.double())
        ref_t, ref_tsize, ref_mask = ref_text(
            text[b], torch.ones(n_text), mask[b], tx_metric[b], plan, 0.3, policy
        )
        torch.testing.assert_close(out.text[b], ref_t)
        torch.testing.assert_close(out.text_size[b], ref_tsize.double())
        assert out.text_mask[b].tolist() == ref_mask.tolist()


@st.composite
def reduction_cases(draw):
    batch = draw(st.integers(1, 4))
    n_image = draw(st.integers(2, 40))
    n_text = draw(st.integers(1, 16))
    lengths = draw(st.lists(st.integers(0, n_text), min_size=batch, max_size=batch))
    keep = draw(st.floats(0.05, 1.0))
    merge = draw(st.floats(0.0, 0.5))
    text = draw(st.floats(0.0, 0.5))
    seed = draw(st.integers(0, 2**16))
    policy = draw(st.sampled_from(["real", "pads_first"]))
    partition = draw(st.sampled_from(["spatial", "score"]))
    return batch, n_image, n_text, lengths, keep, merge, text, seed, policy, partition


@settings(max_examples=80, deadline=None)
@given(reduction_cases())
def test_invariants(case):
    batch, n_image, n_text, lengths, keep, merge, text_ratio, seed, policy, partition = case
    image, text, mask, scores, im_metric, tx_metric = make_inputs(batch, n_image, n_text, lengths, seed=seed)
    text = text.masked_fill(~mask.bool()[..., None], 1e6)  # a pad absorbed by a real token would show
    schedule = ReducerSchedule(
        layers=[0], keep_ratio=keep, merge_ratio=merge, text_merge_ratio=text_ratio,
        text_merge_policy=policy, partition=partition,
    )  # fmt: skip
    plan = schedule.step(0, n_image, n_text)
    if plan is None:
        assert round((1 - keep) * n_image) == 0 or n_image <= 2
        return
    _, state, out = run(schedule, 0, image, text, mask, scores, im_metric, tx_metric, track_maps=True)
    # shapes are the plan's
    assert out.image.shape == (batch, plan.image_out, image.shape[-1])
    assert out.text.shape == (batch, plan.text_out, text.shape[-1])
    assert out.text_mask.shape == (batch, plan.text_out)
    # image CLS kept at 0, untouched
    torch.testing.assert_close(out.image[:, 0], image[:, 0], rtol=0, atol=0)
    assert (out.image_size[:, 0] == 1).all()
    # sizes: every surviving original token counted once
    assert (out.image_size.sum(1) == plan.image_kept).all()
    real_sizes = (out.text_size * out.text_mask).sum(1)
    assert real_sizes.tolist() == mask.sum(1).double().tolist()
    # masks binary, real tokens never absorb pads, real text content (size-weighted) conserved
    assert set(out.text_mask.unique().tolist()) <= {0, 1}
    real_out = out.text[out.text_mask.bool()]
    assert (real_out.abs() < 1e5).all()
    weighted_in = (text * mask[..., None]).sum(1)
    weighted_out = (out.text * (out.text_size * out.text_mask)[..., None]).sum(1)
    torch.testing.assert_close(weighted_out, weighted_in)
    # text CLS (first real token) stays first and untouched
    has_text = mask.sum(1) > 0
    first_real = mask.argmax(1)
    out_first = out.text_mask.argmax(1)
    for b in torch.nonzero(has_text).flatten().tolist():
        torch.testing.assert_close(out.text[b, out_first[b]], text[b, first_real[b]], rtol=0, atol=0)
    # patch map: pruned patches are -1, others point at a live token, CLS at 0
    assert ((out.patch_map >= 0).sum(1) == plan.image_kept).all()
    assert (out.patch_map[:, 0] == 0).all()
    assert int(out.patch_map.max()) < plan.image_out


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(3, 50), st.floats(0.0, 0.5), st.integers(0, 2**16))
def test_merge_conserves_size_weighted_sum(batch, n, ratio, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, 5, generator=gen, dtype=torch.float64)
    size = torch.randint(1, 5, (batch, n), generator=gen).double()
    metric = torch.randn(batch, n, 4, generator=gen, dtype=torch.float64)
    n_merge = min(round(ratio * n), (n - 1) // 2)
    plan = LayerPlan(0, n, n, n - n_merge, 1, 1)
    joint = torch.cat(
        [torch.zeros(batch, 1, 4, dtype=metric.dtype), metric], dim=1
    )  # one text token (its CLS)
    slot, _, _ = match_slots(joint, torch.ones(batch, dtype=torch.long), plan, n)
    assert slot[:, 0].eq(0).all()
    out, out_size = merge_by_slots(x, size, slot[:, 1:] - 1, n - n_merge)
    torch.testing.assert_close((out * out_size[..., None]).sum(1), (x * size[..., None]).sum(1))
    torch.testing.assert_close(out_size.sum(1), size.sum(1))


@pytest.mark.parametrize("policy", ["real", "pads_first"])
def test_batch_invariance_under_padding_and_company(policy):
    """``real``: an example's result depends neither on its company nor on its padding; ``pads_first``: not on its
    company when every text is padded to the same length (the fixed ``max_text_len`` padding)."""
    n_image, n_text = 30, 10
    image, text, mask, scores, im_metric, tx_metric = make_inputs(3, n_image, n_text, [10, 6, 3], seed=3)
    schedule = ReducerSchedule(
        layers=[0], keep_ratio=0.6, merge_ratio=0.3, text_merge_ratio=0.4, text_merge_policy=policy
    )
    _, _, together = run(schedule, 0, image, text, mask, scores, im_metric, tx_metric)
    for b in range(3):
        length = int(mask[b].sum())
        for width in (length, length + 5) if policy == "real" else (n_text,):
            alone_text = torch.zeros(1, width, text.shape[-1], dtype=text.dtype)
            alone_text[0, :length] = text[b, :length]
            alone_metric = torch.randn(1, width, tx_metric.shape[-1], dtype=tx_metric.dtype)
            alone_metric[0, :length] = tx_metric[b, :length]
            alone_mask = (torch.arange(width) < length).long()[None]
            _, _, alone = run(
                schedule, 0, image[b : b + 1], alone_text, alone_mask, scores[b : b + 1],
                im_metric[b : b + 1], alone_metric,
            )  # fmt: skip
            torch.testing.assert_close(alone.image[0], together.image[b])
            real_alone = alone.text[0][alone.text_mask[0].bool()]
            real_together = together.text[b][together.text_mask[b].bool()]
            torch.testing.assert_close(real_alone, real_together)


def test_keep_one_merge_zero_is_identity():
    image, text, mask, scores, im_metric, tx_metric = make_inputs(2, 20, 8, [8, 4])
    schedule = ReducerSchedule(layers=[0, 1], keep_ratio=1.0, merge_ratio=0.0, text_merge_ratio=0.0)
    assert schedule.step(0, 20, 8) is None
    state = ReductionState.init(image, text, mask)
    out = step(state, scores, im_metric, tx_metric, LayerPlan(0, 20, 20, 20, 8, 8))
    assert out is state
    assert torch.equal(out.text_mask, mask)


def test_gradients_reach_kept_tokens_only():
    image, text, mask, scores, im_metric, tx_metric = make_inputs(2, 24, 8, [8, 5])
    image.requires_grad_(True)
    text.requires_grad_(True)
    schedule = ReducerSchedule(layers=[0], keep_ratio=0.5, merge_ratio=0.2, text_merge_ratio=0.25)
    plan = schedule.step(0, 24, 8)
    out = step(ReductionState.init(image, text, mask), scores, im_metric, tx_metric, plan)
    (out.image.sum() + out.text.sum()).backward()
    kept_rows = (image.grad.abs().sum(-1) > 0).sum(1)
    assert kept_rows.tolist() == [plan.image_kept] * 2
    assert (text.grad[mask.bool()].abs().sum(-1) > 0).all()


def test_missing_inputs_are_named():
    image, text, mask, scores, im_metric, tx_metric = make_inputs(1, 20, 8, [8])
    plan = ReducerSchedule(layers=[0], keep_ratio=0.5).step(0, 20, 8)
    with pytest.raises(ValueError, match="no scores were given"):
        step(ReductionState.init(image, text, mask), None, im_metric, tx_metric, plan)
    with pytest.raises(ValueError, match="expects 20 / 8"):
        step(ReductionState.init(image[:, :10], text, mask), scores, im_metric[:, :10], tx_metric, plan)
    merge = ReducerSchedule(layers=[0], merge_ratio=0.3).step(0, 20, 8)
    with pytest.raises(ValueError, match="no similarity metric"):
        reduce(ReductionState.init(image, text, mask), merge, scores=scores)


def test_text_importance_ignores_padded_rows():
    probs = torch.rand(2, 3, 4, 6).softmax(-1)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    scores = text_importance(probs, mask)
    expected = probs[0, :, :2].mean(0).sum(0) / 2
    torch.testing.assert_close(scores[0], expected)
    poisoned = probs.clone()
    poisoned[0, :, 2:] = 100.0  # garbage in padded rows must not matter
    torch.testing.assert_close(text_importance(poisoned, mask)[0], expected)


def test_attention_probs_match_softmax_and_mask():
    q, k = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 7, 8)
    key_mask = torch.tensor([[1] * 7, [1] * 5 + [0, 0]])
    bias = torch.rand(2, 7)
    probs = attention_probs(q.half(), k.half(), key_mask, bias)
    assert probs.dtype == torch.float32
    logits = (q.half().float() @ k.half().float().transpose(-1, -2)) / math.sqrt(8) + bias[:, None, None]
    logits = logits.masked_fill(~key_mask.bool()[:, None, None], float("-inf"))
    torch.testing.assert_close(probs, logits.softmax(-1))
    assert (probs[1, ..., 5:] == 0).all()


def test_cls_importance_and_size_bias():
    probs = torch.rand(2, 4, 1, 9)
    torch.testing.assert_close(cls_importance(probs), probs[:, :, 0].mean(1))
    torch.testing.assert_close(size_bias(torch.tensor([[1.0, 4.0]])), torch.tensor([[0.0, math.log(4.0)]]))


def test_half_precision_merge_keeps_dtype_and_accuracy():
    image, text, mask, scores, im_metric, tx_metric = make_inputs(2, 40, 8, [8, 6])
    schedule = ReducerSchedule(layers=[0], keep_ratio=0.8, merge_ratio=0.3, text_merge_ratio=0.25)
    plan = schedule.step(0, 40, 8)
    ref = step(ReductionState.init(image.float(), text.float(), mask), scores, im_metric, tx_metric, plan)
    half = step(
        ReductionState.init(image.bfloat16(), text.bfloat16(), mask), scores, im_metric, tx_metric, plan
    )
    assert half.image.dtype == torch.bfloat16
    torch.testing.assert_close(half.image.float(), ref.image, atol=0.05, rtol=0.05)
