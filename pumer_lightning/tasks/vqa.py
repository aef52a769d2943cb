"""VQAv2: multi-label answer classification against soft scores; VQA score; EvalAI answer JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from pumer_lightning.data.facts import DataFacts
from pumer_lightning.models import BackboneSpec, build_head
from pumer_lightning.reduce import ReducerSchedule

from .base import VLTask
from .classify import GROUPS, group_tag
from .config import DistillConfig, OptimConfig
from .metrics import GroupedScore, VQAScore
from .outputs import STAGES, stage_key


class VQATask(VLTask):
    """VQAv2 (and the shapes world's questions).

    The loss is binary cross-entropy with logits against the soft answer scores, mean-reduced and multiplied by
    the number of answers, as the original ViLT and METER do (PuMer's code drops the factor, which shrinks the
    task term about 3129x against distillation: docs/official_code_differences.md#b17). Distillation uses the
    same sigmoid/BCE form
    with the teacher's sigmoid probabilities as soft targets (not a softmax over a multi-label output, B16).

    Args:
        num_answers: answer vocabulary size (3129 for VQAv2); must equal the data's (``meta.json`` labels).
        backbone, reducer, optim, distill, predictions_dir: as for `VLTask`.
    """

    task_name = "vqa2"

    def __init__(
        self,
        num_answers: int = 3129,
        backbone: BackboneSpec = BackboneSpec(),  # noqa: B008 (never mutated)
        reducer: ReducerSchedule = ReducerSchedule(),  # noqa: B008
        optim: OptimConfig = OptimConfig(),  # noqa: B008
        distill: DistillConfig | None = None,
        predictions_dir: str | None = None,
    ) -> None:
        if num_answers < 1:
            raise ValueError(f"--model.num_answers must be >= 1, got {num_answers}")
        self.num_answers = num_answers
        super().__init__(backbone, reducer, optim, distill, predictions_dir)

    def build_metrics(self) -> None:
        self.vqa_score = nn.ModuleDict({stage_key(s): VQAScore() for s in STAGES})
        self.score_by_type = nn.ModuleDict({stage_key(s): GroupedScore(GROUPS) for s in STAGES})

    def build_head(self) -> nn.Module:
        return build_head("vqa2", self.backbone.hidden_size, self.num_answers, width=self.backbone.head_width)

    def check_data(self, facts: DataFacts) -> None:
        super().check_data(facts)
        n = len(facts.label_names or ())
        if n and n != self.num_answers:
            raise ValueError(
                f"the data's answer vocabulary has {n} answers but --model.init_args.num_answers is "
                f"{self.num_answers}; set --model.init_args.num_answers={n}"
            )

    def task_loss(self, logits: Tensor, batch: dict[str, Any]) -> Tensor:
        targets = batch["labels"]
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float()) * targets.shape[1]

    def distill_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        t = self.distill.temperature if self.distill is not None else 1.0
        soft = (teacher.float() / t).sigmoid()
        return F.binary_cross_entropy_with_logits(student.float() / t, soft) * student.shape[1] * t * t

    def update_metrics(self, stage: str, logits: Tensor, batch: dict[str, Any]) -> None:
        targets = batch["labels"]
        self.vqa_score[stage_key(stage)].update(logits, targets)
        per_example = targets.gather(1, logits.argmax(dim=-1, keepdim=True)).squeeze(1)
        self.score_by_type[stage_key(stage)].update(per_example, self.group_names(batch))

    def log_epoch_metrics(self, stage: str) -> None:
        metric = self.vqa_score[stage_key(stage)]
        if self.has_updates(metric):
            self.log(f"{stage}/vqa_score", metric.compute(), prog_bar=stage == "val", sync_dist=True)
        metric.reset()
        by_type = self.score_by_type[stage_key(stage)]
        if self.has_updates(by_type):
            for name, value in by_type.compute().items():
                self.log(f"{stage}/vqa_score_by_type/{group_tag(name)}", value, sync_dist=True)
        by_type.reset()

    def prediction_rows(self, logits: Tensor, batch: dict[str, Any]) -> list[dict[str, Any]]:
        preds = logits.argmax(dim=-1).tolist()
        rows = []
        for key, meta, p in zip(batch["keys"], batch.get("meta") or [{}] * len(preds), preds):
            qid = meta.get("question_id", key) if isinstance(meta, dict) else key
            rows.append({"question_id": qid, "pred": p})
        return rows

    def write_predictions(self, rows: list[dict[str, Any]], directory: Path, stage: str) -> Path:
        """``vqa2_<stage>_answers.json``: ``[{"question_id": int, "answer": str}, ...]`` for EvalAI."""
        names = list(self.data_facts.label_names or [str(i) for i in range(self.num_answers)])
        out = []
        for r in sorted(rows, key=lambda r: str(r["question_id"])):
            qid = r["question_id"]
            try:
                qid = int(qid)
            except (TypeError, ValueError):
                pass
            out.append({"question_id": qid, "answer": names[r["pred"]]})
        path = directory / f"vqa2_{stage}_answers.json"
        path.write_text(json.dumps(out))
        return path
