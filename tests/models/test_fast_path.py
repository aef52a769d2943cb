"""The inference fast path: half-precision weights, the reducer implementation switch, CUDA-graph replay."""

import pytest
import torch

from pumer_lightning.models import build_backbone
from pumer_lightning.models.graphed import CudaGraphs
from pumer_lightning.reduce import ReducerSchedule

SCHEDULE = dict(layers=[1, 2], keep_ratio=0.7, merge_ratio=0.2, text_merge_ratio=0.2, prop_attn=True)


def _inputs(size=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 900, (2, 12), generator=gen)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    return torch.randn(2, 3, size, size, generator=gen), ids, mask


@pytest.mark.parametrize("preset", ["vilt_tiny", "meter_tiny"])
def test_half_weights_run_the_reduced_forward(preset):
    # what --trainer.precision=bf16-true does: weights cast once, no per-call recast
    backbone = build_backbone(preset, reducer=ReducerSchedule(**SCHEDULE)).eval()
    px, ids, mask = _inputs()
    with torch.inference_mode():
        ref = backbone(px, ids, mask)
        out = backbone.to(torch.bfloat16)(px.bfloat16(), ids, mask)
    assert out.pooled.dtype == torch.bfloat16
    assert out.trace.image_tokens == ref.trace.image_tokens and torch.equal(out.text_mask, ref.text_mask)
    torch.testing.assert_close(out.pooled.float(), ref.pooled, atol=0.02, rtol=0.05)


def test_reducer_impl_is_checked_and_auto_is_eager_on_cpu():
    with pytest.raises(ValueError, match="reducer_impl must be one of"):
        build_backbone("vilt_tiny", reducer_impl="fast")
    backbone = build_backbone("vilt_tiny")
    assert backbone.reducer_impl == "auto" and not backbone.reduce_compiled(torch.zeros(1))
    backbone.reducer_impl = "compiled"
    assert backbone.reduce_compiled(torch.zeros(1))


def test_cuda_graphs_leave_cpu_and_training_alone():
    backbone = build_backbone("vilt_tiny").eval()
    with torch.no_grad():
        assert not CudaGraphs.applies(backbone, torch.zeros(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replay_equals_eager_on_gpu():
    backbone = build_backbone("vilt_tiny", reducer=ReducerSchedule(**SCHEDULE)).cuda().eval()
    graphs = CudaGraphs()
    for seed in range(3):  # the same graph replayed on new inputs
        px, ids, mask = (t.cuda() for t in _inputs(seed=seed))
        with torch.inference_mode():
            ref = backbone(px, ids, mask)
            out = graphs(backbone, px, ids, mask, 0)
        torch.testing.assert_close(out.pooled, ref.pooled)
    assert len(graphs._graphs) == 1


def test_using_swaps_and_restores_the_schedule_even_on_error():
    own = ReducerSchedule(**SCHEDULE)
    backbone = build_backbone("vilt_tiny", reducer=own)
    with backbone.using(None):
        assert backbone.reducer is None
    assert backbone.reducer is own
    with pytest.raises(RuntimeError), backbone.using(ReducerSchedule(layers=[0], keep_ratio=0.5)):
        assert backbone.reducer.layers == [0]
        raise RuntimeError("boom")
    assert backbone.reducer is own
    with (
        pytest.raises(ValueError, match="out of range"),
        backbone.using(ReducerSchedule(layers=[9], keep_ratio=0.5)),
    ):
        pass
    assert backbone.reducer is own
