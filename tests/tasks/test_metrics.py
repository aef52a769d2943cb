"""Metrics: VQA score, per-type scores, retrieval recall (hit rate) and reranking, against direct computations."""

from __future__ import annotations

import pytest
import torch

from pumer_lightning.tasks import GroupedScore, VQAScore, recall_at_k, rerank_recall, topk_candidates


def test_vqa_score_is_the_soft_score_of_the_argmax():
    logits = torch.tensor([[0.1, 2.0, 0.3], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    targets = torch.tensor([[0.0, 0.6, 1.0], [0.3, 0.0, 0.0], [0.0, 0.0, 0.0]])
    metric = VQAScore()
    metric.update(logits[:2], targets[:2])
    metric.update(logits[2:], targets[2:])
    assert metric.compute().item() == pytest.approx((0.6 + 0.3 + 0.0) / 3)


def test_grouped_score_keeps_groups_apart_and_ignores_unknown_names():
    metric = GroupedScore(["shape", "color", "rel"])
    metric.update(torch.tensor([1.0, 0.0, 1.0, 1.0]), ["shape", "shape", "color", "unknown"])
    metric.update(torch.tensor([0.0]), ["color"])
    out = metric.compute()
    assert set(out) == {"shape", "color"}  # "rel" received nothing, "unknown" is not a group
    assert out["shape"].item() == pytest.approx(0.5)
    assert out["color"].item() == pytest.approx(0.5)


def _reference_recall(scores, row_ids, col_ids, k):
    n_img, n_text = len(scores), len(scores[0])
    tr, ir = [], []
    for i in range(n_img):
        own = {j for j in range(n_text) if col_ids[j] == row_ids[i]}
        if own:
            top = sorted(range(n_text), key=lambda j: -scores[i][j])[:k]
            tr.append(bool(own & set(top)))
    for j in range(n_text):
        rows = [i for i in range(n_img) if row_ids[i] == col_ids[j]]
        if rows:
            top = sorted(range(n_img), key=lambda i: -scores[i][j])[:k]
            ir.append(rows[0] in top)
    return sum(tr) / len(tr), sum(ir) / len(ir)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_matches_a_direct_count_with_five_captions_per_image(seed):
    g = torch.Generator().manual_seed(seed)
    n_img = 12
    row_ids = torch.randperm(n_img, generator=g) + 100  # rows in arbitrary order, ids not 0..N-1
    col_ids = torch.arange(100, 100 + n_img).repeat_interleave(5)[torch.randperm(5 * n_img, generator=g)]
    col_ids[:3] = 999  # captions whose image is not among the rows (a truncated evaluation)
    scores = torch.randn(n_img, col_ids.numel(), generator=g)
    got = recall_at_k(scores, row_ids, col_ids, ks=(1, 5, 10))
    for k in (1, 5, 10):
        tr, ir = _reference_recall(scores.tolist(), row_ids.tolist(), col_ids.tolist(), k)
        assert got[f"tr_r{k}"] == pytest.approx(tr)
        assert got[f"ir_r{k}"] == pytest.approx(ir)


def test_perfect_scores_give_recall_one_and_shape_errors_are_caught():
    row_ids = torch.arange(4)
    col_ids = torch.arange(4).repeat_interleave(2)
    scores = (row_ids[:, None] == col_ids[None, :]).float()
    out = recall_at_k(scores, row_ids, col_ids)
    assert out["tr_r1"] == out["ir_r1"] == out["r_mean"] == 1.0
    with pytest.raises(ValueError, match="must be"):
        recall_at_k(scores[:, :3], row_ids, col_ids)


def test_rerank_candidates_and_identity_rerank():
    g = torch.Generator().manual_seed(3)
    row_ids = torch.arange(10)
    col_ids = torch.arange(10).repeat_interleave(3)
    first = torch.randn(10, 30, generator=g)
    mask = topk_candidates(first, 4)
    assert (mask.sum(dim=1) >= 4).all() and (mask.sum(dim=0) >= 4).all()
    # reranking with the same scores keeps every R@k with k <= top_k
    same = rerank_recall(first, first.clone(), row_ids, col_ids, k=5, ks=(1, 5))
    plain = recall_at_k(first, row_ids, col_ids, ks=(1, 5))
    for key in ("tr_r1", "tr_r5", "ir_r1", "ir_r5"):
        assert same[key] == pytest.approx(plain[key])
    # a perfect second pass fixes every query whose positive is among the first pass's candidates
    perfect = (row_ids[:, None] == col_ids[None, :]).float()
    fixed = rerank_recall(first, perfect, row_ids, col_ids, k=30, ks=(1,))
    assert fixed["tr_r1"] == 1.0 and fixed["ir_r1"] == 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sums_stay_float64_when_the_task_module_is_cast(dtype):
    """`--trainer.precision bf16-true` casts the task module, metrics included, with `module.to(dtype)`: the sums
    must stay float64 (in bf16 a 0.3-point score summed over 999 questions is off by whole questions, and the
    grouped score's index_add_ of float64 values into a bf16 state raises)."""
    holder = torch.nn.ModuleDict({"vqa": VQAScore(), "grouped": GroupedScore(["a", "b"])}).to(dtype)
    vqa, grouped = holder["vqa"], holder["grouped"]
    assert vqa.score.dtype == grouped.sums.dtype == torch.float64
    n = 999
    logits = torch.zeros(n, 2).to(dtype)
    logits[:, 1] = 1
    targets = torch.zeros(n, 2)
    targets[:, 1] = 0.3
    vqa.update(logits, targets)
    grouped.update(torch.full((n,), 0.3), ["a"] * n)
    assert vqa.score.item() == pytest.approx(0.3 * n, rel=1e-6)  # bf16 sums: 300 (8 bits)
    assert grouped.compute()["a"].item() == pytest.approx(0.3, abs=1e-6)
    vqa.reset()
    assert vqa.score.dtype == torch.float64 and vqa.score.item() == 0.0
