"""One dispatch map for every verb: ``pumer <verb>`` / ``python -m pumer_lightning <verb>``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

import pumer_lightning.cli
from pumer_lightning.__main__ import LIGHTNING_VERBS, VERBS, main, resolve, run
from pumer_lightning.command import Command

ROOT = Path(__file__).resolve().parents[2]
ISSUE_VERBS = {
    "fit",
    "validate",
    "test",
    "predict",
    "exp",
    "tune",
    "bench",
    "study",
    "prepare",
    "convert",
    "shapes",
}
SMALL_TOOLS = {"overhead", "loader-bench", "bench-table", "gpu-summary"}
# each verb's own entry point, which must run the same Command
ENTRY_POINTS = {
    "exp": "pumer_lightning.exp",
    "tune": "pumer_lightning.tune",
    "bench": "pumer_lightning.bench",
    "bench-table": "pumer_lightning.bench.table",
    "gpu-summary": "pumer_lightning.bench.gpu_check",
    "study": "pumer_lightning.study",
    "prepare": "pumer_lightning.data.prepare",
    "convert": "pumer_lightning.models.convert",
    "shapes": "pumer_lightning.data.shapes",
    "overhead": "pumer_lightning.models.overhead",
    "loader-bench": "pumer_lightning.data.throughput",
}


def test_the_map_holds_every_verb():
    assert set(VERBS) == ISSUE_VERBS | SMALL_TOOLS
    assert set(ENTRY_POINTS) == set(VERBS) - set(LIGHTNING_VERBS)


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_each_verb_resolves_to_what_runs_it(verb):
    target = resolve(verb)
    if verb in LIGHTNING_VERBS:
        assert target is pumer_lightning.cli.main
    else:
        assert isinstance(target, Command) and target.prog == f"python -m {ENTRY_POINTS[verb]}"


@pytest.mark.parametrize("verb", sorted(set(VERBS) - set(LIGHTNING_VERBS)))
def test_each_verbs_help_exits_0_under_the_verbs_name(verb, capsys):
    with pytest.raises(SystemExit) as stop:
        run([verb, "--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and out.startswith(f"usage: python -m pumer_lightning {verb} ")
    assert "options:" in out and "-h, --help" in out


def test_the_lightning_verbs_go_to_lightning_cli(capsys):
    with pytest.raises(SystemExit) as stop:
        run(["fit", "--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "--ckpt_path" in out and "--trainer" in out and "--model" in out


@pytest.mark.parametrize("argv", [["--help"], ["-h"]])
def test_help_lists_every_verb(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        run(argv)
    out = capsys.readouterr().out
    assert stop.value.code == 0 and out.startswith("usage: python -m pumer_lightning <verb> [options]")
    for verb in VERBS:
        assert f"\n  {verb} " in out


def test_no_verb_lists_them_and_exits_2(capsys):
    with pytest.raises(SystemExit) as stop:
        run([])
    assert stop.value.code == 2 and "verbs:" in capsys.readouterr().err


@pytest.mark.parametrize(("verb", "hint"), [("fitt", " (did you mean 'fit'?)"), ("frobnicate", "")])
def test_an_unknown_verb_is_named_with_the_verbs(verb, hint, capsys):
    with pytest.raises(SystemExit) as stop:
        run([verb, "--max-drop", "1"])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert f"error: unknown verb {verb!r}{hint}; the verbs: {', '.join(VERBS)}" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tune", "--eta=1"], "error: --eta must be >= 2, got 1"),
        (
            ["tune", "--max-drop", "a lot"],
            "argument --max-drop: Expected a <class 'float'>. Got value: a lot",
        ),
        (["exp", "--timing-rounds", "x"], "argument --timing-rounds: Expected a <class 'int'>. Got value: x"),
        (["bench", "vilt_nlvr2", "--batch", "8", "x"], "argument --batch element 2:"),
        (["bench", "vilt_nope"], "error: unknown bench experiment 'vilt_nope'"),
        (["study", "--budget", "huge"], "argument --budget: Expected a typing.Literal['default', 'gpu',"),
        (
            ["study", "--budget", "long"],
            "error: --budget long: the paper protocol has budgets default, gpu, quick",
        ),
        (
            ["prepare", "nlvr3", "--src", "x"],
            "argument DATASET: Expected a typing.Literal['coco', 'flickr30k',",
        ),
        (["prepare", "nlvr2"], "the following arguments are required: --src"),
        (
            ["convert", "vilt", "a.ckpt", "out", "--task", "gqa"],
            "argument --task: Expected a typing.Literal[",
        ),
        (
            ["shapes", "--num-train", "many"],
            "argument --num-train: Expected a <class 'int'>. Got value: many",
        ),
        (["shapes", "--tasks", "nlvr2,gqa"], "error: --tasks: unknown task 'gqa'"),
        (["overhead", "--repeats", "1.5"], "argument --repeats: Expected a <class 'int'>. Got value: 1.5"),
        (["loader-bench", "--data-dir", "d", "--workers", "1,x"], "error: --workers '1,x': expected comma-"),
        (["gpu-summary"], "the following arguments are required: OUT"),
        (["bench-table", "a.json", "--settings"], "argument --settings: expected at least one argument"),
    ],
)
def test_a_bad_value_names_its_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        run(argv)
    err = " ".join(capsys.readouterr().err.split())
    assert stop.value.code == 2 and message in err
    assert err.startswith(f"usage: python -m pumer_lightning {argv[0]} ")


def test_shapes_and_loader_bench_run_through_the_map(tmp_path, capsys):
    out = tmp_path / "shapes"
    flags = [
        "--num-train",
        "4",
        "--num-val",
        "2",
        "--num-test",
        "2",
        "--tasks",
        "nlvr2",
        "--image-size",
        "128",
    ]
    assert main(["shapes", "--out", str(out), *flags, "--workers", "1"]) == 0
    assert "wrote 8 examples (nlvr2)" in capsys.readouterr().out
    assert (out / "nlvr2" / "train" / "meta.json").is_file() and (out / "tokenizer").is_dir()
    assert main(["shapes", "--out", str(out), *flags]) == 0  # the same data: nothing to do
    assert "up to date" in capsys.readouterr().out
    argv = ["--data-dir", str(out / "nlvr2"), "--image-size", "128", "--workers", "0", "--seconds", "0.2"]
    assert main(["loader-bench", *argv, "--batch-size", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["workers"] == 0 and result["images_per_example"] == 2 and result["examples"] > 0


def test_overhead_runs_through_the_map(capsys):
    main(["overhead", "--batch", "1", "--text", "4", "--image", "5", "--repeats", "1", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["batch"] == 1 and result["tokens"] == 9 and result["layer_ms"] > 0


def test_a_verbs_exit_status_reaches_the_console_script(tmp_path, capsys):
    assert main(["prepare", "nlvr2", "--src", str(tmp_path / "absent"), "--no-progress"]) == 2
    assert f"--src {tmp_path / 'absent'} is not a directory" in capsys.readouterr().err
    assert main(["convert", "vilt", str(tmp_path / "absent.ckpt"), str(tmp_path / "out")]) == 1


def test_the_console_script_is_pumer():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"pumer": "pumer_lightning.__main__:main"}
    script = Path(sys.executable).parent / "pumer"
    assert script.is_file(), "the console script is missing: run `make install` (pyproject.toml changed)"
    proc = subprocess.run([str(script), "overhead", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: pumer overhead [options]")


def test_python_dash_m_entry_points_keep_working():
    for argv in (["pumer_lightning", "shapes", "--help"], ["pumer_lightning.data.shapes", "--help"]):
        proc = subprocess.run(
            [sys.executable, "-m", *argv], capture_output=True, text=True, timeout=120, cwd=ROOT
        )
        assert proc.returncode == 0 and "--num-train NUM_TRAIN" in proc.stdout, proc.stderr
