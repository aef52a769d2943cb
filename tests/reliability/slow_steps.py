"""A callback the CLI resume test adds on the command line: slows steps and records the global step."""

from __future__ import annotations

import time
from pathlib import Path

import lightning.pytorch as pl


class SlowSteps(pl.Callback):
    """Sleeps ``sleep`` seconds after every training batch and writes the global step to ``progress``.

    Args:
        progress: file that holds the latest global step.
        sleep: seconds to sleep per batch (so that a signal lands mid-epoch).
    """

    def __init__(self, progress: str, sleep: float = 0.5) -> None:
        self.progress, self.sleep, self.batches = Path(progress), sleep, 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        self.batches += 1
        if trainer.is_global_zero:
            self.progress.write_text(f"{trainer.global_step} {self.batches}")
        time.sleep(self.sleep)
