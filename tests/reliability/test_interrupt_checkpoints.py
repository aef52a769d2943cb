"""What the checkpoint files hold and which one a run continues from.

* ``last.ckpt`` holds the latest saved state, also when the monitored metric stopped improving and when training
  ends between two validations (Lightning 2.6 rewrites ``last`` only together with a top-k checkpoint).
* ``fit --ckpt_path=last`` with nothing to resume stops with a message instead of silently starting over.
* a fresh ``fit`` into a run directory that already holds an earlier run's checkpoints is refused.
* a checkpoint that cannot be written (disk full) ends the run with one message naming the file.
"""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from reliability_helpers import REPO, cli_fit_args, script_env
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pumer_lightning.callbacks import PreemptionCheckpoint, TaskCheckpoint
from pumer_lightning.cli import PumerCLI

HERE = Path(__file__).resolve().parent


class Declining(pl.LightningModule):
    """A linear model whose logged ``val/score`` only gets worse after the first validation."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.validations = 0

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/score", 1.0 / (1 + self.validations))

    def on_validation_epoch_end(self) -> None:
        self.validations += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader(n: int) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(n, 4)), batch_size=1)


def _fit(tmp_path: Path, **trainer_kwargs) -> tuple[pl.Trainer, Path]:
    ckpt = TaskCheckpoint(monitor="val/score", dirpath=tmp_path / "checkpoints")
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[ckpt, PreemptionCheckpoint(dirpath=str(tmp_path / "checkpoints"))],
        default_root_dir=tmp_path, **trainer_kwargs,
    )  # fmt: skip
    trainer.fit(Declining(), _loader(3), _loader(1))
    return trainer, tmp_path / "checkpoints" / "last.ckpt"


def _step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def test_last_ckpt_holds_the_final_step_when_the_metric_stopped_improving(tmp_path):
    trainer, last = _fit(tmp_path, max_epochs=4)
    assert trainer.global_step == 12
    assert _step(last) == 12, "last.ckpt must be the latest state, not the best one's step"
    best = trainer.checkpoint_callback.best_model_path
    assert _step(Path(best)) == 3  # the best checkpoint is still the first validation's


def test_last_ckpt_holds_the_final_step_when_training_ends_between_validations(tmp_path):
    trainer, last = _fit(tmp_path, max_steps=7, max_epochs=10)
    assert trainer.global_step == 7
    assert _step(last) == 7


def test_last_ckpt_follows_mid_epoch_validation(tmp_path):
    trainer, last = _fit(tmp_path, max_epochs=2, val_check_interval=2)
    assert _step(last) == trainer.global_step == 6
    assert not (tmp_path / "checkpoints" / "interrupted.ckpt").exists()


# ------------------------------------------------------------------------------------------ through the CLI
def _args(shapes, out: Path, *extra: str) -> list[str]:
    return ["fit", *cli_fit_args(shapes, out)[4:], "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1", "--trainer.enable_model_summary=false", *extra]  # fmt: skip


def test_ckpt_path_last_with_nothing_to_resume_fails_loudly(shapes_snli, tmp_path):
    with pytest.raises(SystemExit) as stopped:
        PumerCLI(args=_args(shapes_snli, tmp_path, "--ckpt_path=last"))
    message = str(stopped.value.code)
    assert "--ckpt_path=last: no checkpoint to resume" in message and str(tmp_path / "shapes_vilt") in message
    assert not list(tmp_path.rglob("*.ckpt")), "nothing may have been trained"


def test_ckpt_path_auto_starts_a_new_run_then_resumes_it(shapes_snli, tmp_path, capsys):
    """What a job script that is started again after each preemption passes (docs/scaling.md)."""
    first = PumerCLI(args=_args(shapes_snli, tmp_path, "--ckpt_path=auto"))
    assert first.trainer.global_step == 2 and "nothing to resume" in capsys.readouterr().err
    again = PumerCLI(args=_args(shapes_snli, tmp_path, "--ckpt_path=auto", "--trainer.max_epochs=2"))
    assert again.trainer.global_step == 4 and again.trainer.log_dir == first.trainer.log_dir
    assert "--ckpt_path=last: resuming" in capsys.readouterr().err


def test_fresh_fit_into_an_existing_run_directory_is_refused(shapes_snli, tmp_path):
    """An explicit run directory (logger version) that holds an earlier run: the new fit neither resumes it
    silently nor mixes its checkpoints with the old ones."""
    explicit = "--trainer.logger.init_args.version=0"
    first = PumerCLI(args=_args(shapes_snli, tmp_path, explicit))
    assert first.trainer.global_step == 2
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.ckpt")}
    with pytest.raises(SystemExit) as stopped:
        PumerCLI(args=_args(shapes_snli, tmp_path, explicit, "--model.reducer.keep_ratio=0.5"))
    message = str(stopped.value.code)
    assert "already holds checkpoints of an earlier run" in message and "--ckpt_path=last" in message
    assert str(tmp_path / "shapes_vilt" / "version_0" / "checkpoints") in message
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.ckpt")} == before, (
        "the earlier run was touched"
    )
    # continuing it on purpose works, in the same directory
    resumed = PumerCLI(
        args=_args(shapes_snli, tmp_path, explicit, "--ckpt_path=last", "--trainer.max_epochs=2")
    )
    assert resumed.trainer.global_step == 4
    assert Path(resumed.trainer.log_dir) == tmp_path / "shapes_vilt" / "version_0"


class FullDisk(pl.Callback):
    """Every checkpoint write fails as on a full disk (ENOSPC from the write)."""

    def setup(self, trainer, pl_module, stage) -> None:
        def no_space(checkpoint, path, storage_options=None):
            raise OSError(errno.ENOSPC, "No space left on device")

        trainer.strategy.checkpoint_io.save_checkpoint = no_space


def _full_disk_callbacks() -> str:
    return '--trainer.callbacks=[{"class_path": "pumer_lightning.callbacks.TaskCheckpoint"}, ' \
        '{"class_path": "pumer_lightning.callbacks.PreemptionCheckpoint"}, ' \
        '{"class_path": "test_interrupt_checkpoints.FullDisk"}]'  # fmt: skip


def test_disk_full_ends_with_one_message_naming_the_file(shapes_snli, tmp_path):
    with pytest.raises(SystemExit) as stopped:
        PumerCLI(args=_args(shapes_snli, tmp_path, _full_disk_callbacks()))
    message = stopped.value.code
    assert isinstance(message, str), f"expected a message, got exit code {message!r}"
    assert message.startswith("error: could not write checkpoint ") and "No space left on device" in message
    named = message.split("could not write checkpoint ", 1)[1].split(":", 1)[0]
    assert Path(named).parent == tmp_path / "shapes_vilt" / "version_0" / "checkpoints", message
    assert stopped.value.__suppress_context__, "the message replaces the traceback"


@pytest.mark.slow
def test_disk_full_subprocess_prints_no_traceback(shapes_snli, tmp_path):
    """The same through ``python -m pumer_lightning``: exit 1, one ``error:`` line naming the file, no traceback
    (before: the save's traceback, then the on-exception checkpoint's, "During handling of the above ...")."""
    env = script_env()
    env["PYTHONPATH"] = f"{HERE}:{env.get('PYTHONPATH', '')}"
    cmd = [*cli_fit_args(shapes_snli, tmp_path), "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
           _full_disk_callbacks()]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "During handling" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "could not write checkpoint" in errors[0] and ".ckpt" in errors[0], errors
