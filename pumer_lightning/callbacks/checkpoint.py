"""Checkpoint callbacks and the rules that find what a run should resume from.

* `TaskCheckpoint`: ModelCheckpoint that monitors the task's main validation metric unless told otherwise, and
  whose ``last.ckpt`` always holds the latest saved state (Lightning 2.6 refreshes ``last`` only when it also writes
  a top-k checkpoint).
* `PreemptionCheckpoint`: ``interrupted.ckpt`` when a fit stops on SIGTERM or an exception.
* `resolve_resume`, `earlier_checkpoints`, `interruption_report`: what ``fit --ckpt_path=last`` resumes, what a
  fresh fit must not overwrite, and what to tell the user when a run is interrupted.
* `run_directories`: what a fit writes (locked by `pumer_lightning.run_lock.RunDirectoryLock`).
"""

from __future__ import annotations

import errno as errno_codes
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .hparams import MAIN_METRIC

#: Exit status of a run stopped by SIGTERM (128 + 15, what a shell reports for a process killed by it).
SIGTERM_EXIT_CODE = 143


class CheckpointWriteError(RuntimeError):
    """A checkpoint file could not be written (disk full, permissions, ...); the message names the file."""

    def __init__(self, path: str | os.PathLike, cause: OSError) -> None:
        self.path = str(path)
        self.errno = cause.errno
        reason = cause.strerror or str(cause) or type(cause).__name__
        hint = "; free some space and resume the run" if cause.errno == errno_codes.ENOSPC else ""
        super().__init__(f"could not write checkpoint {self.path}: {reason}{hint}")


def write_checkpoint(trainer: pl.Trainer, path: str | os.PathLike, weights_only: bool = False) -> None:
    """``trainer.save_checkpoint`` whose failures name the file (`CheckpointWriteError`)."""
    try:
        trainer.save_checkpoint(path, weights_only)
    except OSError as err:
        raise CheckpointWriteError(path, err) from err


class TaskCheckpoint(ModelCheckpoint):
    """Keeps the best checkpoint by ``val/<main metric>`` of the task (``val/acc`` for NLVR2 and SNLI-VE,
    ``val/vqa_score`` for VQAv2, ``val/ir_r1`` for retrieval, as PuMer selects), plus ``last.ckpt``.

    ``last.ckpt`` holds the latest saved state: it is rewritten at every validation (whether or not the metric
    improved) and when training ends, so continuing from it never repeats work that finished before those points.
    (Lightning's own ModelCheckpoint refreshes ``last`` only together with a top-k checkpoint.) The state at a
    SIGTERM or crash between two validations is `PreemptionCheckpoint`'s ``interrupted.ckpt``.

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
        self._last_written_step: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.monitor is None:
            task = getattr(pl_module, "task_name", "")
            if task not in MAIN_METRIC:
                raise ValueError(f"TaskCheckpoint: no main metric for task {task!r}; pass monitor=")
            self.monitor = f"val/{MAIN_METRIC[task]}"
        with warnings.catch_warnings():
            if (
                trainer.ckpt_path
            ):  # a resumed run continues in its own directory: its files are expected there
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        try:
            super()._save_checkpoint(trainer, filepath)
        except OSError as err:
            raise CheckpointWriteError(filepath, err) from err

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_written_step = trainer.global_step

    def _refresh_last(self, trainer: pl.Trainer) -> None:
        """Write ``last`` at this step unless it already holds it."""
        if (
            not self.save_last
            or trainer.fast_dev_run
            or trainer.sanity_checking
            or trainer.state.fn != TrainerFn.FITTING
            or self._last_written_step == trainer.global_step
        ):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._refresh_last(trainer)


class PreemptionCheckpoint(Checkpoint):
    """Saves ``interrupted.ckpt`` when a fit stops on an exception or SIGTERM (a preempted or cancelled job), in
    the run's checkpoint directory unless ``dirpath`` is given. ``fit --ckpt_path=last`` resumes the newer of it
    and ``last.ckpt``, in the same run directory; the file is removed when the fit ends normally.

    Unlike Lightning's ``OnExceptionCheckpoint`` (which it replaces), its presence never turns a plain ``fit``
    into an implicit resume: a run resumes only when told to with ``--ckpt_path``.

    Args:
        dirpath: where to save; default ``<log_dir>/checkpoints`` (next to TaskCheckpoint's files).
        filename: file name without the extension.
    """

    FILE_EXTENSION = ".ckpt"

    def __init__(self, dirpath: str | None = None, filename: str = "interrupted") -> None:
        super().__init__()
        if not filename:
            raise ValueError("PreemptionCheckpoint: filename cannot be empty")
        self.dirpath = dirpath
        self.filename = filename
        self._fitting = False
        self.saved_path: str | None = None
        self.saved_step: int | None = None
        self.save_error: str | None = None

    @property
    def ckpt_path(self) -> str:
        return os.path.join(
            self.dirpath if self.dirpath is not None else ".", self.filename + self.FILE_EXTENSION
        )

    def default_path(self, run_checkpoint_dir: str | os.PathLike) -> Path:
        """Where it saves for a run whose checkpoint directory is ``run_checkpoint_dir`` (its own ``dirpath`` wins)."""
        base = Path(self.dirpath) if self.dirpath is not None else Path(run_checkpoint_dir)
        return base / (self.filename + self.FILE_EXTENSION)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._fitting = stage == "fit"
        if self._fitting and self.dirpath is None:
            self.dirpath = str(Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints")

    def on_exception(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        # only a fit has training state to keep; a run that stops before its first optimiser step (a config, data or
        # checkpoint error found while setting up) has nothing to preserve
        if not self._fitting or trainer.state.fn != TrainerFn.FITTING or trainer.global_step == 0:
            return
        try:
            write_checkpoint(trainer, self.ckpt_path)
        except CheckpointWriteError as err:  # e.g. the disk is full: report it with the original error, once
            self.save_error = str(err)
            return
        self.saved_path, self.saved_step = self.ckpt_path, trainer.global_step

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # the fit ended normally: the interruption it may have resumed from is done with
        if self._fitting and stage == "fit" and self.dirpath is not None:
            trainer.strategy.remove_checkpoint(self.ckpt_path)


# ---------------------------------------------------------------------------------------------- resuming
def _logger_root(trainer: pl.Trainer) -> tuple[Path, Any] | None:
    """``(save_dir/name, explicit version or None)`` of the first logger, as ModelCheckpoint resolves it."""
    if not trainer.loggers:
        return None
    logger = trainer.loggers[0]
    save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
    version = getattr(logger, "_version", None)
    return Path(save_dir) / str(logger.name), version


def _version_dir(root: Path, version: Any) -> Path:
    return root / (version if isinstance(version, str) else f"version_{version}")


def _run_checkpoint_dirs(trainer: pl.Trainer) -> list[Path]:
    """The default checkpoint directories a fit of this trainer could resume from: every earlier version of its
    logger (or the one it names explicitly), or ``default_root_dir/checkpoints`` without a logger."""
    found = _logger_root(trainer)
    if found is None:
        return [Path(trainer.default_root_dir) / "checkpoints"]
    root, version = found
    if version is not None:
        return [_version_dir(root, version) / "checkpoints"]
    if not root.is_dir():
        return []
    return sorted(p / "checkpoints" for p in root.iterdir() if (p / "checkpoints").is_dir())


def _last_files(callback: ModelCheckpoint, directory: Path) -> list[Path]:
    pattern = re.compile(rf"^{re.escape(callback.CHECKPOINT_NAME_LAST)}(-v\d+)?$")
    if not directory.is_dir():
        return []
    return [p for p in directory.iterdir() if p.suffix == callback.FILE_EXTENSION and pattern.match(p.stem)]


def resume_candidates(trainer: pl.Trainer) -> list[Path]:
    """Every file ``fit --ckpt_path=last`` may resume: the ``interrupted.ckpt`` of `PreemptionCheckpoint` (and of
    Lightning's ``OnExceptionCheckpoint``) and the ``last.ckpt`` of each ModelCheckpoint, in their own
    directories or in the run directories of the trainer's logger (`_run_checkpoint_dirs`)."""
    run_dirs = _run_checkpoint_dirs(trainer)
    out: set[Path] = set()
    for cb in trainer.callbacks:
        if isinstance(cb, PreemptionCheckpoint):
            dirs = [Path(cb.dirpath)] if cb.dirpath is not None else run_dirs
            out |= {cb.default_path(d) for d in dirs}
        elif isinstance(cb, OnExceptionCheckpoint):
            out.add(Path(cb.ckpt_path))
        elif isinstance(cb, ModelCheckpoint):
            dirs = [Path(cb.dirpath)] if cb.dirpath is not None else run_dirs
            for d in dirs:
                out |= set(_last_files(cb, d))
    return sorted(p for p in out if p.is_file())


def _searched(trainer: pl.Trainer) -> str:
    found = _logger_root(trainer)
    if found is None:
        return str(Path(trainer.default_root_dir) / "checkpoints")
    root, version = found
    return (
        str(_version_dir(root, version) / "checkpoints") if version is not None else f"{root}/*/checkpoints"
    )


def resolve_resume(
    trainer: pl.Trainer, ckpt_path: str | os.PathLike | None, continue_run: bool = True
) -> str | None:
    """The file a fit resumes from, with its logger pointed at that file's run directory (``continue_run``).

    ``"last"`` becomes the newest of `resume_candidates` (a SIGTERM's ``interrupted.ckpt`` or a ``last.ckpt``); when
    there is none this raises ``SystemExit`` with a message instead of silently starting over. ``"auto"`` (for job
    scripts that are started again after a preemption) is ``"last"`` when there is something to resume and a new
    run otherwise, saying which on stderr. A file inside
    ``<save_dir>/<name>/<version>/checkpoints`` makes the run continue in that version directory (TensorBoard events,
    checkpoints and the best-checkpoint bookkeeping stay together). Other values pass through unchanged.
    """
    if ckpt_path is None:
        return None
    if str(ckpt_path) == "auto":
        if not resume_candidates(trainer):
            if trainer.is_global_zero:
                print(
                    f"--ckpt_path=auto: nothing to resume in {_searched(trainer)}; starting a new run",
                    file=sys.stderr,
                )
            return None
        ckpt_path = "last"
    if str(ckpt_path) == "last":
        candidates = resume_candidates(trainer)
        if not candidates:
            raise SystemExit(
                f"error: --ckpt_path=last: no checkpoint to resume (looked for interrupted.ckpt and last.ckpt in "
                f"{_searched(trainer)}); a run saves interrupted.ckpt when SIGTERM stops it and last.ckpt at every "
                "validation. Start a new run without --ckpt_path, or pass the checkpoint file."
            )
        path = max(candidates, key=lambda p: p.stat().st_mtime_ns)
        if trainer.is_global_zero:
            print(f"--ckpt_path=last: {'resuming' if continue_run else 'loading'} {path}", file=sys.stderr)
    elif str(ckpt_path) in ("best", "hpc") or "://" in str(ckpt_path):
        return str(ckpt_path)
    else:
        path = Path(ckpt_path)
    if continue_run:
        _continue_in_run_dir(trainer, path)
    return str(path)


def _continue_in_run_dir(trainer: pl.Trainer, path: Path) -> None:
    found = _logger_root(trainer)
    if found is None or found[1] is not None:
        return
    root, _ = found
    try:
        relative = path.resolve().relative_to(root.resolve())
    except (ValueError, OSError):
        return
    if len(relative.parts) == 3 and relative.parts[1] == "checkpoints":
        version = relative.parts[0]
        match = re.fullmatch(r"version_(\d+)", version)
        trainer.loggers[0]._version = int(match.group(1)) if match else version


def earlier_checkpoints(trainer: pl.Trainer) -> list[Path]:
    """Checkpoint files already in the directories a fresh fit of this trainer would write to. Non-empty only
    when the run directory is fixed (an explicit logger version, no logger, or a callback ``dirpath``): a new
    version directory is always empty."""
    found = _logger_root(trainer)
    fixed_run_dir = found is None or found[1] is not None
    dirs: set[Path] = set()
    for cb in trainer.callbacks:
        if isinstance(cb, (ModelCheckpoint, PreemptionCheckpoint)):
            if cb.dirpath is not None:
                dirs.add(Path(cb.dirpath))
            elif fixed_run_dir:
                dirs |= set(_run_checkpoint_dirs(trainer))
        elif isinstance(cb, OnExceptionCheckpoint):
            dirs.add(Path(cb.dirpath))
    return sorted(p for d in dirs if d.is_dir() for p in d.glob("*.ckpt"))


def refuse_to_overwrite(trainer: pl.Trainer) -> None:
    """Stop a fresh fit (no ``--ckpt_path``) whose checkpoint directory holds an earlier run's files: it would
    mix its checkpoints with theirs, or be mistaken for a continuation of that run."""
    earlier = earlier_checkpoints(trainer)
    if earlier:
        where = sorted({str(p.parent) for p in earlier})
        names = ", ".join(p.name for p in earlier[:4]) + (", ..." if len(earlier) > 4 else "")
        raise SystemExit(
            f"error: {' and '.join(where)} already holds checkpoints of an earlier run ({names}); continue that run "
            "with --ckpt_path=last, or start a new run in another directory (drop the explicit "
            "--trainer.logger.init_args.version or checkpoint dirpath, or delete the old checkpoints)"
        )


def interruption_report(trainer: pl.Trainer | None, exception: BaseException) -> tuple[str, str | None]:
    """``(message, file to resume from or None)`` after a fit stopped on ``exception`` (SIGTERM or an error)."""
    what = "SIGTERM" if isinstance(exception, SIGTERMException) else type(exception).__name__
    if trainer is None:
        return f"interrupted by {what} before the trainer was built; rerun the same command", None
    step, epoch = trainer.global_step, trainer.current_epoch
    preemption = [cb for cb in trainer.callbacks if isinstance(cb, PreemptionCheckpoint)]
    saved = next((cb.saved_path for cb in preemption if cb.saved_path), None)
    errors = [cb.save_error for cb in preemption if cb.save_error]
    if saved is not None:
        return f"interrupted by {what} at step {step} (epoch {epoch}); the state is saved in {saved}", saved
    found = _logger_root(trainer)
    known_run_dir = found is None or found[1] is not None  # a run whose directory was chosen (set up) already
    earlier = resume_candidates(trainer) if known_run_dir else []
    newest = max(earlier, key=lambda p: p.stat().st_mtime_ns) if earlier else None
    why = f" ({'; '.join(errors)})" if errors else ""
    if newest is not None:
        return (
            f"interrupted by {what} at step {step} (epoch {epoch}); no checkpoint was written at the interruption"
            f"{why}; the newest saved state is {newest}",
            str(newest),
        )
    if step == 0:
        return (
            f"interrupted by {what} before the first training step; nothing to resume: rerun the same command",
            None,
        )
    return f"interrupted by {what} at step {step}; no checkpoint was saved{why}: rerun the same command", None


def run_directories(trainer: pl.Trainer) -> list[Path]:
    """The directories a fit of ``trainer`` writes: its run (log) directory, and the checkpoint directories that
    callbacks name explicitly. Reading the logger's directory fixes its version number."""
    logger = trainer.loggers[0] if trainer.loggers else None
    if logger is None:
        run_dir = trainer.default_root_dir
    else:
        run_dir = getattr(logger, "log_dir", None) or logger.save_dir or trainer.default_root_dir
    dirs = [Path(run_dir)]
    for cb in trainer.callbacks:
        if isinstance(cb, (ModelCheckpoint, PreemptionCheckpoint)) and cb.dirpath is not None:
            dirs.append(Path(cb.dirpath))
    resolved = sorted({d.resolve() for d in dirs}, key=lambda p: len(p.parts))
    return [d for i, d in enumerate(resolved) if not any(d.is_relative_to(o) for o in resolved[:i])]
