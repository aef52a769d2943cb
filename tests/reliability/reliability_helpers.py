"""Helpers of the reliability tests: running fit_script.py and the CLI as subprocesses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("fit_script.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_cmd(mode: str, shapes: tuple[Path, Path], root: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), mode, "--data-dir", str(shapes[0]), "--tokenizer", str(shapes[1]),
            "--root", str(root), *extra]  # fmt: skip


def script_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", MASTER_ADDR="127.0.0.1")
    env["MASTER_PORT"] = str(free_port())
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run_script(mode: str, shapes, root: Path, *extra: str, timeout: float = 300) -> dict:
    """Run fit_script.py to completion (a hang fails the test at ``timeout``) and return its result JSON."""
    proc = subprocess.run(script_cmd(mode, shapes, root, *extra), env=script_env(), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, f"fit_script {mode} failed:\n{proc.stderr[-4000:]}"
    return json.loads((root / f"{mode}-result.json").read_text())


REPO = Path(__file__).resolve().parents[2]


def cli_fit_args(shapes, out: Path, epochs: int = 1) -> list[str]:
    """``python -m pumer_lightning fit`` on the tiny SNLI-VE shapes world with base.yaml + shapes_vilt.yaml.

    Everything the tests rely on is pinned here (task, model class, reducer, batch sizes), so that edits of the
    demo experiment do not change what the reliability tests run.
    """
    return [
        sys.executable, "-m", "pumer_lightning", "fit",
        "-c", str(REPO / "experiments" / "base.yaml"), "-c", str(REPO / "experiments" / "shapes_vilt.yaml"),
        "--model=pumer_lightning.tasks.SNLIVETask", "--data.task=snli_ve",
        f"--data_root={out}", "--shapes=null",
        "--model.backbone.preset=vilt_tiny", "--model.backbone.checkpoint=null",
        f"--model.backbone.tokenizer={shapes[1]}", f"--data.data_dir={shapes[0]}",
        "--model.reducer.layers=[1,2]", "--model.reducer.keep_ratio=0.7", "--model.reducer.merge_ratio=0.2",
        "--model.reducer.text_merge_ratio=0.2", "--model.reducer.importance=text",
        "--data.batch_size=8", "--data.eval_batch_size=8", "--data.num_workers=0", "--data.max_text_len=16",
        "--data.randaugment=false", f"--trainer.max_epochs={epochs}", "--trainer.accelerator=cpu",
        "--trainer.devices=1", f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
