"""Config and checkpoint errors through the real command line: ``python -m pumer_lightning fit`` in a
subprocess stops at once (non-zero exit, no training step, no checkpoint) with a message naming the field,
flag or file. The underlying checks have unit tests in tests/reduce, tests/models and tests/data; these make
sure that the CLI surfaces them instead of failing later or hiding them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from reliability_helpers import REPO, cli_fit_args, script_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoints(shapes_snli, tmp_path_factory) -> dict[str, Path]:
    """Converted vilt_tiny checkpoints: one that fits the shapes tokenizer, one with broken keys, one whose
    text embedding was made for a 1000-word vocabulary."""
    from pumer_lightning.data.collate import load_tokenizer
    from pumer_lightning.models import build_backbone
    from pumer_lightning.models.checkpoint import save_checkpoint

    out = tmp_path_factory.mktemp("ckpts")
    vocab = len(load_tokenizer(shapes_snli[1]))
    good = save_checkpoint(out / "good.pt", build_backbone("vilt_tiny", vocab_size=vocab), preset="vilt_tiny")
    blob = torch.load(good, map_location="cpu", weights_only=False)
    state = blob["state_dict"]
    dropped = sorted(k for k in state if k.endswith("pooler.dense.bias"))
    assert dropped, "expected a pooler bias in the ViLT state dict"
    for key in dropped:
        del state[key]
    state[next(iter(state)).split(".")[0] + ".extra_adapter.weight"] = torch.zeros(2)
    torch.save(blob, out / "broken_keys.pt")
    wide = save_checkpoint(
        out / "vocab1000.pt", build_backbone("vilt_tiny", vocab_size=1000), preset="vilt_tiny"
    )
    return {"good": good, "broken_keys": out / "broken_keys.pt", "vocab1000": wide, "dropped": dropped}


def _fit(shapes, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [*cli_fit_args(shapes, out), *overrides]
    proc = subprocess.run(args, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0, f"the run should have stopped:\n{proc.stderr[-2000:]}"
    assert not list(out.rglob("*.ckpt")), "a checkpoint was written: training started before the error"
    return proc


CASES = {
    "keep_ratio": (
        ["--model.reducer.keep_ratio=1.5"],
        [r"--model.reducer.keep_ratio must be in (0, 1], got 1.5"],
    ),
    "merge_ratio": (
        ["--model.reducer.merge_ratio=0.9"],
        ["--model.reducer.merge_ratio must be in [0, 0.5], got 0.9"],
    ),
    "layer_depth": (
        ["--model.reducer.layers=[1,7]"],
        [
            "--model.reducer.layers: block index [7] out of range for vilt_tiny backbone with 4 reducible blocks"
        ],
    ),
    "importance": (
        ["--model.reducer.importance=attention"],
        ["reducer.importance", "'text', 'cls', 'random'"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_reducer_setting_stops_at_once(case, shapes_snli, tmp_path):
    overrides, messages = CASES[case]
    err = _fit(shapes_snli, tmp_path, *overrides).stderr
    for message in messages:
        assert message in err, f"{case}: expected {message!r} in stderr:\n{err[-2000:]}"


def test_data_dir_without_shards_stops_at_once(shapes_snli, tmp_path):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    err = _fit(shapes_snli, tmp_path / "out", f"--data.data_dir={empty}").stderr
    assert f"split directory {empty / 'train'} does not exist" in err


def test_checkpoint_with_missing_and_unexpected_keys_lists_them(shapes_snli, checkpoints, tmp_path):
    err = _fit(shapes_snli, tmp_path, f"--model.backbone.checkpoint={checkpoints['broken_keys']}").stderr
    assert "CheckpointError" in err
    for key in checkpoints["dropped"]:
        assert key.split(".", 1)[-1] in err, f"missing key {key} not named:\n{err[-2000:]}"
    assert "extra_adapter.weight" in err


def test_tokenizer_smaller_than_the_checkpoint_embeddings_uses_the_checkpoint_table(
    shapes_snli, checkpoints, tmp_path
):
    """The shapes tokenizer (tens of words) fits inside a checkpoint whose text embedding has 1000 rows: the
    model keeps the checkpoint's table and trains (a tokenizer larger than the table is the error case)."""
    proc = subprocess.run(
        cli_fit_args(shapes_snli, tmp_path, epochs=1)
        + [f"--model.backbone.checkpoint={checkpoints['vocab1000']}", "--trainer.max_steps=2"],
        cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "size mismatch" not in proc.stderr


def test_good_checkpoint_trains(shapes_snli, checkpoints, tmp_path):
    """The control: the same command with a fitting checkpoint gets through setup into training."""
    args = ["--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
    out = tmp_path
    proc = subprocess.run([*cli_fit_args(shapes_snli, out), f"--model.backbone.checkpoint={checkpoints['good']}",
                           *args], cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(out.rglob("*.ckpt")), "the control run wrote no checkpoint"
