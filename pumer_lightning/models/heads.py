"""Task heads on pooled backbone features (docs/backbones.md#heads). Any head composes with any backbone.

Classification heads are the originals' ``Linear -> LayerNorm -> GELU -> Linear`` stacks, as an `nn.Sequential`
so that the parameter names (``0.weight``, ``1.weight``, ``3.weight``) match the original and HF checkpoints.
Their inner width is 1536 for both full-size models: ``2 * hidden`` for ViLT (pooled 768) and ``hidden`` for
METER (pooled 1536). Pass ``width=backbone.head_width`` to get the original shapes for any backbone.

| task        | input            | output                                     |
|-------------|------------------|--------------------------------------------|
| ``vqa2``    | hidden           | ``num_answers`` logits (multi-label)       |
| ``nlvr2``   | 2 * hidden       | 2 logits (False, True); input = two passes |
| ``snli_ve`` | hidden           | 3 logits (contradiction, neutral, entail.) |
| ``retrieval`` | hidden         | rank score (B,) + ITM logits (B, 2)        |
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from torch import Tensor, nn

Task = Literal["vqa2", "nlvr2", "snli_ve", "retrieval"]
TASKS: tuple[str, ...] = ("vqa2", "nlvr2", "snli_ve", "retrieval")


def _init(module: nn.Module) -> None:
    """The originals' init: normal(0, 0.02) weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ClassifierHead(nn.Sequential):
    """``Linear(d_in, width) -> LayerNorm -> GELU -> Linear(width, num_classes)``; (B, d_in) -> (B, num_classes)."""

    def __init__(self, d_in: int, width: int, num_classes: int) -> None:
        super().__init__(
            nn.Linear(d_in, width), nn.LayerNorm(width), nn.GELU(), nn.Linear(width, num_classes)
        )
        self.num_classes = num_classes
        self.apply(_init)


class RetrievalScores(NamedTuple):
    rank: Tensor  # (B,) image-text matching score, ranked over candidates
    itm: Tensor  # (B, 2) ITM logits (no match, match)


class RetrievalHead(nn.Module):
    """``rank_output`` Linear(hidden, 1) and ``itm`` Linear(hidden, 2) on the same pooled features."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.rank_output = nn.Linear(hidden_size, 1)
        self.itm = nn.Linear(hidden_size, 2)
        self.apply(_init)

    def forward(self, pooled: Tensor) -> RetrievalScores:
        return RetrievalScores(rank=self.rank_output(pooled).squeeze(-1), itm=self.itm(pooled))

    def init_rank_from_itm(self) -> None:
        """Original fine-tuning init: the rank score starts as the ITM "match" logit (row 1)."""
        self.rank_output.weight.data.copy_(self.itm.weight.data[1:])
        self.rank_output.bias.data.copy_(self.itm.bias.data[1:])


def num_classes(task: Task, num_answers: int = 3129) -> int:
    if task == "vqa2":
        return num_answers
    return {"nlvr2": 2, "snli_ve": 3, "retrieval": 1}[task]


def build_head(
    task: Task, hidden_size: int, num_answers: int = 3129, *, width: int | None = None
) -> nn.Module:
    """The head of ``task`` for pooled features of size ``hidden_size``.

    Args:
        task: one of ``vqa2``, ``nlvr2``, ``snli_ve``, ``retrieval``.
        hidden_size: the backbone's pooled size (``backbone.hidden_size``). The NLVR2 head takes twice that.
        num_answers: VQA answer vocabulary size.
        width: inner width of the classifier MLP; default ``2 * hidden_size`` (ViLT's heads). METER's original
            heads use ``hidden_size``; ``width=backbone.head_width`` is right for both.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if task == "vqa2" and num_answers < 1:
        raise ValueError(f"num_answers must be positive, got {num_answers}")
    if task == "retrieval":
        return RetrievalHead(hidden_size)
    width = width if width is not None else 2 * hidden_size
    d_in = 2 * hidden_size if task == "nlvr2" else hidden_size
    return ClassifierHead(d_in, width, num_classes(task, num_answers))
