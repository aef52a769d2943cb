"""Helpers shared by tests/tasks, tests/cli and tests/callbacks: a small shapes world and CLI arguments."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "experiments"
BASE = EXPERIMENTS / "base.yaml"
DEMO = EXPERIMENTS / "shapes_vilt.yaml"

TASK_CLASS = {
    "nlvr2": "pumer_lightning.tasks.NLVR2Task",
    "vqa2": "pumer_lightning.tasks.VQATask",
    "snli_ve": "pumer_lightning.tasks.SNLIVETask",
    "retrieval": "pumer_lightning.tasks.RetrievalTask",
}
#: Answers of the shapes world's VQA (``pumer_lightning.data.shapes.VQA_ANSWERS``).
SHAPES_VQA_ANSWERS = 18


def make_shapes(root: Path) -> Path:
    """A small shapes world at 96 px / 16 px patches (the tiny presets' geometry); a no-op when present."""
    from pumer_lightning.data import ensure_shapes

    return ensure_shapes(
        root,
        num_train=96,
        num_val=40,
        num_test=40,
        tasks=("nlvr2", "vqa2", "snli_ve", "retrieval"),
        image_size=96,
        patch_size=16,
        workers=1,
        progress=False,
    )


def shapes_session_root(tmp_path_factory: Any) -> Path:
    """The session's shapes world (same directory from every test package, generated once)."""
    return make_shapes(tmp_path_factory.getbasetemp() / "shapes96")


def run_args(
    task: str,
    preset: str,
    shapes: Path,
    out: Path,
    *extra: str,
    layers: str = "[1,2]",
) -> list[str]:
    """Arguments (after the subcommand) for a tiny run of ``task`` on the shapes world, logging to ``out``."""
    args = [
        "-c", str(BASE), "-c", str(DEMO),
        f"--model={TASK_CLASS[task]}",
        f"--data.task={task}",
        f"--data_root={shapes.parent}",
        f"--model.backbone.preset={preset}",
        f"--model.backbone.tokenizer={shapes / 'tokenizer'}",
        f"--data.data_dir={shapes / task}",
        f"--model.reducer.layers={layers}",
        "--data.batch_size=8",
        "--data.eval_batch_size=8",
        "--data.num_workers=0",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--shapes=null",
    ]  # fmt: skip
    if task == "vqa2":
        args.append(f"--model.init_args.num_answers={SHAPES_VQA_ANSWERS}")
    if task == "retrieval":
        args += ["--model.init_args.num_negatives=3", "--model.init_args.pair_batch=64"]
    return args + list(extra)


EXPECTED_LIGHTNING_WARNINGS = (
    "ignore:LightningCLI's args parameter",  # pytest's own argv is present when a test passes args=
    "ignore:.*LeafSpec.*",
    "ignore:Found .* module\\(s\\) in eval mode",
    "ignore:.*ckpt_path=None.* was called without a model",
    "ignore:.*is set, but there is no last checkpoint",
)


def mark_expected_lightning_warnings(items, folder) -> None:
    """Filter the Lightning warnings these tests trigger on purpose, for the tests under ``folder``."""
    import pytest

    for item in items:
        if str(item.path).startswith(str(folder)):
            for spec in EXPECTED_LIGHTNING_WARNINGS:
                item.add_marker(pytest.mark.filterwarnings(spec))
