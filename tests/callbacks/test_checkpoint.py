"""TaskCheckpoint picks the task's metric; PreemptionCheckpoint saves on an interrupted run and cleans up."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from pumer_test_utils import run_args

from pumer_lightning.callbacks import PreemptionCheckpoint, TaskCheckpoint
from pumer_lightning.cli import PumerCLI

RUN = ("--trainer.max_epochs=1", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=1")


class Crash(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            raise RuntimeError("simulated preemption")


def test_interrupted_run_leaves_a_resumable_checkpoint(shapes, tmp_path):
    cli = PumerCLI(args=run_args("nlvr2", "vilt_tiny", shapes, tmp_path, *RUN), run=False)
    cli.trainer.callbacks.append(Crash())
    with pytest.raises(RuntimeError, match="simulated preemption"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    saved = Path(cli.trainer.log_dir) / "checkpoints" / "interrupted.ckpt"
    assert saved.is_file()
    state = torch.load(saved, map_location="cpu", weights_only=False)
    assert state["global_step"] == 2
    # a run that ends normally removes its interrupted.ckpt and keeps the best checkpoint by the task metric
    done = PumerCLI(args=["fit", *run_args("nlvr2", "vilt_tiny", shapes, tmp_path / "ok", *RUN)])
    ckpts = Path(done.trainer.log_dir) / "checkpoints"
    assert not (ckpts / "interrupted.ckpt").exists()
    task_ckpt = next(cb for cb in done.trainer.callbacks if isinstance(cb, TaskCheckpoint))
    assert task_ckpt.monitor == "val/acc" and Path(task_ckpt.best_model_path).is_file()
    assert any(isinstance(cb, PreemptionCheckpoint) for cb in done.trainer.callbacks)
