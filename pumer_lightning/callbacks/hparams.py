"""Hyper-parameters in TensorBoard's HParams tab, next to the run's final metrics."""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

#: The main metric of each task (what the experiment YAMLs monitor for the best checkpoint).
MAIN_METRIC: dict[str, str] = {
    "vqa2": "vqa_score",
    "nlvr2": "acc",
    "snli_ve": "acc",
    "retrieval": "ir_r1",
    "pretrain": "itm_acc",
}


def flatten_params(params: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts / dataclasses / namespaces -> ``{"reducer/keep_ratio": 0.7, ...}`` with TensorBoard-safe
    values (numbers, strings, booleans; lists and None as strings; tensors as numbers or strings)."""
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        params = dataclasses.asdict(params)
    elif hasattr(params, "as_dict"):
        params = params.as_dict()
    elif hasattr(params, "__dict__") and not isinstance(params, (dict, str, int, float, bool)):
        params = vars(params)
    out: dict[str, Any] = {}
    for key, value in dict(params).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
            out.update(flatten_params(value, f"{name}/"))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        elif isinstance(value, torch.Tensor) and value.numel() == 1:
            out[name] = value.item()
        else:
            out[name] = str(value)
    return out


class HParamsCallback(pl.Callback):
    """Registers the hyper-parameters (model and data init arguments, nested ones flattened as
    ``reducer/keep_ratio``) with the metric columns of the HParams tab; the values arrive as those metrics are
    logged during the run, so the tab shows each run's final metrics next to its settings. No placeholder
    scalars are written. (Lightning's own hparams logging should be off: ``enable_autolog_hparams: false``.)

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
        from torch.utils.tensorboard.summary import hparams

        flat = flatten_params(params)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and id(logger) not in self._done:
                # the metric values only declare the columns; the real values are the run's own scalars
                exp, ssi, sei = hparams(flat, {name: 0.0 for name in self.columns(pl_module)})
                writer = logger.experiment._get_file_writer()
                for summary in (exp, ssi, sei):
                    writer.add_summary(summary)
                self._done.add(id(logger))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._register(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._register(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._register(trainer, pl_module)
