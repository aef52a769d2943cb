"""Preemption: SIGTERM mid-epoch saves a checkpoint, and ``ckpt_path="last"`` resumes to the same final step.

The run is a real process (fit_script.py) killed with a real SIGTERM while it is inside the first epoch. The
checkpoint comes from Lightning's SIGTERM handling (it raises at the next batch boundary) and an
`OnExceptionCheckpoint` in a fixed directory, which ``"last"`` resolves to when it is the newest checkpoint.
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
import torch
from reliability_helpers import run_script, script_cmd, script_env

pytestmark = pytest.mark.slow

STEPS_PER_EPOCH = 9  # 72 examples, batch 8, one process
EPOCHS = 2


def _wait_for_step(progress, proc, step: int, timeout: float = 240) -> int:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        assert proc.poll() is None, f"the run ended before step {step}:\n{proc.stderr.read()[-3000:]}"
        if progress.is_file() and progress.read_text().strip():
            current = int(progress.read_text())
            if current >= step:
                return current
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout} s")


def test_uninterrupted_run_steps(shapes_snli, tmp_path):
    """The reference the resume test compares with: the same run, never stopped."""
    result = run_script("fit", shapes_snli, tmp_path / "run", "--max-epochs", str(EPOCHS))
    assert result["global_step"] == result["batches_run"] == EPOCHS * STEPS_PER_EPOCH


def test_sigterm_mid_epoch_then_resume_reaches_the_same_step(shapes_snli, tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    cmd = script_cmd("fit", shapes_snli, root, "--max-epochs", str(EPOCHS), "--step-sleep", "0.5")
    proc = subprocess.Popen(
        cmd, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for_step(root / "progress.txt", proc, 3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Received SIGTERM" in err, err[-3000:]
    ckpt_dir = root / "checkpoints"
    names = sorted(p.name for p in ckpt_dir.glob("*.ckpt"))
    assert names == ["preempted.ckpt"], f"expected only the preemption checkpoint mid-epoch 0, found {names}"
    saved = torch.load(ckpt_dir / "preempted.ckpt", map_location="cpu", weights_only=False)
    stopped_at = saved["global_step"]
    assert 3 <= stopped_at < STEPS_PER_EPOCH, f"SIGTERM was meant to land inside epoch 0, step {stopped_at}"
    assert saved["epoch"] == 0
    assert not (root / "fit-result.json").exists(), "the stopped run must not report a finished fit"

    resumed = run_script("fit", shapes_snli, root, "--max-epochs", str(EPOCHS), "--ckpt-path", "last")
    assert resumed["global_step"] == EPOCHS * STEPS_PER_EPOCH
    # it carried on from the stop instead of starting over: only the missing steps were run
    assert resumed["batches_run"] == EPOCHS * STEPS_PER_EPOCH - stopped_at
    assert {"epoch0.ckpt", "epoch1.ckpt", "last.ckpt"} <= set(resumed["checkpoints"])
    # the resumed run's checkpoint carries on from the stop: same final step as a run never interrupted
    final = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == EPOCHS * STEPS_PER_EPOCH and final["epoch"] == EPOCHS - 1
