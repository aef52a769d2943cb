"""`pumer_lightning.command`: a dataclass's fields become a verb's flags, parsed by jsonargparse."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from pumer_lightning.command import Command, flag


@dataclass
class Sizes:
    """sizes of the toy (a help section of its own)"""

    batch_sizes: list[int] = field(default_factory=lambda: [8], metadata=flag("--batch"))
    """batch size(s); several = a sweep"""
    keep_sweep: tuple[float, ...] = field(default=(0.5, 0.9), metadata=flag(nargs="*"))
    """keep ratios (none: no sweep)"""
    rounds: int | None = None
    """timed rounds"""


@dataclass
class Toy:
    """A toy verb.

    Its description, as written."""

    exp: list[str] = field(metadata=flag(positional=True))
    """experiment names"""
    max_drop: float = 1.0
    """accuracy budget in points"""
    mode: Literal["fast", "slow"] = "fast"
    """the mode"""
    task: str | None = field(default=None, metadata=flag(choices=("vqa2", "nlvr2")))
    """the task"""
    train: bool = True
    """the training step"""
    fresh: bool = False
    """ignore the cache"""
    config: list[str] = field(default_factory=list, metadata=flag("-c", "--config", repeat=True))
    """config files, repeatable"""
    seeds: tuple[int, ...] = ()
    """seeds (default: none)"""
    out: Path = Path("results")
    """output directory"""
    sizes: Sizes = field(default_factory=Sizes)
    hidden: int = field(default=3, metadata=flag(cli=False))
    command: str = field(default="", metadata=flag(cli=False))
    argv: list[str] = field(default_factory=list, metadata=flag(cli=False))
    overrides: list[str] = field(default_factory=list, metadata=flag(cli=False))

    def __post_init__(self) -> None:
        if self.max_drop < 0:
            raise ValueError(f"--max-drop must be >= 0, got {self.max_drop}")


def _command(overrides: bool = False) -> Command:
    return Command(Toy, lambda args: args, prog="toy", overrides=overrides)


def test_defaults_are_the_dataclass_defaults_and_the_command_is_recorded():
    toy = _command().parse(["a"])
    assert dataclasses.replace(toy, command="", argv=[]) == Toy(exp=["a"])
    assert toy.command == "toy a" and toy.argv == ["a"] and isinstance(toy.out, Path)


def test_every_form_of_flag():
    argv = ["a", "b", "--max_drop", "0.5", "--mode=slow", "--task", "nlvr2", "--no-train", "--fresh"]
    argv += ["-c", "x.yaml", "--config=y.yaml", "--seeds", "0", "1", "2", "--out", "o"]
    argv += ["--batch", "1", "32", "--keep-sweep", "--rounds", "3"]
    toy = _command().main(argv)
    assert toy.exp == ["a", "b"] and toy.max_drop == 0.5 and toy.mode == "slow" and toy.task == "nlvr2"
    assert not toy.train and toy.fresh and toy.config == ["x.yaml", "y.yaml"]
    assert toy.seeds == (0, 1, 2) and toy.out == Path("o") and toy.hidden == 3
    assert toy.sizes == Sizes(batch_sizes=[1, 32], keep_sweep=(), rounds=3)
    assert toy.command == "toy " + " ".join(argv)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--train=false"], {"train": False}),
        (["--train=true"], {"train": True}),
        (["--fresh=yes"], {"fresh": True}),
        (["--no_train"], {"train": False}),
        (["--max-drop=-1e-9", "--max-drop", "2"], {"max_drop": 2.0}),  # the last occurrence wins
        (["--seeds", "-1", "3"], {"seeds": (-1, 3)}),  # a negative number is a value
    ],
)
def test_switch_values_underscores_and_negative_numbers(argv, expected):
    toy = _command().parse(["a", *argv])
    assert {key: getattr(toy, key) for key in expected} == expected


def test_overrides_are_the_options_that_are_not_the_verbs_own():
    toy = _command(overrides=True).parse(
        [
            "a",
            "--model.reducer.keep_ratio=0.6",
            "--data_root",
            "/mnt/data",
            "--max-drop",
            "0",
            "--trainer.fast",
        ]
    )
    assert toy.overrides == ["--model.reducer.keep_ratio=0.6", "--data_root", "/mnt/data", "--trainer.fast"]
    assert toy.exp == ["a"] and toy.max_drop == 0.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["a", "--max-drop", "abc"], "argument --max-drop: Expected a <class 'float'>. Got value: abc"),
        (["a", "--max-drop", "-1"], "error: --max-drop must be >= 0, got -1.0"),
        (
            ["a", "--mode", "medium"],
            "argument --mode: Expected a typing.Literal['fast', 'slow']. Got value: medium",
        ),
        (
            ["a", "--task", "gqa"],
            "argument --task: Expected a typing.Literal['vqa2', 'nlvr2']. Got value: gqa",
        ),
        (["a", "--batch", "1", "x"], "argument --batch element 2: Expected a <class 'int'>. Got value: x"),
        (["a", "--rounds", "many"], "argument --rounds: Expected a <class 'int'>. Got value: many"),
        (["a", "--model.x=1"], "unrecognized arguments: --model.x=1"),
        (["a", "--max-dro", "1"], "unrecognized arguments: --max-dro 1"),  # no abbreviations
        ([], "the following arguments are required: EXP"),
        (["a", "--train=maybe"], "argument --train/--no-train: ignored explicit argument 'maybe'"),
    ],
)
def test_bad_values_stop_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        _command().parse(argv)
    err = " ".join(capsys.readouterr().err.split())
    assert stop.value.code == 2 and message in err and err.startswith("usage: toy EXP [EXP ...] [options]")


def test_help_lists_every_flag_with_its_docstring(capsys):
    with pytest.raises(SystemExit) as stop:
        _command().parse(["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "A toy verb. Its description, as written." in text
    for shown in (
        "EXP experiment names (required",
        "--max-drop MAX_DROP accuracy budget in points (type: float, default: 1.0)",
        "--mode {fast,slow} the mode",
        "--task {vqa2,nlvr2} the task",
        "--train, --no-train the training step (type: bool, default: True)",
        "-c CONFIG, --config CONFIG config files, repeatable",
        "--seeds [SEEDS ...] seeds (default: none)",
        "sizes of the toy: --batch BATCH [BATCH ...] batch size(s); several = a sweep",
        "--keep-sweep [KEEP_SWEEP ...] keep ratios (none: no sweep)",
    ):
        assert shown in text, shown
    assert "--hidden" not in text and "--command" not in text and "--overrides" not in text


def test_options_map_every_spelling_to_its_flag():
    options = _command().options()
    assert options["--max_drop"] == options["--max-drop"] == ("--max-drop", 1)
    assert options["--no-train"] == ("--no-train", 0) and options["--no_train"] == ("--no-train", 0)
    assert options["-c"] == ("-c", 1) and options["--batch"] == ("--batch", "+")
    assert "--exp" not in options and "--hidden" not in options


def test_after_a_double_dash_every_argument_is_positional():
    toy = _command(overrides=True).parse(["--fresh", "--", "--b", "-c"])
    assert toy.exp == ["--b", "-c"] and toy.fresh and toy.config == [] and toy.overrides == []
