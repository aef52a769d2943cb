"""Clear single errors from ``fit``, and one fit at a time per run directory.

* a distillation teacher whose recorded architecture differs from the student's preset stops with the checkpoint's
  own message (before: 80-odd lines of tracebacks and jsonargparse's union-type report);
* a fresh fit refused because its run directory holds an earlier run prints the refusal alone (before: first a
  misleading "interrupted by SystemExit at step 0 ... resume with:" report);
* a fit into a run directory that another fit is writing stops naming the directory and the holder (pid, host);
  the lock goes at exit, and a lock left by a killed fit is taken over with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from reliability_helpers import REPO, cli_fit_args, script_env

from pumer_lightning.cli import PumerCLI
from pumer_lightning.run_lock import LOCK_NAME

HERE = Path(__file__).resolve().parent
EXPLICIT = "--trainer.logger.init_args.version=0"


def _args(shapes, out: Path, *extra: str) -> list[str]:
    return ["fit", *cli_fit_args(shapes, out)[4:], "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1", "--trainer.enable_model_summary=false", *extra]  # fmt: skip


def _run_dir(out: Path) -> Path:
    return out / "shapes_vilt" / "version_0"


def _files(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} if root.exists() else {}


# ------------------------------------------------------------------------------------------ the teacher
def test_a_teacher_of_another_architecture_stops_with_its_own_message(shapes_snli, tmp_path):
    donor = PumerCLI(args=_args(shapes_snli, tmp_path / "donor", EXPLICIT))
    blob = torch.load(_run_dir(tmp_path / "donor") / "checkpoints" / "last.ckpt", weights_only=False)
    assert blob["backbone_architecture"]["num_attention_heads"] == donor.model.backbone.num_heads == 2
    blob["backbone_architecture"]["num_attention_heads"] = 4  # as if vilt_tiny had had 4 heads back then
    teacher = tmp_path / "teacher.ckpt"
    torch.save(blob, teacher)
    with pytest.raises(SystemExit) as stopped:
        PumerCLI(args=_args(shapes_snli, tmp_path / "student", f"--model.distill.teacher={teacher}"))
    message = stopped.value.code
    assert isinstance(message, str), f"expected a message, got exit code {message!r}"
    assert message.splitlines() == [
        f"error: --model.distill.teacher {teacher} was saved from another architecture than preset 'vilt_tiny':",
        "  num_attention_heads: checkpoint 4 vs preset 'vilt_tiny' 2",
        "Build it with the preset it was trained with (the preset's definition may have changed since).",
    ]
    assert stopped.value.__suppress_context__, "the message replaces the traceback"
    assert not (tmp_path / "student").exists(), "nothing may have been written"
    # the same checkpoint given to test: Lightning's own loading, the same kind of message
    test_args = ["test", *cli_fit_args(shapes_snli, tmp_path / "tested")[4:], f"--ckpt_path={teacher}"]
    with pytest.raises(SystemExit) as stopped:
        PumerCLI(args=test_args)
    message = str(stopped.value.code)
    assert message.startswith(f"error: Lightning checkpoint {teacher} was saved from another architecture"), (
        message
    )
    assert "num_attention_heads: checkpoint 4 vs --model.backbone.preset vilt_tiny 2" in message


@pytest.mark.slow
def test_a_teacher_of_another_architecture_through_the_command_line(shapes_snli, tmp_path):
    """The same through ``python -m pumer_lightning fit``: exit 1, the message, no traceback or parser report."""
    first = subprocess.run([*cli_fit_args(shapes_snli, tmp_path / "donor"), "--trainer.limit_train_batches=1",
                            "--trainer.limit_val_batches=1"], cwd=REPO, env=script_env(), capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    (last,) = (tmp_path / "donor").rglob("last.ckpt")
    blob = torch.load(last, weights_only=False)
    blob["backbone_architecture"]["hidden_act"] = "relu"
    torch.save(blob, tmp_path / "teacher.ckpt")
    cmd = [
        *cli_fit_args(shapes_snli, tmp_path / "student"),
        f"--model.distill.teacher={tmp_path / 'teacher.ckpt'}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Union subtypes" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "was saved from another architecture" in errors[0], proc.stderr[-3000:]
    assert "hidden_act: checkpoint 'relu' vs preset 'vilt_tiny' 'gelu'" in proc.stderr


# ------------------------------------------------------------------------------------------ the refusal
def test_a_refused_run_directory_prints_the_refusal_alone(shapes_snli, tmp_path, capsys):
    PumerCLI(args=_args(shapes_snli, tmp_path, EXPLICIT))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        PumerCLI(args=_args(shapes_snli, tmp_path, EXPLICIT))
    assert "already holds checkpoints of an earlier run" in str(stopped.value.code)
    err = capsys.readouterr().err
    assert "interrupted by" not in err and "resume with" not in err, err
    assert not (_run_dir(tmp_path) / LOCK_NAME).exists(), "the refused fit released its lock"


# ------------------------------------------------------------------------------------------ the lock
_HOLDER = """
import sys
from pathlib import Path
from pumer_lightning.run_lock import RunDirectoryLock
lock = RunDirectoryLock([Path(sys.argv[1])]).acquire()
print("held", flush=True)
sys.stdin.read()
lock.release()
"""


def _hold(directory: Path) -> subprocess.Popen:
    """Another process holding the run-directory lock of ``directory`` until its stdin closes."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(directory)], cwd=REPO, env=script_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_fit_into_a_run_directory_another_process_holds_is_refused(shapes_snli, tmp_path):
    holder = _hold(_run_dir(tmp_path))
    try:
        lock = json.loads((_run_dir(tmp_path) / LOCK_NAME).read_text())
        assert lock["pid"] == holder.pid and lock["host"] == os.uname().nodename
        before = _files(tmp_path)
        with pytest.raises(SystemExit) as stopped:
            PumerCLI(args=_args(shapes_snli, tmp_path, EXPLICIT))
        message = str(stopped.value.code)
        assert message.startswith(f"error: run directory {_run_dir(tmp_path)} is in use by another fit"), (
            message
        )
        assert f"pid {holder.pid} on host {os.uname().nodename}" in message
        assert _files(tmp_path) == before, "the refused fit wrote into the directory"
    finally:
        holder.communicate("", timeout=60)  # the holder releases and exits
    assert holder.returncode == 0 and not (_run_dir(tmp_path) / LOCK_NAME).exists()
    done = PumerCLI(args=_args(shapes_snli, tmp_path, EXPLICIT))  # free again
    assert done.trainer.global_step == 2 and not (_run_dir(tmp_path) / LOCK_NAME).exists()


def test_the_lock_of_a_killed_fit_is_taken_over_with_a_warning(shapes_snli, tmp_path, caplog):
    holder = _hold(_run_dir(tmp_path))
    holder.send_signal(signal.SIGKILL)  # dies without releasing: its lock file stays behind
    holder.wait(timeout=60)
    holder.stdin.close()
    holder.stdout.close()
    assert json.loads((_run_dir(tmp_path) / LOCK_NAME).read_text())["pid"] == holder.pid
    with caplog.at_level(logging.WARNING, logger="pumer_lightning.run_lock"):
        done = PumerCLI(args=_args(shapes_snli, tmp_path, EXPLICIT))
    assert done.trainer.global_step == 2
    (warning,) = [r.getMessage() for r in caplog.records if "stale lock" in r.getMessage()]
    assert f"pid {holder.pid} on host {os.uname().nodename}" in warning and str(_run_dir(tmp_path)) in warning
    assert not (_run_dir(tmp_path) / LOCK_NAME).exists(), "released at the end of the fit"


@pytest.mark.slow
def test_two_fits_started_at_once_into_one_run_directory(shapes_snli, tmp_path):
    """Two real ``python -m pumer_lightning fit`` processes into one explicit run directory: the one that locks
    first trains, the other stops naming the directory and the holder and writes nothing; the first, stopped by
    SIGTERM afterwards, releases the lock on its way out."""
    env = script_env()
    env["PYTHONPATH"] = f"{HERE}{os.pathsep}{env.get('PYTHONPATH', '')}"
    slow = {
        "class_path": "slow_steps.SlowSteps",
        "init_args": {"progress": str(tmp_path / "progress"), "sleep": 1},
    }
    cmd = [*cli_fit_args(shapes_snli, tmp_path, epochs=100), EXPLICIT, "--trainer.limit_val_batches=1",
           f"--trainer.callbacks+={json.dumps(slow)}"]  # fmt: skip
    first = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        start = time.monotonic()
        while not (tmp_path / "progress").is_file():  # the first fit is training
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() - start < 240, "no training step within 240 s"
            time.sleep(0.2)
        second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert first.poll() is None, "the first fit ended before the second tried"
        first.send_signal(signal.SIGTERM)
        _, first_err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 1, second.stderr[-3000:]
    errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"run directory {_run_dir(tmp_path)} is in use by another fit" in errors[0]
    assert f"pid {first.pid} on host" in errors[0]
    assert first.returncode == 143, first_err[-3000:]
    events = sorted(p.name for p in _run_dir(tmp_path).glob("events.out.tfevents.*"))
    assert len(events) == 1 and f".{first.pid}." in events[0], events  # only the first fit logged
    assert not (_run_dir(tmp_path) / LOCK_NAME).exists(), "the first fit released its lock at exit"


# ------------------------------------------------------------------------------------------ corrupt inputs
def test_random_bytes_that_start_like_a_pickle_are_named_corrupt(tmp_path, capsys):
    """1 in 256 random files starts with 0x80 (a pickle's PROTO opcode); only 0x80 followed by protocol 2-5 is
    taken for a legacy torch.save file (this made test_parse_errors' random-bytes cases fail now and then)."""
    from pumer_lightning.models.checkpoint import unreadable_reason
    from pumer_lightning.models.convert import main as convert_main

    bad = tmp_path / "vilt.ckpt"
    bad.write_bytes(b"\x80\xf3" + bytes(range(256)) * 8)
    assert (
        unreadable_reason(bad)
        == "the file is corrupt or not a checkpoint (neither a PyTorch zip archive nor a pickle)"
    )
    assert convert_main(["vilt", str(bad), str(tmp_path / "out")]) == 1
    assert f"error: {bad} is unreadable: the file is corrupt" in capsys.readouterr().err
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    assert legacy.read_bytes()[:2] == b"\x80\x02" and unreadable_reason(legacy) is None
