"""`TaskCheckpoint`: ModelCheckpoint that monitors the task's main validation metric unless told otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint

from .hparams import MAIN_METRIC


class TaskCheckpoint(ModelCheckpoint):
    """Keeps the best checkpoint by ``val/<main metric>`` of the task (``val/acc`` for NLVR2 and SNLI-VE,
    ``val/vqa_score`` for VQAv2, ``val/ir_r1`` for retrieval, as PuMer selects), plus ``last.ckpt``.

    Args:
        monitor: metric to monitor; None picks the task's main metric at setup.
        mode: ``max`` (all main metrics are higher-is-better).
        save_last: also keep the latest checkpoint.
        filename: checkpoint file name pattern.
        **kwargs: other `ModelCheckpoint` arguments.
    """

    def __init__(
        self,
        monitor: str | None = None,
        mode: str = "max",
        save_last: bool = True,
        filename: str = "best-{epoch:02d}-{step:06d}",
        **kwargs: Any,
    ) -> None:
        super().__init__(monitor=monitor, mode=mode, save_last=save_last, filename=filename, **kwargs)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.monitor is None:
            task = getattr(pl_module, "task_name", "")
            if task not in MAIN_METRIC:
                raise ValueError(f"TaskCheckpoint: no main metric for task {task!r}; pass monitor=")
            self.monitor = f"val/{MAIN_METRIC[task]}"
        super().setup(trainer, pl_module, stage)


class PreemptionCheckpoint(OnExceptionCheckpoint):
    """Saves ``interrupted.ckpt`` when a run stops on an exception or SIGTERM (a preempted or cancelled job), in
    the run's checkpoint directory unless ``dirpath`` is given; ``--ckpt_path=last`` resumes from it. The file
    is removed when the run ends normally.

    Args:
        dirpath: where to save; default ``<log_dir>/checkpoints`` (next to TaskCheckpoint's files).
        filename: file name without the extension.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "interrupted") -> None:
        super().__init__(dirpath if dirpath is not None else ".", filename)
        self._resolve = dirpath is None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._resolve:
            self.dirpath = str(Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints")

    def on_exception(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        # a run that stops before its first optimiser step (a config, data or checkpoint error found while
        # setting up) has nothing to preserve: writing a checkpoint would only make `--ckpt_path last` resume it
        if trainer.global_step == 0:
            return
        super().on_exception(trainer, *args, **kwargs)
