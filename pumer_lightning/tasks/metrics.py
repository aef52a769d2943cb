"""Task metrics: VQA score, accuracy per statement type, and retrieval recall from a score matrix.

All metric objects sum their states, so they sync once per epoch under DDP (``dist_reduce_fx="sum"``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric


class SumMetric(Metric):
    """A metric whose floating-point sums keep their own dtype (float64) when the module holding it is cast.

    ``--trainer.precision bf16-true`` / ``16-true`` cast the whole task module with ``module.to(dtype)``, which
    torchmetrics applies to metric states too: a score summed in bf16 over a test split is off by whole examples
    (8 significant bits), and an ``index_add_`` of float64 values into a bf16 state fails. Here the floating-point
    states only follow the device."""

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = ()) -> nn.Module:
        sums = [k for k, v in self._defaults.items() if isinstance(v, Tensor) and v.is_floating_point()]
        this = super()._apply(fn, exclude_state=(*exclude_state, *sums))  # updates `this.device`
        for key in sums:
            this._defaults[key] = this._defaults[key].to(this.device)
            setattr(this, key, getattr(this, key).to(this.device))
        return this


class VQAScore(SumMetric):
    """VQAv2 accuracy: the soft score of the arg-max answer, averaged over questions.

    ``update(logits (B, A), targets (B, A))`` with ``targets`` the per-answer soft scores (0.3/0.6/0.9/1.0 for
    1/2/3/4+ matching annotators, the official leave-one-out accuracy). Questions whose answers are all out of
    the vocabulary count with score 0, as in the official evaluation.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("score", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, targets: Tensor) -> None:
        best = logits.argmax(dim=-1, keepdim=True)
        self.score += targets.gather(1, best).sum().to(torch.float64)
        self.total += targets.shape[0]

    def compute(self) -> Tensor:
        return (self.score / self.total.clamp(min=1)).float()


class GroupedScore(SumMetric):
    """Mean of a per-example score within fixed groups (e.g. accuracy per ``statement_type``).

    Args:
        groups: the group names, fixed up front so that every rank holds the same state shape. Examples whose
            group is not listed (or None) are left out.

    ``update(scores (B,), names: list[str])``; ``compute()`` returns ``{group: mean}`` for the non-empty groups.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, groups: Sequence[str], **kwargs) -> None:
        super().__init__(**kwargs)
        if not groups:
            raise ValueError("GroupedScore needs at least one group name")
        self.groups = tuple(groups)
        self._index = {name: i for i, name in enumerate(self.groups)}
        self.add_state("sums", torch.zeros(len(self.groups), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(len(self.groups), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, scores: Tensor, names: Sequence[str | None]) -> None:
        index = [self._index.get(str(n)) if n is not None else None for n in names]
        keep = [i for i, g in enumerate(index) if g is not None]
        if not keep:
            return
        groups = torch.tensor([index[i] for i in keep], device=self.sums.device)
        values = scores.detach().reshape(-1)[keep].to(self.sums.device, torch.float64)
        self.sums.index_add_(0, groups, values)
        self.counts.index_add_(0, groups, torch.ones_like(groups))

    def compute(self) -> dict[str, Tensor]:
        """Mean score of every group that received examples (on every rank: states are synced first)."""
        means = (self.sums / self.counts.clamp(min=1)).float()
        return {g: means[i] for i, g in enumerate(self.groups) if int(self.counts[i]) > 0}


def recall_at_k(
    scores: Tensor,
    row_ids: Tensor,
    col_ids: Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Image-text retrieval recall (hit rate) from an ``(N_img, N_text)`` score matrix.

    Args:
        scores: ``scores[i, j]`` = how well caption ``j`` matches image ``i`` (higher is better). Entries set to
            ``-inf`` are never retrieved (used for candidates a first pass ruled out).
        row_ids: (N_img,) the image id of each row.
        col_ids: (N_text,) the image id each caption belongs to.
        ks: cut-offs.
    Returns:
        ``tr_r{k}`` (text retrieval: for each image, is any of its captions among the top k texts) and ``ir_r{k}``
        (image retrieval: for each caption, is its image among the top k images), as fractions, plus ``r_mean``.
        Captions whose image has no row (e.g. a truncated evaluation) are left out of image retrieval; images
        with no caption are left out of text retrieval.
    """
    if scores.dim() != 2 or scores.shape != (row_ids.numel(), col_ids.numel()):
        raise ValueError(
            f"scores {tuple(scores.shape)} must be (len(row_ids)={row_ids.numel()}, len(col_ids)={col_ids.numel()})"
        )
    scores = scores.float()
    match = row_ids.reshape(-1, 1) == col_ids.reshape(1, -1)  # (N_img, N_text) ground-truth pairs
    has_text = match.any(dim=1)
    has_image = match.any(dim=0)
    out: dict[str, float] = {}
    n_img, n_text = scores.shape
    for k in ks:
        kt = min(k, n_text)
        top_texts = scores.topk(kt, dim=1).indices  # (N_img, kt)
        tr_hit = match.gather(1, top_texts).any(dim=1)
        out[f"tr_r{k}"] = float(tr_hit[has_text].float().mean()) if has_text.any() else float("nan")
        ki = min(k, n_img)
        top_images = scores.topk(ki, dim=0).indices  # (ki, N_text)
        ir_hit = match.gather(0, top_images).any(dim=0)
        out[f"ir_r{k}"] = float(ir_hit[has_image].float().mean()) if has_image.any() else float("nan")
    values = [v for v in out.values() if v == v]
    out["r_mean"] = sum(values) / len(values) if values else float("nan")
    return out


def topk_candidates(scores: Tensor, k: int) -> Tensor:
    """Boolean ``(N_img, N_text)`` mask of the pairs a reranker must score: each image's top-``k`` captions
    (text retrieval) united with each caption's top-``k`` images (image retrieval)."""
    n_img, n_text = scores.shape
    mask = torch.zeros_like(scores, dtype=torch.bool)
    rows = scores.topk(min(k, n_text), dim=1).indices
    mask.scatter_(1, rows, True)
    cols = scores.topk(min(k, n_img), dim=0).indices
    mask.scatter_(0, cols, True)
    return mask


def rerank_recall(
    first: Tensor, second: Tensor, row_ids: Tensor, col_ids: Tensor, k: int, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall after reranking: text retrieval ranks each image's top-``k`` first-pass captions by ``second``,
    image retrieval each caption's top-``k`` first-pass images; everything else ranks below them.

    ``second`` needs valid values only at `topk_candidates` (first, k); other entries are ignored.
    """
    n_img, n_text = first.shape
    low = torch.finfo(torch.float32).min
    tr = torch.full_like(first, low, dtype=torch.float32)
    rows = first.topk(min(k, n_text), dim=1).indices
    tr.scatter_(1, rows, second.float().gather(1, rows))
    ir = torch.full_like(first, low, dtype=torch.float32)
    cols = first.topk(min(k, n_img), dim=0).indices
    ir.scatter_(0, cols, second.float().gather(0, cols))
    by_tr = recall_at_k(tr, row_ids, col_ids, ks)
    by_ir = recall_at_k(ir, row_ids, col_ids, ks)
    out = {key: by_tr[key] for key in by_tr if key.startswith("tr_")}
    out.update({key: by_ir[key] for key in by_ir if key.startswith("ir_")})
    values = [v for v in out.values() if v == v]
    out["r_mean"] = sum(values) / len(values) if values else float("nan")
    return out
