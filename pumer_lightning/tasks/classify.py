"""Single-label classification tasks (NLVR2, SNLI-VE): cross-entropy, micro accuracy, accuracy per type."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from .base import VLTask
from .metrics import GroupedScore
from .outputs import STAGES, stage_key

#: Groups reported per type: the shapes world's statement types and VQAv2's answer types.
GROUPS: tuple[str, ...] = (
    "shape",
    "color",
    "exist",
    "both",
    "count",
    "rel",
    "neutral",
    "caption",
    "yes/no",
    "number",
    "other",
)


def group_tag(name: str) -> str:
    """A group name as a TensorBoard tag component (``yes/no`` -> ``yes_no``)."""
    return name.replace("/", "_").replace(" ", "_")


class ClassificationTask(VLTask):
    """Cross-entropy over ``num_classes`` labels with micro-averaged accuracy, overall and per type."""

    num_classes: int = 2

    def build_metrics(self) -> None:
        # micro average = plain accuracy (MulticlassAccuracy's default is macro)
        self.accuracy = nn.ModuleDict(
            {stage_key(s): MulticlassAccuracy(num_classes=self.num_classes, average="micro") for s in STAGES}
        )
        self.accuracy_by_type = nn.ModuleDict({stage_key(s): GroupedScore(GROUPS) for s in STAGES})

    def task_loss(self, logits: Tensor, batch: dict[str, Any]) -> Tensor:
        return F.cross_entropy(logits.float(), batch["labels"])

    def update_metrics(self, stage: str, logits: Tensor, batch: dict[str, Any]) -> None:
        preds = logits.argmax(dim=-1)
        self.accuracy[stage_key(stage)].update(preds, batch["labels"])
        self.accuracy_by_type[stage_key(stage)].update(
            (preds == batch["labels"]).float(), self.group_names(batch)
        )

    def log_epoch_metrics(self, stage: str) -> None:
        acc = self.accuracy[stage_key(stage)]
        if self.has_updates(acc):
            self.log(f"{stage}/acc", acc.compute(), prog_bar=stage == "val", sync_dist=True)
        acc.reset()
        by_type = self.accuracy_by_type[stage_key(stage)]
        if self.has_updates(by_type):
            for name, value in by_type.compute().items():
                self.log(f"{stage}/acc_by_type/{group_tag(name)}", value, sync_dist=True)
        by_type.reset()

    def label_names(self) -> list[str]:
        """The data's class names (index = class id); the ids as text when the data name none."""
        names = self.data_facts.label_names
        return list(names) if names else [str(i) for i in range(self.num_classes)]

    def prediction_rows(self, logits: Tensor, batch: dict[str, Any]) -> list[dict[str, Any]]:
        preds = logits.argmax(dim=-1).tolist()
        labels = batch["labels"].tolist() if "labels" in batch else [None] * len(preds)
        return [{"key": k, "pred": p, "label": y} for k, p, y in zip(batch["keys"], preds, labels)]

    def write_predictions(self, rows: list[dict[str, Any]], directory: Path, stage: str) -> Path:
        """``<task>_<stage>_predictions.csv``: one ``identifier,prediction`` line per example (no header)."""
        names = self.label_names()
        path = directory / f"{self.task_name}_{stage}_predictions.csv"
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            for row in sorted(rows, key=lambda r: r["key"]):
                writer.writerow([row["key"], names[row["pred"]]])
        return path
