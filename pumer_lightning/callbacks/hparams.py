"""Hyper-parameters in TensorBoard's HParams tab, next to the run's final metrics."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

#: The main metric of each task (what the experiment YAMLs monitor for the best checkpoint).
MAIN_METRIC: dict[str, str] = {"vqa2": "vqa_score", "nlvr2": "acc", "snli_ve": "acc", "retrieval": "ir_r1"}


class HParamsCallback(pl.Callback):
    """Registers the hyper-parameters (model and data init arguments, nested ones flattened as
    ``reducer/keep_ratio``) with the metric columns of the HParams tab; the values arrive as those metrics are
    logged during the run (Lightning's own hparams logging should be off: ``enable_autolog_hparams: false``).

    Args:
        metrics: metric tags shown as columns; default: the task's main metric on val and test, GFLOPs per
            example, evaluation samples/s and tokens per pass.
    """

    def __init__(self, metrics: list[str] | None = None) -> None:
        self.metrics = metrics
        self._done: set[int] = set()

    def columns(self, pl_module: pl.LightningModule) -> list[str]:
        if self.metrics is not None:
            return list(self.metrics)
        main = MAIN_METRIC.get(getattr(pl_module, "task_name", ""), "acc")
        return [
            f"val/{main}",
            f"test/{main}",
            "val/gflops_per_example",
            "val/tokens/per_pass",
            "throughput/val_samples_per_sec",
            "test/gflops_per_example",
            "throughput/test_samples_per_sec",
        ]

    @rank_zero_only
    def _register(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params: dict[str, Any] = {"model_class": type(pl_module).__name__, **dict(pl_module.hparams)}
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and getattr(dm, "hparams", None):
            params.update({f"data/{k}": v for k, v in dict(dm.hparams).items()})
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and id(logger) not in self._done:
                logger.log_hyperparams(params, {name: float("nan") for name in self.columns(pl_module)})
                self._done.add(id(logger))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._register(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._register(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._register(trainer, pl_module)
