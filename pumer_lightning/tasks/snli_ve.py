"""SNLI-VE: does the image entail, contradict or leave open a hypothesis? 3-way cross-entropy."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from pumer_lightning.models import Backbone

from .classify import ClassificationTask, one_image_logits


class SNLIVETask(ClassificationTask):
    """SNLI-VE: labels contradiction 0, neutral 1, entailment 2; micro accuracy overall and per type.

    ``test`` writes ``snli_ve_test_predictions.csv`` (``pair id,label name``).
    """

    task_name = "snli_ve"
    num_classes = 3

    def compute_logits(
        self, batch: dict[str, Any], backbone: Backbone, head: nn.Module, tally: bool
    ) -> Tensor:
        return one_image_logits(self, batch, backbone, head, tally)
