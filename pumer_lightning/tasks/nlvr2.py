"""NLVR2: is a statement true of an image pair? Two backbone passes, cross-entropy over {False, True}."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from .classify import ClassificationTask


class NLVR2Task(ClassificationTask):
    """NLVR2 (and the shapes world's two-image statements).

    The backbone runs once per image with the same text, image 0 with modality type 1 and image 1 with type 2
    (so it is built with three type rows); the head sees the two pooled vectors concatenated
    (docs/backbones.md#heads).
    Accuracy is micro-averaged; ``test`` also reports consistency (every statement's examples right) and writes
    ``nlvr2_test_predictions.csv`` (``identifier,True|False``).
    """

    task_name = "nlvr2"
    num_classes = 2
    num_token_types = 3
    images_per_example = 2

    def prediction_metrics(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """Consistency: the fraction of statements all of whose examples are right. NLVR2 identifiers are
        ``<split>-<set>-<pair>-<sentence>``; the statement is everything before the last dash-field."""
        if any(r["label"] is None for r in rows):
            return {}
        by_statement: dict[str, bool] = defaultdict(lambda: True)
        for r in rows:
            statement = r["key"].rsplit("-", 1)[0]
            by_statement[statement] &= r["pred"] == r["label"]
        return {"consistency": sum(by_statement.values()) / len(by_statement)}
