"""The bench's command line is generated from `Options` (pumer_lightning.command): every flag it ever had still
works, with its default."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from pumer_lightning.bench import Options
from pumer_lightning.bench.__main__ import COMMAND, EPILOG, parse_args

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
    return set(COMMAND.options())


def test_defaults_are_the_dataclass_defaults():
    exps, opts = parse_args(["vilt_nlvr2", "meter_nlvr2"])
    assert exps == ["vilt_nlvr2", "meter_nlvr2"]
    assert dataclasses.replace(opts, command=None) == Options()
    assert opts.command == "python -m pumer_lightning.bench vilt_nlvr2 meter_nlvr2"  # recorded in the results


@pytest.mark.parametrize("name", sorted(OLD_FLAGS))
def test_every_old_flag_sets_what_it_set(name):
    values, expected = OLD_FLAGS[name]
    _, opts = parse_args([EXP, name, *values])
    default = Options()
    changed = {
        f.name
        for f in dataclasses.fields(Options)
        if f.name != "command" and getattr(opts, f.name) != getattr(default, f.name)
    }
    assert changed == set(expected)
    for key, value in expected.items():
        assert getattr(opts, key) == value
    assert isinstance(opts.keep_sweep, tuple)


def test_every_field_is_a_flag_with_help_from_its_docstring():
    by_dest = {a.dest: a for a in COMMAND.parser()._actions}
    for f in dataclasses.fields(Options):
        if f.name in ("command", "verbose"):
            assert (
                f.name not in by_dest
            )  # set by the parse (the command line; --quiet), not flags of their own
            continue
        action = by_dest[f.name]
        assert action.option_strings and action.help, f.name
    assert by_dest["batch_sizes"].help.startswith("batch size(s); several = a sweep")
    assert by_dest["train"].option_strings == ["--train", "--no-train"]
    assert by_dest["train"].help.startswith("the training step of every setting")
    text = " ".join(COMMAND.parser().format_help().split())
    assert "--precision {auto,fp32,fp16,bf16,fp16-true,bf16-true}" in text
    assert "--budget BUDGET seconds of timed rounds per experiment (type: float, default: 120.0)" in text
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
        ([EXP, "--batch", "x"], "argument --batch element 1: Expected a <class 'int'>. Got value: x"),
        ([EXP, "--rounds", "0"], "--rounds must be positive, got 0"),
        (
            [EXP, "--device", "gpu"],
            "argument --device: Expected a typing.Literal['auto', 'cpu', 'cuda']. Got",
        ),
        (
            [EXP, "--reducer-impl", "fast"],
            "argument --reducer-impl: Expected a typing.Literal['auto', 'eager',",
        ),
        (
            [EXP, "--precision", "fp8"],
            "argument --precision: Expected a typing.Literal['auto', 'fp32', 'fp16',",
        ),
        (
            [EXP, "--kernel-count", "some"],
            "argument --kernel-count: Expected a typing.Literal['released', 'all',",
        ),
    ],
)
def test_bad_values_are_refused_naming_their_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2 and message in " ".join(capsys.readouterr().err.split())
