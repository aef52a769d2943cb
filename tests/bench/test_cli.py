"""The bench's command line is generated from `Options`: every flag it ever had still works, with its default."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pumer_lightning.bench import Options
from pumer_lightning.bench.__main__ import EPILOG, build_parser, parse_args
from pumer_lightning.bench.options import add_option_arguments, flag, options_from_namespace

ROOT = Path(__file__).resolve().parents[2]
EXP = "tiny_vilt_vqa2"

# every flag of the hand-written parser the generated one replaced: the values it takes and the fields it sets
OLD_FLAGS: dict[str, tuple[list[str], dict]] = {
    "--tiny": ([], {"tiny": True}),
    "--batch": (["1", "8", "32"], {"batch_sizes": [1, 8, 32]}),
    "--settings": (["pumer", "random_prune"], {"settings": ["pumer", "random_prune"]}),
    "--keep-sweep": (["0.5", "0.9"], {"keep_sweep": (0.5, 0.9)}),
    "--quick": (
        [],
        {"settings": ["baseline", "pumer"], "keep_sweep": (), "warmup": 0, "rounds": 3, "train_rounds": 3},
    ),
    "--rounds": (["4"], {"rounds": 4}),
    "--budget": (["30"], {"budget_s": 30.0}),
    "--min-rounds": (["2"], {"min_rounds": 2}),
    "--max-rounds": (["9"], {"max_rounds": 9}),
    "--warmup": (["2"], {"warmup": 2}),
    "--no-train": ([], {"train": False}),
    "--train-rounds": (["2"], {"train_rounds": 2}),
    "--train-budget": (["7.5"], {"train_budget_s": 7.5}),
    "--train-min-rounds": (["1"], {"train_min_rounds": 1}),
    "--train-memory": ([], {}),  # the default since the training step was always measured; old commands
    "--reducer-impl": (["compiled"], {"reducer_impl": "compiled"}),
    "--kernel-count": (["all"], {"kernel_count": "all"}),
    "--no-op-count": ([], {"op_count": False}),
    "--min-sample": (["0.1"], {"min_sample_s": 0.1}),
    "--device": (["cpu"], {"device": "cpu"}),
    "--precision": (["bf16-true"], {"precision": "bf16-true"}),
    "--threads": (["2"], {"threads": 2}),
    "--compile": ([], {"compile": True}),
    "--compile-backend": (["eager"], {"compile_backend": "eager"}),
    "--compile-mode": (["reduce-overhead"], {"compile_mode": "reduce-overhead"}),
    "--cuda-graph": ([], {"cuda_graph": True}),
    "--profile": ([], {"profile": True}),
    "--out": (["/tmp/bench-out"], {"out_dir": Path("/tmp/bench-out")}),
    "--name": (["run"], {"name": "run"}),
    "--seed": (["3"], {"seed": 3}),
    "--no-plot": ([], {"plot": False}),
    "-q": ([], {"verbose": False}),
    "--quiet": ([], {"verbose": False}),
}


def _option_strings() -> set[str]:
    return {s for action in build_parser()._actions for s in action.option_strings}


def test_defaults_are_the_dataclass_defaults():
    exps, opts = parse_args(["vilt_nlvr2", "meter_nlvr2"])
    assert exps == ["vilt_nlvr2", "meter_nlvr2"]
    assert opts == Options()


@pytest.mark.parametrize("name", sorted(OLD_FLAGS))
def test_every_old_flag_sets_what_it_set(name):
    values, expected = OLD_FLAGS[name]
    _, opts = parse_args([EXP, name, *values])
    default = Options()
    changed = {
        f.name for f in dataclasses.fields(Options) if getattr(opts, f.name) != getattr(default, f.name)
    }
    assert changed == set(expected)
    for key, value in expected.items():
        assert getattr(opts, key) == value
    assert isinstance(opts.keep_sweep, tuple)


def test_every_field_is_a_flag_with_help_from_its_docstring():
    parser = build_parser()
    by_dest = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(Options):
        if f.name == "command":
            assert f.name not in by_dest  # set by main(), not a flag
            continue
        action = by_dest[f.name]
        assert action.option_strings and action.help, f.name
    assert by_dest["batch_sizes"].help.startswith("batch size(s); several = a sweep")
    assert by_dest["train"].option_strings == ["--no-train"] and by_dest["train"].help.startswith(
        "skip the training"
    )
    assert by_dest["precision"].choices == ["auto", "fp32", "fp16", "bf16", "fp16-true", "bf16-true"]
    assert "(default: 120.0)" in by_dest["budget_s"].help
    assert set(OLD_FLAGS) <= _option_strings()


def test_every_documented_flag_is_accepted():
    """Flags named in docs/bench.md, the --help epilog and scripts/gpu_check.sh are flags of the parser."""
    known = _option_strings() | {"--help"}
    # not a pattern such as --no-<name>, nor the Lightning CLI's dotted --trainer.precision
    flags = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*(?![\w<.-])")
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    not_bench = {"--signal", "--kill-after", "--line-buffered"}  # timeout's and grep's
    documented = set(flags.findall((ROOT / "docs" / "bench.md").read_text())) | set(flags.findall(EPILOG))
    documented |= set(flags.findall(script)) - not_bench
    assert documented and documented <= known, sorted(documented - known)


def test_the_gpu_check_script_commands_parse():
    """The flag combinations scripts/gpu_check.sh passes (its full-size and tiny forms)."""
    common = ["--settings", "pumer", "--keep-sweep", "--out", "/tmp/gpu"]
    quiet = ["--no-op-count", "--kernel-count", "none"]
    for extra in (
        ["--budget", "4", "--train-budget", "4", "--min-rounds", "7", "--max-rounds", "15"],
        ["--tiny", "--rounds", "2", "--train-rounds", "2", "--warmup", "1", "--threads", "1"],
    ):
        argv = ["vilt_nlvr2", "meter_nlvr2", *common, *extra, *quiet, "--batch", "32", "128"]
        _, opts = parse_args(
            [*argv, "--precision", "fp16-true", "--reducer-impl", "auto", "--cuda-graph", "--no-train"]
        )
        assert opts.keep_sweep == () and opts.settings == ["pumer"] and opts.batch_sizes == [32, 128]
        assert opts.cuda_graph and not opts.train and not opts.op_count and opts.kernel_count == "none"
        _, opts = parse_args(
            ["vilt_nlvr2", *common, *extra, "--batch", "32", "--reducer-impl", "eager", "--profile"]
        )
        assert opts.profile and opts.reducer_impl == "eager" and opts.train


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["vilt_nope"], "unknown bench experiment 'vilt_nope'"),
        ([EXP, "--batch", "0"], "--batch must be positive, got 0"),
        ([EXP, "--batch", "x"], "argument --batch: invalid int value: 'x'"),
        ([EXP, "--rounds", "0"], "--rounds must be positive, got 0"),
        ([EXP, "--device", "gpu"], "argument --device: invalid choice: 'gpu'"),
        ([EXP, "--reducer-impl", "fast"], "argument --reducer-impl: invalid choice: 'fast'"),
        ([EXP, "--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
        ([EXP, "--kernel-count", "some"], "argument --kernel-count: invalid choice: 'some'"),
    ],
)
def test_bad_values_are_refused_naming_their_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@dataclass
class _Toy:
    """A dataclass to generate flags from."""

    sizes: tuple[int, ...] = field(default=(1, 2), metadata=flag(nargs="*"))
    """the sizes"""
    fast: bool = True
    """the fast path"""
    mode: str | None = field(default=None, metadata=flag("--kind"))
    """which kind"""
    hidden: int = field(default=0, metadata={"cli": False})
    """not a flag"""


def test_a_new_field_is_a_new_flag():
    import argparse

    parser = argparse.ArgumentParser()
    add_option_arguments(parser, _Toy)
    toy = options_from_namespace(parser.parse_args(["--sizes", "--no-fast", "--kind", "k"]), _Toy)
    assert toy == _Toy(sizes=(), fast=False, mode="k")
    assert options_from_namespace(parser.parse_args([]), _Toy) == _Toy()
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["sizes"] == "the sizes (default: 1 2)" and helps["fast"] == "skip the fast path"
    assert "hidden" not in helps
