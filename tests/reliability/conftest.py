"""Shared pieces of the reliability tests: a small shapes world and a runner for fit_script.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("fit_script.py")


@pytest.fixture(scope="session")
def shapes_snli(tmp_path_factory) -> tuple[Path, Path]:
    """SNLI-VE shapes at the tiny backbones' 96 px: 3 training shards and 3 validation shards (24, 24, 6
    examples), an odd count that does not split evenly over 2 ranks."""
    from pumer_lightning.data.shapes import ShapesSpec, World, generate

    spec = ShapesSpec(
        seed=5, num_train=72, num_val=54, num_test=8, world=World(image_size=96, patch_size=16), shard_size=8,
        tasks=("snli_ve",), types=("shape", "color"),
    )  # fmt: skip
    root = generate(spec, tmp_path_factory.mktemp("shapes") / "shapes", workers=1, progress=False)
    return root / "snli_ve", root / "tokenizer"


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
