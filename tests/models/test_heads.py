"""Task heads: the original dimensions (docs/backbones.md#heads) and composition with any backbone."""

from __future__ import annotations

import pytest
import torch
from model_refs import make_inputs
from torch import nn

from pumer_lightning.models import TASKS, RetrievalScores, build_head


def _shapes(head: nn.Module) -> list[tuple[int, ...]]:
    return [tuple(p.shape) for name, p in head.named_parameters() if name.endswith("weight")]


# (pooled size, width) of the full-size models, and the weight shapes of their original heads
FULL_SIZE = {
    "vilt": (
        768,
        1536,
        {
            "vqa2": [(1536, 768), (1536,), (3129, 1536)],
            "nlvr2": [(1536, 1536), (1536,), (2, 1536)],
            "snli_ve": [(1536, 768), (1536,), (3, 1536)],
            "retrieval": [(1, 768), (2, 768)],
        },
    ),
    "meter": (
        1536,
        1536,
        {
            "vqa2": [(1536, 1536), (1536,), (3129, 1536)],
            "nlvr2": [(1536, 3072), (1536,), (2, 1536)],
            "snli_ve": [(1536, 1536), (1536,), (3, 1536)],
            "retrieval": [(1, 1536), (2, 1536)],
        },
    ),
}


@pytest.mark.parametrize("family", ["vilt", "meter"])
@pytest.mark.parametrize("task", TASKS)
def test_full_size_head_dimensions(family, task):
    hidden, width, shapes = FULL_SIZE[family]
    assert _shapes(build_head(task, hidden, width=width)) == shapes[task]


def test_default_width_is_vilts_and_errors_are_clear():
    assert _shapes(build_head("vqa2", 768)) == FULL_SIZE["vilt"][2]["vqa2"]
    assert _shapes(build_head("vqa2", 768, num_answers=10))[-1] == (10, 1536)
    with pytest.raises(ValueError, match="unknown task 'gqa'"):
        build_head("gqa", 768)


@pytest.mark.parametrize("backbone_name", ["tiny_vilt", "tiny_meter"])
@pytest.mark.parametrize("task", TASKS)
def test_any_head_composes_with_any_backbone(request, backbone_name, task):
    backbone = request.getfixturevalue(backbone_name)
    head = build_head(task, backbone.hidden_size, num_answers=7, width=backbone.head_width)
    pixel_values, input_ids, mask = make_inputs(backbone, (5, 3))
    with torch.no_grad():
        pooled = backbone(pixel_values, input_ids, mask).pooled
        if task == "nlvr2":
            pooled = torch.cat([pooled, pooled.flip(0)], dim=-1)  # two passes, one per image
        out = head(pooled)
    if task == "retrieval":
        assert isinstance(out, RetrievalScores) and out.rank.shape == (2,) and out.itm.shape == (2, 2)
    else:
        assert out.shape == (2, {"vqa2": 7, "nlvr2": 2, "snli_ve": 3}[task])


def test_rank_init_from_itm():
    head = build_head("retrieval", 16)
    head.init_rank_from_itm()
    assert torch.equal(head.rank_output.weight, head.itm.weight[1:])
