"""SIGTERM at a random step, then the documented resume: every global step and every example of an epoch once.

``python -m pumer_lightning fit`` stopped by SIGTERM must exit non-zero (143, as a scheduler expects), say which
file holds the state and the command that resumes it, and ``--ckpt_path=last`` (or the printed command) must
continue that run in its own run directory from the step where it stopped: the global steps of the stopped run
followed by those of the resumed run are those of a run never interrupted. ``make exp`` (``pumer_lightning.exp``)
prints an interruption summary and resumes the same way.

The fast test runs the CLI in this process and sends the signal to itself; the slow ones run real
subprocesses and kill them from outside.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from reliability_helpers import REPO, cli_fit_args, script_env

from pumer_lightning.cli import PumerCLI

HERE = Path(__file__).resolve().parent
STEPS_PER_EPOCH = 9  # the shapes_snli fixture: 72 training examples, batch 8


class RecordSteps(pl.Callback):
    """Appends ``[global_step, epoch, batch_idx, example keys]`` after every training batch to ``record`` (JSON
    lines); sends
    SIGTERM to its own process after global step ``sigterm_at``, or sleeps ``sleep`` s per batch (so that a signal
    from outside lands mid-epoch)."""

    def __init__(self, record: str, sigterm_at: int = 0, sleep: float = 0.0) -> None:
        self.record, self.sigterm_at, self.sleep = Path(record), sigterm_at, sleep

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with self.record.open("a") as f:
            keys = [str(k) for k in batch.get("keys", [])]
            f.write(json.dumps([trainer.global_step, trainer.current_epoch, batch_idx, keys]) + "\n")
        if self.sigterm_at and trainer.global_step == self.sigterm_at:
            if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.SIG_IGN, None):
                raise RuntimeError("no SIGTERM handler installed: refusing to kill the test process")
            os.kill(os.getpid(), signal.SIGTERM)
        if self.sleep:
            time.sleep(self.sleep)


def _steps(record: Path) -> list[list[int]]:
    return [json.loads(line) for line in record.read_text().splitlines()] if record.is_file() else []


def _callbacks(record: Path, sigterm_at: int = 0, sleep: float = 0.0) -> str:
    return "--trainer.callbacks=" + json.dumps([
        {"class_path": "pumer_lightning.callbacks.TaskCheckpoint"},
        {"class_path": "pumer_lightning.callbacks.PreemptionCheckpoint"},
        {"class_path": "test_interrupt_resume.RecordSteps",
         "init_args": {"record": str(record), "sigterm_at": sigterm_at, "sleep": sleep}},
    ])  # fmt: skip


def _env() -> dict[str, str]:
    env = script_env()
    env["PYTHONPATH"] = f"{HERE}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def test_sigterm_in_process_then_ckpt_path_last_runs_every_step_once(shapes_snli, tmp_path, capsys):
    """Fast variant: 2 epochs of 3 batches, SIGTERM after a random step, resume with ``--ckpt_path=last``."""
    epochs, batches = 2, 3
    total = epochs * batches
    stop = random.randint(1, total - 1)
    args = cli_fit_args(shapes_snli, tmp_path, epochs=epochs)[4:] + [
        f"--trainer.limit_train_batches={batches}", "--trainer.limit_val_batches=1",
        "--trainer.enable_model_summary=false",
    ]  # fmt: skip
    first = tmp_path / "first.jsonl"
    with pytest.raises(SystemExit) as stopped:
        PumerCLI(args=["fit", *args, _callbacks(first, sigterm_at=stop)])
    err = capsys.readouterr().err
    assert stopped.value.code == 143, f"SIGTERM after step {stop}: exit code {stopped.value.code}"
    assert f"interrupted by SIGTERM at step {stop}" in err, err[-2000:]
    saved = next(tmp_path.rglob("interrupted.ckpt"))
    assert f"the state is saved in {saved}" in err and f"--ckpt_path={saved}" in err
    assert torch.load(saved, map_location="cpu", weights_only=False)["global_step"] == stop

    second = tmp_path / "second.jsonl"
    resumed = PumerCLI(args=["fit", *args, _callbacks(second), "--ckpt_path=last"])
    run_dir = saved.parent.parent
    assert Path(resumed.trainer.log_dir) == run_dir, (
        "the resumed run must continue in the stopped run's directory"
    )
    assert sorted(p.name for p in run_dir.parent.iterdir()) == [run_dir.name], "a second version directory"
    steps = [s[0] for s in _steps(first) + _steps(second)]
    assert steps == list(range(1, total + 1)), f"SIGTERM after step {stop}: global steps {steps}"
    positions = [tuple(s[1:3]) for s in _steps(first) + _steps(second)]
    assert positions == [(e, b) for e in range(epochs) for b in range(batches)], positions
    # the resumed epoch continues its stream: the two runs together see the batches of the uninterrupted run
    reference = tmp_path / "reference.jsonl"
    PumerCLI(args=["fit", *args, f"--trainer.default_root_dir={tmp_path / 'ref'}",
                   f"--trainer.logger.init_args.save_dir={tmp_path / 'ref'}", _callbacks(reference)])  # fmt: skip
    assert [s[0] for s in _steps(reference)] == list(range(1, total + 1))
    got = [s[3] for s in _steps(first) + _steps(second)]
    assert got == [s[3] for s in _steps(reference)], (
        f"SIGTERM after step {stop}: other examples than uninterrupted"
    )
    assert not saved.exists(), "interrupted.ckpt must go once the resumed run has finished"
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == total


def _stop_at_random_step(cmd: list[str], record: Path, lo: int, hi: int) -> tuple[int, str, int]:
    """Start ``cmd``, SIGTERM it once its record reaches a random step in [lo, hi]; (rc, stderr, target)."""
    target = random.randint(lo, hi)
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        start = time.monotonic()
        while not (_steps(record) and _steps(record)[-1][0] >= target):
            if proc.poll() is not None:
                raise AssertionError(f"the run ended before step {target}:\n{proc.stderr.read()[-3000:]}")
            assert time.monotonic() - start < 300, f"no step {target} within 300 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err, target


@pytest.mark.slow
def test_cli_sigterm_subprocess_then_the_printed_command_matches_an_uninterrupted_run(shapes_snli, tmp_path):
    """A real ``python -m pumer_lightning fit`` process killed from outside at a random step of 2 epochs; the
    command it prints resumes it; the steps equal those of the same run never interrupted."""
    epochs = 2
    total = epochs * STEPS_PER_EPOCH
    reference = tmp_path / "reference.jsonl"
    ref = subprocess.run(
        [*cli_fit_args(shapes_snli, tmp_path / "ref", epochs=epochs), _callbacks(reference)],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert [s[0] for s in _steps(reference)] == list(range(1, total + 1))

    out = tmp_path / "run"
    first = out / "first.jsonl"
    out.mkdir()
    cmd = [*cli_fit_args(shapes_snli, out, epochs=epochs), _callbacks(first, sleep=0.4)]
    rc, err, target = _stop_at_random_step(cmd, first, 2, total - 3)
    assert rc == 143, f"exit code {rc} after SIGTERM at step ~{target}:\n{err[-3000:]}"
    stopped = _steps(first)[-1][0]
    assert f"interrupted by SIGTERM at step {stopped}" in err, err[-3000:]
    resume = [line for line in err.splitlines() if line.startswith("resume with: ")]
    assert resume, err[-3000:]
    command = shlex.split(resume[-1][len("resume with: ") :])
    assert command[:3] == ["python", "-m", "pumer_lightning"]
    # the printed command, with this session's interpreter and the resumed run's own record file
    second = out / "second.jsonl"
    command = [sys.executable, *command[1:]]
    command = [a.replace(str(first), str(second)).replace('"sleep": 0.4', '"sleep": 0.0') for a in command]
    proc = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    both = _steps(first) + _steps(second)
    assert [s[0] for s in both] == [s[0] for s in _steps(reference)], f"stopped at {stopped}: {both}"
    assert [s[1:3] for s in both] == [s[1:3] for s in _steps(reference)]
    # each step trains on the examples of the same step of the uninterrupted run (the stream continues mid-epoch)
    assert [s[3] for s in both] == [s[3] for s in _steps(reference)], f"stopped at {stopped}: other examples"
    versions = list((out / "shapes_vilt").iterdir())
    assert len(versions) == 1, f"the resumed run must continue in the same run directory: {versions}"


@pytest.mark.slow
def test_make_exp_sigterm_prints_a_summary_and_resumes(shapes_snli, tmp_path):
    """``python -m pumer_lightning.exp`` (what ``make exp`` runs) stopped mid-fit: non-zero exit, a summary naming
    the file and the resume command; the ``--ckpt_path`` it prints resumes, tests and summarises."""
    epochs = 1
    out = tmp_path / "run"
    out.mkdir()
    args = cli_fit_args(shapes_snli, out, epochs=epochs)[
        8:
    ]  # after "python -m pumer_lightning fit -c B -c D"
    exp = [sys.executable, "-m", "pumer_lightning.exp", "shapes_vilt", "--timing-batches=1", "--timing-rounds=1",
           "--no-controls", "--full-size=none", *args]  # fmt: skip
    first = out / "first.jsonl"
    rc, err, target = _stop_at_random_step(
        [*exp, _callbacks(first, sleep=0.4)], first, 2, STEPS_PER_EPOCH - 3
    )
    assert rc == 143, f"exit code {rc} after SIGTERM at step ~{target}:\n{err[-3000:]}"
    stopped = _steps(first)[-1][0]
    assert "## make exp shapes_vilt: interrupted" in err, err[-3000:]
    saved = next(out.rglob("interrupted.ckpt"))
    assert f"fit stopped at step {stopped} of {STEPS_PER_EPOCH}" in err and str(saved) in err
    assert "resume with: make exp EXP=shapes_vilt ARGS=" in err and f"--ckpt_path={saved}" in err
    second = out / "second.jsonl"
    proc = subprocess.run([*exp, _callbacks(second), "--ckpt_path=last"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## make exp shapes_vilt: summary" in proc.stdout
    assert [s[0] for s in _steps(first) + _steps(second)] == list(range(1, STEPS_PER_EPOCH + 1))
    summaries = list(out.rglob("summary.md"))
    assert len(summaries) == 1 and "## make exp shapes_vilt: summary" in summaries[0].read_text()
