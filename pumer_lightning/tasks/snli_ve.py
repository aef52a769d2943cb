"""SNLI-VE: does the image entail, contradict or leave open a hypothesis? 3-way cross-entropy."""

from __future__ import annotations

from .classify import ClassificationTask


class SNLIVETask(ClassificationTask):
    """SNLI-VE: labels contradiction 0, neutral 1, entailment 2; micro accuracy overall and per type.

    ``test`` writes ``snli_ve_test_predictions.csv`` (``pair id,label name``).
    """

    task_name = "snli_ve"
    num_classes = 3
