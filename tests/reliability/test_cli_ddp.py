"""2-process DDP through the real command line (``--trainer.strategy=ddp --trainer.devices=2`` on CPU/gloo),
on 3 training shards: it must finish without a hang, with both ranks stepping equally and rank 0 alone writing
the logs and checkpoints, with base.yaml's shipped callbacks (test_fit_ddp.py runs the same data without them)."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import torch
from reliability_helpers import REPO, cli_fit_args, script_env

pytestmark = pytest.mark.slow


def test_cli_ddp_fit_on_uneven_shards(shapes_snli, tmp_path):
    args = [a for a in cli_fit_args(shapes_snli, tmp_path, epochs=1) if a != "--trainer.devices=1"]
    args += ["--trainer.strategy=ddp", "--trainer.devices=2"]
    # own session, so that a hang kills rank 1 (started by Lightning) along with rank 0
    proc = subprocess.Popen(args, cwd=REPO, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-4000:]
    assert "distributed_backend=gloo" in err and "All distributed processes registered" in err
    versions = sorted(p.name for p in (tmp_path / "shapes_vilt").iterdir())
    assert versions == ["version_0"], f"each rank logged separately: {versions}"
    ckpts = sorted(p.name for p in tmp_path.rglob("*.ckpt"))
    assert "last.ckpt" in ckpts and len(ckpts) == len(set(ckpts)) == 2, ckpts  # best + last, written once
    last = torch.load(next(tmp_path.rglob("last.ckpt")), map_location="cpu", weights_only=False)
    # 72 examples / (2 ranks x batch 8) = 4 steps per rank, the same on both ranks or the run would hang
    assert last["global_step"] == 4
