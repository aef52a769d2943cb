"""The shared task LightningModule: backbone + reducer schedule + head + metrics, one step for every stage.

A task subclass says how a batch becomes logits (`compute_logits`), how logits become a loss (`task_loss`,
`distill_loss`), which metrics it keeps and how its predictions are written. `VLTask` runs the rest on parts that
live in their own modules:

* the model: the backbone built from a `BackboneSpec` with the `ReducerSchedule` (``--model.reducer.keep_ratio=0.6``),
  the checkpoint's head and the distillation teacher (`pumer_lightning.models.spec`);
* the training settings (`OptimConfig`, `DistillConfig`: `.config`) and the optimiser: AdamW with three
  learning-rate groups and warmup then decay sized from ``trainer.estimated_stepping_batches`` (`.optim`);
* token bookkeeping: every step returns a `StepOutput` whose ``tokens`` (a `TokenTally`) the callbacks read as
  Lightning's ``outputs`` in ``on_*_batch_end`` (`.outputs`);
* the data: the `DataFacts` handed over once at ``setup`` (label names, splits, the skip ledger), and the report of
  the examples the data dropped (`.skips`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from pumer_lightning.data.facts import DataFacts
from pumer_lightning.measure import register_flop_formulas
from pumer_lightning.models import Backbone, BackboneOutput, build_head
from pumer_lightning.models.checkpoint import check_architecture
from pumer_lightning.models.graphed import CudaGraphs
from pumer_lightning.models.spec import BackboneSpec, build_from_spec, build_teacher, load_initial_head
from pumer_lightning.reduce import ReducerSchedule

# BackboneSpec, OptimConfig and DistillConfig are also names of this module: the hyper-parameters of checkpoints
# saved before they moved were pickled as ``pumer_lightning.tasks.base.<name>``.
from .config import DistillConfig, OptimConfig
from .optim import optimizer_and_schedule, param_groups
from .outputs import STAGES, Scored, StepOutput, TokenTally, stage_key
from .skips import SkipReport, write_skip_summary

__all__ = [
    "STAGES",
    "BackboneSpec",
    "DistillConfig",
    "OptimConfig",
    "Scored",
    "StepOutput",
    "TokenTally",
    "VLTask",
    "stage_key",
]

log = logging.getLogger("pumer_lightning.tasks")


class VLTask(pl.LightningModule):
    """Base class of the task modules; use `VQATask`, `NLVR2Task`, `SNLIVETask` or `RetrievalTask`.

    Args:
        backbone: which backbone to build and where its weights and tokenizer are.
        reducer: the PuMer schedule (block ids are the backbone's own 0-based indices). The unreduced baseline
            is ``--model.reducer.layers=[]``.
        optim: optimiser and learning-rate schedule.
        distill: knowledge distillation from a frozen teacher; None (default) trains on the task loss only.
        predictions_dir: where ``test`` and ``predict`` write predictions; default ``<log_dir>/predictions``.
    """

    task_name: str = ""
    num_token_types: int = 2
    #: Images per example, one backbone pass each (NLVR2: 2); see `compute_logits`.
    images_per_example: int = 1

    def __init__(
        self,
        backbone: BackboneSpec = BackboneSpec(),  # noqa: B008 (never mutated)
        reducer: ReducerSchedule = ReducerSchedule(),  # noqa: B008
        optim: OptimConfig = OptimConfig(),  # noqa: B008
        distill: DistillConfig | None = None,
        predictions_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.spec = backbone if backbone is not None else BackboneSpec()
        self.optim = optim if optim is not None else OptimConfig()
        self.distill = distill
        self.predictions_dir = predictions_dir
        self.backbone: Backbone = build_from_spec(
            self.spec,
            num_token_types=self.num_token_types,
            reducer=reducer if reducer is not None else ReducerSchedule(),
            tokenizer_size=self.tokenizer_size(),
        )
        self.head = self.build_head()
        load_initial_head(self.head, self.spec, self.task_name)
        self.teacher: nn.ModuleDict | None = None
        if distill is not None:
            self.teacher = build_teacher(
                distill.teacher,
                self.spec,
                backbone=self.backbone,
                head=self.head,
                new_head=self.build_head,
                task=self.task_name,
                tokenizer_size=self.tokenizer_size(),
            )
        self.build_metrics()
        self.cuda_graphs = CudaGraphs()
        self._replay_graphs = True  # False inside `eager_forwards`
        register_flop_formulas()  # Lightning's model summary then counts the CPU attention kernel too
        #: what the task knows of its data (`use_data`); empty until a trainer sets the module up
        self.data_facts = DataFacts()
        self.skip_report = SkipReport()
        self._predictions: list[dict[str, Any]] = []
        self.predictions_path: Path | None = None

    def tokenizer_size(self) -> int | None:
        """``len(tokenizer)`` of ``backbone.tokenizer`` (None when no tokenizer is given); read once."""
        if self.spec.tokenizer is None:
            return None
        if not hasattr(self, "_tokens"):
            from pumer_lightning.data import load_tokenizer

            self._tokens = len(load_tokenizer(self.spec.tokenizer))
        return self._tokens

    def build_head(self) -> nn.Module:
        return build_head(self.task_name, self.backbone.hidden_size, width=self.backbone.head_width)

    # ------------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the backbone's architecture: the hyper-parameters name only its preset, whose definition may
        change after the checkpoint is saved."""
        checkpoint["backbone_architecture"] = self.backbone.architecture

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        check_architecture(
            checkpoint.get("backbone_architecture"),
            self.backbone.architecture,
            f"Lightning checkpoint {path}" if path else "the Lightning checkpoint",
            f"--model.backbone.preset {self.spec.preset}",
        )

    def train(self, mode: bool = True) -> VLTask:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher never leaves eval mode (no dropout)
        return self

    # ------------------------------------------------------------------------------------------ the data
    def setup(self, stage: str) -> None:
        """Take the data module's facts (`DataFacts`), once per ``fit``/``validate``/``test``/``predict``."""
        self.use_data(DataFacts.of(getattr(self.trainer, "datamodule", None)))

    def use_data(self, facts: DataFacts) -> None:
        """Run on data described by ``facts`` (what ``setup`` hands over; call it to drive the module by hand)."""
        self.check_data(facts)
        self.data_facts = facts

    def check_data(self, facts: DataFacts) -> None:
        """Refuse data the task cannot run on, naming the setting to change."""
        if facts.task is not None and facts.task != self.task_name:
            raise ValueError(
                f"data.task is {facts.task!r} but the model is a {type(self).__name__} ({self.task_name!r}); set "
                f"--data.task={self.task_name} or choose the matching model class"
            )

    # ------------------------------------------------------------------------------------------ task interface
    def compute_logits(self, batch: dict[str, Any], backbone: Backbone, head: nn.Module) -> Scored:
        """Logits of a batch from ``backbone`` and ``head`` (the student's or the teacher's), with the tokens the
        backbone passes processed (``examples`` left for the step to set).

        Default (VQA, SNLI-VE, NLVR2): one pass per image of the example, image ``i`` with modality type ``i + 1``
        and the example's text; the pooled features are concatenated, then the head.
        """
        pixels = batch["pixel_values"]  # (B, images_per_example, 3, H, W); (B, 3, H, W) for one image
        n = self.images_per_example
        if n == 1:
            images = [pixels[:, 0] if pixels.dim() == 5 else pixels]
        elif pixels.dim() == 5 and pixels.shape[1] == n:
            images = list(pixels.unbind(1))
        else:
            raise ValueError(
                f"{self.task_name.upper()} needs pixel_values of shape (B, {n}, 3, H, W), "
                f"got {tuple(pixels.shape)}"
            )
        tokens = TokenTally()
        pooled = []
        for index, image in enumerate(images):
            out = self.encode(backbone, image, batch, index)
            tokens.add(out.trace, image.shape[0])
            pooled.append(out.pooled)
        return Scored(head(pooled[0] if n == 1 else torch.cat(pooled, dim=-1)), tokens)

    def build_metrics(self) -> None:
        """Create the metric modules (one set per stage)."""

    def task_loss(self, logits: Any, batch: dict[str, Any]) -> Tensor:
        raise NotImplementedError

    def distill_loss(self, student: Any, teacher: Any) -> Tensor:
        """Softmax KL(teacher || student) at temperature T, times T^2 (classification tasks)."""
        t = self.distill.temperature if self.distill is not None else 1.0
        log_p_s = torch.log_softmax(student.float() / t, dim=-1)
        log_p_t = torch.log_softmax(teacher.float() / t, dim=-1)
        kl = torch.nn.functional.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
        return kl * t * t

    def update_metrics(self, stage: str, logits: Any, batch: dict[str, Any]) -> None:
        raise NotImplementedError

    def log_epoch_metrics(self, stage: str) -> None:
        """Log (and reset) the epoch-level metrics of ``stage``."""
        raise NotImplementedError

    def has_updates(self, metric: Any) -> bool:
        """Whether to compute ``metric`` now. Under DDP every rank computes (``compute`` is a collective), even
        one that saw no batch of the split; alone, a metric without updates is skipped."""
        return bool(metric.update_count) or self.trainer.world_size > 1

    def prediction_rows(self, logits: Any, batch: dict[str, Any]) -> list[dict[str, Any]]:
        return []

    def write_predictions(self, rows: list[dict[str, Any]], directory: Path, stage: str) -> Path | None:
        return None

    def prediction_metrics(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """Metrics that need every prediction of the split at once (NLVR2 consistency); all ranks see all rows."""
        return {}

    # ------------------------------------------------------------------------------------------ backbone passes
    def encode(
        self,
        backbone: Backbone,
        pixel_values: Tensor,
        batch: dict[str, Any],
        image_index: int,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> BackboneOutput:
        """One backbone pass (replayed from a CUDA graph in CUDA inference, outside `eager_forwards`); its
        ``trace`` holds the token counts. The texts are the batch's unless given."""
        ids = batch["input_ids"] if input_ids is None else input_ids
        mask = batch["attention_mask"] if attention_mask is None else attention_mask
        if self.spec.cuda_graphs and self._replay_graphs and CudaGraphs.applies(backbone, pixel_values):
            return self.cuda_graphs(backbone, pixel_values, ids, mask, image_index)
        return backbone(pixel_values, ids, mask, image_index=image_index)

    @contextlib.contextmanager
    def eager_forwards(self) -> Iterator[VLTask]:
        """Run every backbone pass eagerly inside the block, also where a captured CUDA graph would replay it (a
        replay dispatches no operator, so a FLOP counter would see nothing); the setting is restored after."""
        own = self._replay_graphs
        self._replay_graphs = False
        try:
            yield self
        finally:
            self._replay_graphs = own

    def forward(self, batch: dict[str, Any], cuda_graphs: bool = True) -> Any:
        """The logits of ``batch``; ``cuda_graphs=False`` runs it under `eager_forwards`."""
        with contextlib.nullcontext() if cuda_graphs else self.eager_forwards():
            return self.compute_logits(batch, self.backbone, self.head).logits

    @property
    def example_input_array(self) -> tuple[dict[str, Tensor], bool]:
        """``forward``'s arguments for one example (`example_batch`), run eagerly: what Lightning's model summary
        forwards to fill its ``FLOPs`` column and total (``Total FLOPs: 0`` without it)."""
        return self.example_batch(), False

    def example_batch(self, batch_size: int = 1) -> dict[str, Tensor]:
        """A batch of ``batch_size`` examples shaped as this task's ``compute_logits`` reads it: the backbone's image
        size, ``images_per_example`` images each, texts of the backbone's ``max_text_len`` real tokens."""
        size, length = self.backbone.image_size, self.backbone.max_text_len
        ids = torch.full((batch_size, length), self.backbone.pad_token_id + 1, dtype=torch.long)
        return {
            "pixel_values": torch.zeros(batch_size, self.images_per_example, 3, size, size),
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
        }

    @staticmethod
    def batch_size_of(batch: dict[str, Any]) -> int:
        return int(batch["pixel_values"].shape[0])

    @staticmethod
    def group_names(batch: dict[str, Any]) -> list[str | None]:
        """Per-example group for per-type metrics: ``statement_type`` (shapes) or ``answer_type`` (VQAv2)."""
        out = []
        for m in batch.get("meta") or []:
            out.append(m.get("statement_type", m.get("answer_type")) if isinstance(m, dict) else None)
        return out

    # ------------------------------------------------------------------------------------------ steps
    def shared_step(self, batch: dict[str, Any], stage: str) -> StepOutput:
        """The step of every stage: logits, loss (if labelled), distillation (training), metrics, predictions;
        returns the loss and the step's tokens."""
        logits, tokens = self.compute_logits(batch, self.backbone, self.head)
        bs = self.batch_size_of(batch)
        tokens.examples = bs
        loss = None
        if "labels" in batch:
            loss = self.task_loss(logits, batch)
            if stage == "train" and self.teacher is not None:
                loss = self.with_distillation(loss, logits, batch)
            train = stage == "train"  # per step in training, per epoch in evaluation
            # evaluation: the mean over every rank's examples
            self.log(
                f"{stage}/loss",
                loss,
                batch_size=bs,
                prog_bar=train,
                on_step=train,
                on_epoch=not train,
                sync_dist=not train,
            )
            self.update_metrics(stage, logits, batch)
        if stage in ("test", "predict"):
            self._predictions.extend(self.prediction_rows(logits, batch))
        return {"loss": loss, "tokens": tokens}

    def with_distillation(self, loss: Tensor, logits: Any, batch: dict[str, Any]) -> Tensor:
        """The training loss with the teacher's term: ``task_weight * loss + weight * distill_loss``."""
        assert self.distill is not None and self.teacher is not None
        bs = self.batch_size_of(batch)
        with torch.no_grad():
            teacher = self.compute_logits(batch, self.teacher["backbone"], self.teacher["head"])
        kd = self.distill_loss(logits, teacher.logits)
        self.log("train/loss_task", loss, batch_size=bs)
        self.log("train/loss_distill", kd, batch_size=bs)
        return self.distill.task_weight * loss + self.distill.weight * kd

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> StepOutput:
        out = self.shared_step(batch, "train")
        if out["loss"] is None:
            raise ValueError("training batches must carry labels (is the train split unlabelled?)")
        return out

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> StepOutput:
        return self.shared_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> StepOutput:
        return self.shared_step(batch, "test")

    def predict_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> list[dict[str, Any]]:
        logits = self.compute_logits(batch, self.backbone, self.head).logits
        rows = self.prediction_rows(logits, batch)
        self._predictions.extend(rows)
        return rows

    # ------------------------------------------------------------------------------------------ epoch ends
    def on_train_epoch_end(self) -> None:
        self.log_epoch_metrics("train")
        self.skip_report.log_totals(self.data_facts, self)

    def on_validation_epoch_start(self) -> None:
        self.skip_report.begin("val", self.data_facts)

    def on_validation_epoch_end(self) -> None:
        self.log_epoch_metrics("val")
        self.skip_report.end("val", self.data_facts, self)

    def on_test_epoch_start(self) -> None:
        self._predictions = []
        self.skip_report.begin("test", self.data_facts)

    def on_predict_epoch_start(self) -> None:
        self._predictions = []
        self.skip_report.begin("predict", self.data_facts)

    def on_test_epoch_end(self) -> None:
        self.log_epoch_metrics("test")
        self._flush_predictions("test")
        self.skip_report.log_totals(self.data_facts, self)

    def on_predict_epoch_end(self) -> None:
        self._flush_predictions("predict")

    # ------------------------------------------------------------------------------------------ predictions
    def _flush_predictions(self, stage: str) -> None:
        # the skip counts are a collective under DDP: before anything that may return early
        skipped = self.skip_report.end(stage, self.data_facts, self)
        rows = self._predictions
        self._predictions = []
        if self.trainer.world_size > 1:
            gathered: list[list[dict[str, Any]]] = [None] * self.trainer.world_size  # type: ignore[list-item]
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        if not rows and not skipped:
            return
        if stage == "test" and rows:
            for name, value in self.prediction_metrics(rows).items():
                self.log(f"test/{name}", value, sync_dist=True)  # same value on every rank
        directory = self.output_dir("predictions")  # on every rank: log_dir is a broadcast under DDP
        if not self.trainer.is_global_zero:
            return
        directory.mkdir(parents=True, exist_ok=True)
        path = self.write_predictions(rows, directory, stage)
        if path is not None:
            self.write_skip_summary(path, stage, len(rows), skipped)
            total = sum(skipped.values())
            log.info("%s predictions: %s (%d, %d example(s) skipped)", stage, path, len(rows), total)
            self.predictions_path = path

    def write_skip_summary(self, path: Path, stage: str, predictions: int, skipped: dict[str, int]) -> Path:
        """``<predictions file>.skipped.json`` for the split ``stage`` read (`write_skip_summary`)."""
        split = self.data_facts.split(stage)
        return write_skip_summary(path, stage, split, predictions, skipped)

    def output_dir(self, name: str) -> Path:
        """``predictions_dir`` or ``<log_dir>/<name>``. Call it on every rank (``trainer.log_dir`` is a collective)."""
        return Path(self.predictions_dir or Path(self.trainer.log_dir or ".") / name)

    @contextlib.contextmanager
    def predictions_to(self, directory: str | Path) -> Iterator[VLTask]:
        """Write ``test``/``predict`` predictions to ``directory`` inside the block (e.g. one folder per control
        run); the module's own ``predictions_dir`` is restored after."""
        own = self.predictions_dir
        self.predictions_dir = str(directory)
        try:
            yield self
        finally:
            self.predictions_dir = own

    # ------------------------------------------------------------------------------------------ optimisation
    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: (backbone | cross-modal | head) x (decay | no decay); frozen parameters left out."""
        return param_groups(self, self.optim)

    def total_steps(self) -> int:
        """Optimiser steps of the whole run, from the data module's known epoch length (or ``max_steps``)."""
        total = int(self.trainer.estimated_stepping_batches)
        if total <= 0 or total == float("inf"):
            raise ValueError(
                "cannot size the learning-rate schedule: the number of training steps is unknown; set "
                "--trainer.max_steps or --trainer.max_epochs"
            )
        return total

    def configure_optimizers(self) -> dict[str, Any]:
        return optimizer_and_schedule(self, self.optim, self.total_steps())
