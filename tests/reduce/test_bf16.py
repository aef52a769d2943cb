"""bf16 inputs to a reduction step: the same kept and merged tokens as the same values in fp32.

The step's decisions (importance, pruning, matching) run in fp32 whatever the tokens' dtype. bf16 logits are computed
by oneDNN's bf16 kernels with fp32 output where the CPU has them: the products of bf16 values are exact in fp32, so
only the order of the sums differs from an fp32 matmul. What differs between a bf16 and an fp32 *model* is the
values themselves (docs/reducer.md#bf16-and-fp32-answers).
"""

from __future__ import annotations

import pytest
import torch

from pumer_lightning.reduce import (
    ReductionState,
    attention_probs,
    fp32_contiguous,
    key_metric,
    reduce,
    text_importance,
)
from pumer_lightning.reduce.prune import bf16_products
from pumer_lightning.reduce.released import RELEASED

BATCH, HEADS, N_TEXT, N_IMAGE, DIM = 4, 12, 40, 145, 64


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 queries and keys (B, H, N, D) and tokens (B, N, H D) of ViLT's joint sequence, and a text mask."""
    gen = torch.Generator().manual_seed(seed)
    n = N_TEXT + N_IMAGE
    q = torch.randn(BATCH, HEADS, n, DIM, generator=gen).bfloat16()
    k = torch.randn(BATCH, HEADS, n, DIM, generator=gen).bfloat16()
    x = torch.randn(BATCH, n, HEADS * DIM, generator=gen).bfloat16()
    lengths = torch.tensor([N_TEXT, 31, 17, 24])
    mask = (torch.arange(N_TEXT)[None] < lengths[:, None]).long()
    return q, k, x, mask


def _step(q: torch.Tensor, k: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, layer: int = 2):
    """ViLT's released NLVR2 step as the backbone runs it (importance from the text queries over all keys, the
    head-summed keys as the metric), with the maps of the kept and merged tokens."""
    schedule = RELEASED["vilt_nlvr2"].schedule
    plan = schedule.step(layer, N_IMAGE, N_TEXT)
    state = ReductionState.init_joint(x, N_TEXT, mask, track_maps=True)
    bias = torch.where(state.real, 0.0, torch.finfo(torch.float32).min)
    keys = fp32_contiguous(k)
    probs = attention_probs(q[:, :, :N_TEXT], keys, bias=bias)[..., N_TEXT:]
    scores = text_importance(probs, state.real[:, :N_TEXT], normalize=False)
    return scores, reduce(state, plan, scores=scores, metric=key_metric(keys))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_values_keep_and_merge_the_tokens_their_fp32_copies_do(seed):
    q, k, x, mask = _inputs(seed)
    with torch.inference_mode():
        scores16, out16 = _step(q, k, x, mask)
        scores32, out32 = _step(q.float(), k.float(), x.float(), mask)
    torch.testing.assert_close(scores16, scores32, rtol=1e-5, atol=0)
    assert torch.equal(
        out16.patch_map, out32.patch_map
    )  # the same image tokens kept, merged into the same ones
    assert torch.equal(out16.text_map, out32.text_map)
    assert torch.equal(out16.size, out32.size) and torch.equal(out16.real, out32.real)
    assert out16.tokens.dtype == torch.bfloat16
    # merged tokens are size-weighted means rounded to bf16; tokens alone in their slot come out unchanged
    torch.testing.assert_close(out16.tokens.float(), out32.tokens, rtol=2e-2, atol=2e-2)
    alone = out32.size == 1
    assert torch.equal(out16.tokens.float()[alone], out32.tokens[alone])


def test_bf16_logits_are_the_fp32_logits_up_to_summation_order():
    q, k, _, _ = _inputs()
    probs16 = attention_probs(q[:, :, :N_TEXT], k)
    probs32 = attention_probs(q[:, :, :N_TEXT].float(), k.float())
    assert probs16.dtype == torch.float32
    torch.testing.assert_close(probs16, probs32, rtol=1e-5, atol=1e-7)


def test_the_bf16_kernel_setting_is_restored_even_on_error():
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    with pytest.raises(RuntimeError, match="boom"), bf16_products():
        assert matmul.fp32_precision == "bf16"
        raise RuntimeError("boom")
    assert matmul.fp32_precision == before
