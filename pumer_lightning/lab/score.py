"""Score a schedule on a split: the one evaluation path of the drivers, through the task's own validation code.

`Scorer.score` runs ``trainer.validate`` of the task module with the schedule swapped in by
``model.backbone.using(schedule)`` on the given batches of a split, and returns the task's main metric
(``val/<metric>``, `pumer_lightning.callbacks.MAIN_METRIC`) with the score, the loss and the type of every
example, read by `ExampleScores` from a forward hook on the task head:

* score (`example_scores`): 1/0 for a right/wrong class (NLVR2, SNLI-VE), the soft score of the arg-max answer
  for VQA; their mean is the task's metric.
* loss (`example_losses`): the term of the training loss of each example.
* type: the example's ``statement_type`` (else ``answer_type``) from its ``meta``, None without one.

One `Scorer` holds one evaluation ``Trainer`` (built on first use, so a run whose figures are all cached builds
nothing) for every model and split it scores.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch

from pumer_lightning.callbacks import MAIN_METRIC
from pumer_lightning.reduce import ReducerSchedule


def example_scores(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The per-example score whose mean is the task's metric: for soft score vectors (VQA, one row per example)
    the score of the arg-max answer; for class ids 1 when the arg-max is right."""
    if labels.dim() == 2:
        return labels.float().gather(1, logits.argmax(dim=-1, keepdim=True)).squeeze(1)
    return (logits.argmax(dim=-1) == labels).float()


def example_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each example's training loss: cross-entropy for class ids; for VQA's soft score vectors, binary
    cross-entropy summed over the answers (`VQATask.task_loss` is its mean over a batch)."""
    if labels.dim() == 2:
        bce = torch.nn.functional.binary_cross_entropy_with_logits(
            logits.float(), labels.float(), reduction="none"
        )
        return bce.sum(dim=-1)
    return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")


def example_types(batch: dict[str, Any]) -> list[str | None]:
    """The ``statement_type`` (else ``answer_type``) of every example of ``batch``, None where there is none."""
    out: list[str | None] = []
    for m in batch.get("meta") or [None] * len(batch["labels"]):
        out.append(m.get("statement_type", m.get("answer_type")) if isinstance(m, dict) else None)
    return out


class ExampleScores(pl.Callback):
    """Collects `example_scores`, `example_losses` and `example_types` of every validation batch from a forward
    hook on ``pl_module.head``."""

    def __init__(self) -> None:
        self.scores: list[float] = []
        self.losses: list[float] = []
        self.types: list[str | None] = []
        self._logits: torch.Tensor | None = None
        self._handle: Any = None

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.scores, self.losses, self.types = [], [], []
        self.close()
        self._handle = pl_module.head.register_forward_hook(self._hook)

    def _hook(self, module: Any, inputs: Any, output: Any) -> None:
        self._logits = output if isinstance(output, torch.Tensor) else None

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        logits, self._logits = self._logits, None
        if logits is None or not isinstance(batch, dict) or "labels" not in batch:
            return
        logits, labels = logits.detach(), batch["labels"]
        self.scores.extend(example_scores(logits, labels).tolist())
        self.losses.extend(example_losses(logits, labels).tolist())
        self.types.extend(example_types(batch))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.close()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class Batches:
    """The first ``n`` batches of a re-iterable source, with a length: Lightning takes it as one dataloader."""

    def __init__(self, source: Callable[[], Iterable[dict[str, Any]]], n: int) -> None:
        self.source, self.n = source, n

    @classmethod
    def of(cls, batches: list[dict[str, Any]]) -> Batches:
        """All of a list of batches (read already, e.g. held in memory for many evaluations)."""
        return cls(lambda: batches, len(batches))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return itertools.islice(iter(self.source()), self.n)

    def __len__(self) -> int:
        return self.n


class SplitData(pl.LightningDataModule):
    """A data module as one validation run sees it: ``split`` is the validation split and ``batches`` its loader;
    every other attribute (task, answer vocabulary, skip counts) is the real one's."""

    def __init__(self, datamodule: Any, split: str, batches: Batches) -> None:
        super().__init__()
        self._datamodule, self._batches = datamodule, batches
        self.val_split, self.test_split, self.predict_split = split, None, None

    def setup(self, stage: str | None = None) -> None:
        """The real data module read its metadata already."""

    def val_dataloader(self) -> Batches:
        return self._batches

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._datamodule, name)


@dataclass
class SplitScores:
    """What `Scorer.score` measured: the task's metric and, in order, every example's score, loss and type."""

    metric: str  #: the logged metric's name (``val/acc``, ``val/vqa_score``)
    value: float  #: its value
    scores: list[float]
    losses: list[float]
    types: list[str | None]


class Scorer:
    """Scores schedules of task modules with one evaluation ``Trainer`` on ``device`` at ``precision``."""

    def __init__(self, device: torch.device, precision: str = "32-true") -> None:
        self.device, self.precision = device, str(precision)
        self.examples = ExampleScores()
        self.evaluations = 0
        self._trainer: pl.Trainer | None = None

    @property
    def trainer(self) -> pl.Trainer:
        if self._trainer is None:
            gpu = self.device.type == "cuda"
            self._trainer = pl.Trainer(
                accelerator="gpu" if gpu else "cpu",
                devices=[self.device.index or 0] if gpu else 1,
                precision=self.precision,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                callbacks=[self.examples],
                num_sanity_val_steps=0,
            )
        return self._trainer

    def score(
        self,
        model: Any,
        datamodule: Any,
        split: str,
        batches: Batches | list[dict[str, Any]],
        schedule: ReducerSchedule | None,
        seed: int = 0,
    ) -> SplitScores:
        """``model`` with ``schedule`` (None: unreduced) on ``batches`` of ``datamodule``'s ``split``; ``seed`` seeds
        the global generator first (random pruning draws its scores from it)."""
        batches = batches if isinstance(batches, Batches) else Batches.of(batches)
        metric = f"val/{MAIN_METRIC[model.task_name]}"
        trainer = self.trainer
        torch.manual_seed(seed)
        try:
            with model.backbone.using(schedule), model.eager_forwards():
                logged = trainer.validate(
                    model, datamodule=SplitData(datamodule, split, batches), verbose=False
                )
        finally:
            self.examples.close()
        self.evaluations += 1
        if not logged or metric not in logged[0]:
            raise RuntimeError(
                f"validation on {split} logged no {metric} (logged: {sorted(logged[0]) if logged else []})"
            )
        ex = self.examples
        return SplitScores(metric, float(logged[0][metric]), list(ex.scores), list(ex.losses), list(ex.types))
