"""Text-merge policies, score-order partitioning, the compiled step, and the step's op count."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pumer_lightning.reduce import ReducerSchedule, ReductionState, reduce
from pumer_lightning.reduce.reducer import _step
from pumer_lightning.reduce.released import RELEASED


def _text_case(n_text, lengths, seed=0, dim=6, channels=4):
    gen = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    text = torch.randn(batch, n_text, channels, generator=gen, dtype=torch.float64)
    image = torch.randn(batch, 5, channels, generator=gen, dtype=torch.float64)
    mask = (torch.arange(n_text)[None] < torch.tensor(lengths)[:, None]).long()
    metric = torch.randn(batch, n_text + 5, dim, generator=gen, dtype=torch.float64)
    return image, text, mask, metric


@pytest.mark.parametrize(("policy", "merged_real"), [("real", 2), ("pads_first", 0)])
def test_short_text_keeps_its_words_under_pads_first(policy, merged_real):
    # a 9-token statement padded to 40 (the official fixed padding): the step removes round(0.2 * 40) = 8 tokens
    image, text, mask, metric = _text_case(40, [9])
    schedule = ReducerSchedule(layers=[0], text_merge_ratio=0.2, text_merge_policy=policy)
    plan = schedule.step(0, 5, 40)
    assert plan.n_text_merge == 8
    out = reduce(ReductionState.init(image, text, mask), plan, metric=metric)
    assert out.text.shape[1] == 32
    assert int(out.text_mask.sum()) == 9 - merged_real
    if policy == "pads_first":  # no real token touched: the real text comes out as it went in
        torch.testing.assert_close(out.text[0, :9], text[0, :9], rtol=0, atol=0)


def test_pads_first_merges_real_tokens_only_for_what_pads_cannot_cover():
    image, text, mask, metric = _text_case(12, [12, 10, 3])
    schedule = ReducerSchedule(layers=[0], text_merge_ratio=0.4, text_merge_policy="pads_first")
    plan = schedule.step(0, 5, 12)
    assert plan.n_text_merge == 5
    out = reduce(ReductionState.init(image, text, mask), plan, metric=metric)
    # 12 real: no pads, merges 5; 10 real: 2 pads, merges 3; 3 real: 9 pads, merges 0
    assert out.text_mask.sum(1).tolist() == [7, 7, 3]
    assert [plan.text_counts(n) for n in (12, 10, 3)] == [(5, 0), (3, 2), (0, 5)]


def test_pads_first_is_per_example_under_fixed_padding():
    image, text, mask, metric = _text_case(16, [16, 11, 6, 2], seed=1)
    schedule = ReducerSchedule(layers=[0], text_merge_ratio=0.3, text_merge_policy="pads_first")
    plan = schedule.step(0, 5, 16)
    together = reduce(ReductionState.init(image, text, mask), plan, metric=metric)
    for b in range(4):
        alone = reduce(
            ReductionState.init(image[b : b + 1], text[b : b + 1], mask[b : b + 1]),
            plan,
            metric=metric[b : b + 1],
        )
        torch.testing.assert_close(alone.tokens[0], together.tokens[b])


def test_policy_and_partition_leave_the_released_counts_alone():
    for setting in RELEASED.values():
        base = setting.schedule
        for policy in ("real", "pads_first"):
            for partition in ("spatial", "score"):
                other = ReducerSchedule(
                    layers=base.layers, keep_ratio=base.keep_ratio, merge_ratio=base.merge_ratio,
                    text_merge_ratio=base.text_merge_ratio, text_merge_policy=policy, partition=partition,
                )  # fmt: skip
                counts = [(p.image_out, p.text_out) for p in other.plan(setting.n_image, setting.n_text)]
                assert counts == [
                    (p.image_out, p.text_out) for p in base.plan(setting.n_image, setting.n_text)
                ]


def test_bad_policy_and_partition_are_named():
    with pytest.raises(ValueError, match="text_merge_policy must be one of"):
        ReducerSchedule(text_merge_policy="pads")
    with pytest.raises(ValueError, match="partition must be one of"):
        ReducerSchedule(partition="random")


# ---- score-order partitioning, worked by hand -----------------------------------------------------------------
# Six image tokens (0 = CLS). Scores rank them 5 > 1 > 3 > 2 > 4. Token 1 and token 4 are identical; token 2 is
# close (cosine 0.8) to token 3. One token merges (round(0.2 * 6) = 1).
#   score order [0, 5, 1, 3, 2, 4]: A = positions 2, 4 -> tokens 1, 2 (position 0, the CLS, protected);
#   B = positions 1, 3, 5 -> tokens 5, 3, 4. Best matches: 1 -> 4 (1.0), 2 -> 3 (0.8): token 1 merges into 4.
#   spatial order: A = tokens 2, 4; B = tokens 1, 3, 5. Best: 4 -> 1 (1.0), 2 -> 3 (0.8): token 4 merges into 1.
IMAGE_METRIC = [[-1.0, -1.0, -1.0], [1, 0, 0], [0, 1, 0], [0, 0.8, 0.6], [1, 0, 0], [0, 0, 1]]
SCORES = [0.0, 0.8, 0.6, 0.7, 0.5, 0.9]


@pytest.mark.parametrize(
    ("partition", "groups"),
    [("score", [[0], [2], [3], [1, 4], [5]]), ("spatial", [[0], [1, 4], [2], [3], [5]])],
)
def test_partition_order_worked_example(partition, groups):
    image = torch.arange(6, dtype=torch.float64)[None, :, None] * torch.tensor(
        [1.0, 10.0], dtype=torch.float64
    )
    text = torch.zeros(1, 1, 2, dtype=torch.float64)
    metric = torch.tensor([[[0.0, 0.0, 1.0], *IMAGE_METRIC]], dtype=torch.float64)
    schedule = ReducerSchedule(layers=[0], merge_ratio=0.2, partition=partition)
    plan = schedule.step(0, 6, 1)
    assert plan.n_merge == 1 and plan.n_prune == 0
    state = ReductionState.init(image, text, torch.ones(1, 1, dtype=torch.long), track_maps=True)
    out = reduce(state, plan, scores=torch.tensor([SCORES], dtype=torch.float64), metric=metric)
    expected = torch.stack([image[0, g].mean(0) for g in groups])
    torch.testing.assert_close(out.image[0], expected)
    assert out.image_size[0].tolist() == [float(len(g)) for g in groups]
    assert out.patch_map[0].tolist() == [next(i for i, g in enumerate(groups) if t in g) for t in range(6)]


# ---- the compiled step ------------------------------------------------------------------------------------------
def _released_inputs(batch=2, channels=32, dim=16, policy="real", partition="spatial", seed=0):
    gen = torch.Generator().manual_seed(seed)
    schedule = ReducerSchedule(
        layers=[0], keep_ratio=0.9, merge_ratio=0.3, text_merge_ratio=0.2,
        text_merge_policy=policy, partition=partition,
    )  # fmt: skip
    plan = schedule.step(0, 145, 40)
    mask = (torch.arange(40)[None] < torch.tensor([25, 40][:batch])[:, None]).long()
    state = ReductionState.init_joint(torch.randn(batch, 185, channels, generator=gen), 40, mask)
    scores = torch.rand(batch, 145, generator=gen)
    metric = torch.randn(batch, 185, dim, generator=gen)
    return state, plan, scores, metric


def test_step_traces_as_one_graph():
    state, plan, scores, metric = _released_inputs()
    _step(state.tokens, state.size, state.n_real, scores, metric, plan)  # eager warm-up: the plan's constants
    explained = torch._dynamo.explain(_step)(state.tokens, state.size, state.n_real, scores, metric, plan)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (
            getattr(func, "is_view", False)
            or str(func).startswith(("aten.empty", "aten.lift_fresh", "aten.detach"))
        ):
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_eager_step_op_count_is_pinned():
    # ViLT's released NLVR2 step (keep 0.9, merge 0.3, text 0.2 on 145 image / 40 text tokens), constants cached:
    # each op is a kernel launch on a GPU. (Before the joint rewrite a ViLT step added 124 ops to a forward.)
    state, plan, scores, metric = _released_inputs()
    reduce(state, plan, scores=scores, metric=metric)  # builds the plan's constants
    counter = _Ops()
    with torch.inference_mode(), counter:
        reduce(state, plan, scores=scores, metric=metric)
    assert counter.n == 38  # 37 before pruning took rows by index_select (one more op: the row offsets)


@pytest.mark.slow
@pytest.mark.parametrize(("policy", "partition"), [("real", "spatial"), ("pads_first", "score")])
def test_compiled_step_equals_eager(policy, partition):
    state, plan, scores, metric = _released_inputs(policy=policy, partition=partition)
    eager = reduce(state, plan, scores=scores, metric=metric)
    with torch.inference_mode():
        compiled = reduce(state, plan, scores=scores, metric=metric, compiled=True)
    torch.testing.assert_close(compiled.tokens, eager.tokens)
    torch.testing.assert_close(compiled.size, eager.size)
    assert torch.equal(compiled.real, eager.real) and torch.equal(compiled.n_real, eager.n_real)


def test_rank_by_sorting_equals_rank_by_comparison():
    from pumer_lightning.reduce.merge import _stream_ranks, layout

    gen = torch.Generator().manual_seed(0)
    values = torch.randint(0, 4, (3, 13), generator=gen).float()  # many ties
    values[0, 2] = float("-inf")
    lay = layout(5, 8, values.device)
    sorted_ranks = _stream_ranks(values, lay, 5)
    above = values[:, None, :] > values[:, :, None]
    tied_before = (values[:, None, :] == values[:, :, None]) & lay.earlier
    assert torch.equal(sorted_ranks, ((above & lay.same) | tied_before).sum(dim=-1))
