"""Bad reducer values and unreadable inputs stop the command line at once with one sentence.

* out-of-range reducer values fail right after parsing, naming ``--model.reducer.<field>`` and what was expected
  (the rules are `ReducerSchedule`'s own), with no model built and none of jsonargparse's union-type noise;
* a corrupt or random-bytes ``--ckpt_path``, ``--model.backbone.checkpoint`` or ``models.convert`` input is named
  as unreadable/corrupt;
* an empty tokenizer directory is reported as such, without transformers' hint about sentencepiece.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from reliability_helpers import REPO, cli_fit_args, script_env

from pumer_lightning.cli import PumerCLI
from pumer_lightning.models.checkpoint import CheckpointError, read_checkpoint

BAD_REDUCERS = {
    "keep_ratio=0": ("--model.reducer.keep_ratio=0", "--model.reducer.keep_ratio must be in (0, 1], got 0"),
    "keep_ratio=1.5": ("--model.reducer.keep_ratio=1.5", "--model.reducer.keep_ratio must be in (0, 1], got 1.5"),
    "merge_ratio=0.9": ("--model.reducer.merge_ratio=0.9", "--model.reducer.merge_ratio must be in [0, 0.5], got 0.9"),
    "text_merge_ratio=0.6": (
        "--model.reducer.text_merge_ratio=0.6", "--model.reducer.text_merge_ratio must be in [0, 0.5], got 0.6",
    ),
    "layers=[-1]": ("--model.reducer.layers=[-1]", "--model.reducer.layers: expected non-negative block indices"),
    "layers=[1,7]": (
        "--model.reducer.layers=[1,7]",
        "--model.reducer.layers: block index [7] out of range for vilt_tiny backbone with 4 reducible blocks",
    ),
    "layers=[1,1]": ("--model.reducer.layers=[1,1]", "--model.reducer.layers: duplicate block index in [1, 1]"),
}  # fmt: skip


def _fit_args(shapes, out: Path, *extra: str) -> list[str]:
    return ["fit", *cli_fit_args(shapes, out)[4:], *extra]


@pytest.fixture
def nothing_built(monkeypatch):
    """Fail the test if a backbone gets built (the error must come before instantiation)."""
    import pumer_lightning.models.spec as spec

    def built(*args, **kwargs):
        raise AssertionError("a backbone was built before the bad value was reported")

    monkeypatch.setattr(spec, "build_backbone", built)


@pytest.mark.parametrize("case", list(BAD_REDUCERS))
def test_bad_reducer_value_fails_at_parse_time_naming_the_flag(
    case, shapes_snli, tmp_path, capsys, nothing_built
):
    flag, expected = BAD_REDUCERS[case]
    with pytest.raises(SystemExit) as stopped:
        PumerCLI(args=_fit_args(shapes_snli, tmp_path, flag))
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [line for line in lines if line.startswith("error: ")] and len(lines) == 1, err
    assert expected in lines[0], f"{case}: expected {expected!r}, got {lines[0]!r}"
    assert "ReducerSchedule" not in err and "Given value type" not in err


def test_layers_beyond_a_meter_backbone_name_its_depth(shapes_snli, tmp_path, capsys, nothing_built):
    with pytest.raises(SystemExit):
        PumerCLI(args=_fit_args(shapes_snli, tmp_path, "--model.backbone.preset=meter_tiny",
                                "--model.reducer.layers=[0,3]"))  # fmt: skip
    assert "--model.reducer.layers: block index [3] out of range for meter_tiny backbone with 3" in (
        capsys.readouterr().err
    )


def test_bad_reducer_value_through_the_real_command_line_is_one_line(shapes_snli, tmp_path):
    proc = subprocess.run([*cli_fit_args(shapes_snli, tmp_path), "--model.reducer.merge_ratio=0.9"], cwd=REPO,
                          env=script_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Seed set" not in line]
    assert lines == ["error: --model.reducer.merge_ratio must be in [0, 0.5], got 0.9"], proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------ unreadable files
def _random_bytes(path: Path, n: int = 4096) -> Path:
    path.write_bytes(os.urandom(n))
    return path


def _truncated_lightning_ckpt(path: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(256)}, "global_step": 3}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize(
    "make", [_random_bytes, _truncated_lightning_ckpt], ids=["random_bytes", "truncated"]
)
@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_corrupt_ckpt_path_is_named_before_anything_runs(
    make, subcommand, shapes_snli, tmp_path, nothing_built
):
    bad = make(tmp_path / "model.ckpt")
    args = [subcommand, *cli_fit_args(shapes_snli, tmp_path)[4:], f"--ckpt_path={bad}"]
    with pytest.raises(SystemExit) as stopped:
        PumerCLI(args=args)
    message = str(stopped.value.code)
    assert f"--ckpt_path {bad} is unreadable" in message and "corrupt" in message, message


def test_missing_ckpt_path_is_named(shapes_snli, tmp_path, nothing_built):
    with pytest.raises(SystemExit, match=r"--ckpt_path .*nothing\.ckpt does not exist"):
        PumerCLI(args=_fit_args(shapes_snli, tmp_path, f"--ckpt_path={tmp_path / 'nothing.ckpt'}"))


def test_corrupt_backbone_checkpoint_file_is_named(shapes_snli, tmp_path, nothing_built):
    bad = _random_bytes(tmp_path / "vilt.pt")
    with pytest.raises(SystemExit) as stopped:
        PumerCLI(args=_fit_args(shapes_snli, tmp_path, f"--model.backbone.checkpoint={bad}"))
    message = str(stopped.value.code)
    assert message.startswith("cannot start: unreadable inputs")
    assert f"model.backbone.checkpoint: {bad} is unreadable: the file is corrupt" in message


def test_corrupt_backbone_checkpoint_directory_names_the_weights_file(shapes_snli, tmp_path, nothing_built):
    from pumer_lightning.models import build_backbone
    from pumer_lightning.models.checkpoint import save_checkpoint

    good = save_checkpoint(tmp_path / "vilt", build_backbone("vilt_tiny"), preset="vilt_tiny")
    weights = good / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(SystemExit) as stopped:
        PumerCLI(args=_fit_args(shapes_snli, tmp_path, f"--model.backbone.checkpoint={good}"))
    assert f"{weights} is unreadable: the file is truncated" in str(stopped.value.code)


def test_read_checkpoint_names_a_corrupt_file(tmp_path):
    bad = _random_bytes(tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match=rf"{bad} is unreadable: the file is corrupt"):
        read_checkpoint(bad)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt is unreadable: the file is empty"):
        read_checkpoint(empty)


@pytest.mark.parametrize(
    "make", [_random_bytes, _truncated_lightning_ckpt], ids=["random_bytes", "truncated"]
)
def test_convert_names_a_corrupt_input(make, tmp_path, capsys):
    from pumer_lightning.models.convert import main

    bad = make(tmp_path / "original.ckpt")
    assert main(["vilt", str(bad), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"error: {bad} is unreadable: the file is corrupt" in err, err
    assert "--trust-pickle" not in err, "a damaged file is not a trust question"
    assert not (tmp_path / "out").exists()


def test_empty_tokenizer_directory_is_reported_without_a_sentencepiece_hint(
    shapes_snli, tmp_path, nothing_built
):
    empty = tmp_path / "tokenizer"
    empty.mkdir()
    with pytest.raises(SystemExit) as stopped:
        PumerCLI(args=_fit_args(shapes_snli, tmp_path, f"--model.backbone.tokenizer={empty}"))
    message = str(stopped.value.code)
    assert f"model.backbone.tokenizer {empty} holds no tokenizer files" in message
    assert "You need to have sentencepiece" not in message
