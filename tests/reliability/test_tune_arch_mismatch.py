"""One weight loader for every command, and it always checks the architecture a checkpoint recorded.

A preset edited after training (4 attention heads recorded, 2 in the preset) keeps every weight's shape, so a
plain ``load_state_dict`` loads it silently and computes something else. ``make tune --ckpt`` used to run its
whole search on such a checkpoint and write a recommendation; it now stops at once naming the field, as ``test``
and the distillation teacher do (`pumer_lightning.models.checkpoint.load_task_weights`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pumer_test_utils import run_args

from pumer_lightning.cli import PumerCLI
from pumer_lightning.models.checkpoint import CheckpointError, load_task_weights
from pumer_lightning.tune import run

TINY_SEARCH = (
    "--candidates=2", "--min-finalists=2", "--rounds=1", "--final-rounds=1", "--playoff-rounds=1",
    "--generations=0", "--layers=1,2", "--keep=0.7", "--merge=0,0.2", "--text-merge=0", "--device=cpu",
    "--check-split=none",
)  # fmt: skip


@pytest.fixture(scope="module")
def fitted(shapes, tmp_path_factory) -> tuple[list[str], Path]:
    """A ``vilt_tiny`` shapes VQA checkpoint of two training steps, and the arguments that built it."""
    out = tmp_path_factory.mktemp("tune_arch")
    args = run_args("vqa2", "vilt_tiny", shapes, out / "runs", "--trainer.limit_train_batches=2",
                    "--trainer.max_epochs=1", "--trainer.limit_val_batches=1")  # fmt: skip
    cli = PumerCLI(args=["fit", *args])
    return args, Path(cli.trainer.checkpoint_callback.best_model_path)


def edited(ckpt: Path, out: Path, heads: int = 4) -> Path:
    """The checkpoint as if its preset had had ``heads`` attention heads: the same weights, another model."""
    blob = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert blob["backbone_architecture"]["num_attention_heads"] == 2
    blob["backbone_architecture"]["num_attention_heads"] = heads
    path = out / "edited.ckpt"
    torch.save(blob, path)
    return path


def test_make_tune_refuses_a_checkpoint_of_another_architecture(fitted, tmp_path):
    args, ckpt = fitted
    path = edited(ckpt, tmp_path)
    message = (
        rf"error: --ckpt {path} does not fit the model the configuration builds \(preset 'vilt_tiny'\): "
        r"num_attention_heads: checkpoint 4 vs preset 'vilt_tiny' 2"
    )
    with pytest.raises(SystemExit, match=message):
        run(
            [
                *args,
                f"--ckpt={path}",
                *TINY_SEARCH,
                f"--out={tmp_path / 'out'}",
                f"--cache={tmp_path / 'c.jsonl'}",
            ]
        )
    assert not (tmp_path / "out").exists() and not (tmp_path / "c.jsonl").exists()


def test_the_one_loader_checks_the_architecture_and_loads_the_rest_strictly(fitted, tmp_path):
    args, ckpt = fitted
    model = PumerCLI(args=args, run=False).model
    with pytest.raises(
        CheckpointError, match=r"(?s)study checkpoint .* another architecture .*heads: checkpoint 4"
    ):
        load_task_weights(model, edited(ckpt, tmp_path), "study checkpoint x", "preset 'vilt_tiny'")
    # a distilled run's checkpoint carries its teacher: skipped; a missing head is named
    blob = torch.load(ckpt, map_location="cpu", weights_only=False)
    state = blob["state_dict"]
    blob["state_dict"] = {**state, "teacher.head.w": torch.zeros(1)}
    torch.save(blob, tmp_path / "distilled.ckpt")
    load_task_weights(model, tmp_path / "distilled.ckpt", "a", "b")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    blob["state_dict"] = {k: v for k, v in state.items() if not k.startswith("head.")}
    torch.save(blob, tmp_path / "headless.ckpt")
    with pytest.raises(
        CheckpointError, match=r"(?s)headless does not match the model:\n  missing \(\d+\):\n    head\."
    ):
        load_task_weights(model, tmp_path / "headless.ckpt", "headless", "b")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty is unreadable: the file is empty \(0 bytes\)"):
        load_task_weights(model, tmp_path / "empty.ckpt", "empty", "b")
