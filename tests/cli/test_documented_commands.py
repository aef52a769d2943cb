"""Every command line the documentation spells out still parses, and each verb's --help lists its flags.

The commands are read from README.md, docs/**/*.md and the Makefile: ``python -m pumer_lightning[.<module>] ...``,
``pumer <verb> ...`` and ``make <target> [VAR=value ...]`` (through the target's own recipe). A template with
placeholders (``<file>``, ``{vilt,meter}``, ``...``, ``NAME``) is not a command and is left out; the LightningCLI
verbs are LightningCLI's to parse (tests/cli/test_experiments.py). A documented example that stops parsing fails
here, naming its file.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pumer_lightning.__main__ import LIGHTNING_VERBS, VERBS, resolve

ROOT = Path(__file__).resolve().parents[2]

# python -m <module> -> verb (the modules whose entry point is the verb's)
MODULES = {
    "pumer_lightning.exp": "exp",
    "pumer_lightning.tune": "tune",
    "pumer_lightning.bench": "bench",
    "pumer_lightning.bench.table": "bench-table",
    "pumer_lightning.bench.gpu_check": "gpu-summary",
    "pumer_lightning.study": "study",
    "pumer_lightning.data.prepare": "prepare",
    "pumer_lightning.models.convert": "convert",
    "pumer_lightning.data.shapes": "shapes",
    "pumer_lightning.models.overhead": "overhead",
    "pumer_lightning.data.throughput": "loader-bench",
}
NOT_VERBS = {"pumer_lightning.reduce.released"}  # prints a table; takes no arguments
# a python -m command anywhere; a console-script or make command where a line of code starts
START = re.compile(r"python3? -m pumer_lightning\S*|^\$? ?(?:pumer|make) (?=[a-z])")
PLACEHOLDER = re.compile(r"[<>{}|]|\.\.\.|\$\(|^[A-Z][A-Z_]*$")


def _code(text: str) -> list[str]:
    """The text of fenced blocks (continuation lines joined) and of inline code spans."""
    fenced, spans, inside, block = [], [], False, []
    prose = []
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            if inside:
                fenced += "\n".join(block).replace("\\\n", " ").splitlines()
            inside, block = not inside, []
        elif inside:
            block.append(line)
        else:
            prose.append(line)
    spans = re.findall(r"`([^`]+)`", "\n".join(prose))
    return fenced + [" ".join(s.split()) for s in spans]


def _makefile() -> tuple[dict[str, str], dict[str, str]]:
    """The Makefile's variable defaults and, per target, its ``python -m pumer_lightning...`` recipe line."""
    text = (ROOT / "Makefile").read_text()
    defaults = dict(re.findall(r"^([A-Z_]+) \?= ?(.*)$", text, flags=re.M))
    recipes, target = {}, None
    for line in text.splitlines():
        if match := re.match(r"^([a-z-]+):", line):
            target = match.group(1)
        elif line.startswith("\t") and "-m pumer_lightning" in line and target:
            recipes[target] = "python " + line.strip().split("python ", 1)[1]
    return defaults, recipes


def _make_command(tokens: list[str]) -> list[str] | None:
    """The ``python -m ...`` tokens a ``make <target> VAR=value ...`` runs (None: not a pumer target)."""
    defaults, recipes = _makefile()
    target, values = tokens[1], dict(t.split("=", 1) for t in tokens[2:] if "=" in t)
    if target not in recipes:
        return None
    variables = {**defaults, **values}
    variables["BENCH_EXP"] = values.get("EXP", "vilt_nlvr2 meter_nlvr2")
    line = recipes[target]
    for _ in range(3):  # SRC ?= data/raw/$(DATASET)
        line = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), ""), line)
    return shlex.split(line)


def _verb_and_args(tokens: list[str]) -> tuple[str, list[str]] | None:
    """``(verb, arguments)`` of a tokenised command; None when it runs no verb of ours."""
    if tokens[0] == "make":
        tokens = _make_command(tokens)
        if tokens is None:
            return None
    if tokens[0] == "pumer":
        return tokens[1], tokens[2:]
    module = tokens[2]
    if module == "pumer_lightning":
        return (tokens[3], tokens[4:]) if len(tokens) > 3 else None
    if module in NOT_VERBS:
        return None
    return MODULES[module], tokens[3:]


def documented_commands() -> list[tuple[str, str, str, list[str]]]:
    """``(file, command as written, verb, arguments)`` for every runnable command of ours in the docs."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "Makefile"]:
        text = path.read_text()
        pieces = _code(text) if path.suffix == ".md" else [line.strip() for line in text.splitlines()]
        for piece in pieces:
            for match in START.finditer(piece):
                command = re.split(r"\s(?:&&|;|\|\|)\s|\)", piece[match.start() :])[0]
                try:
                    tokens = [t if "=" in t else t.strip("[]") for t in shlex.split(command, comments=True)]
                except ValueError:
                    continue
                if len(tokens) < 4 and tokens[0] != "make" or any(PLACEHOLDER.search(t) for t in tokens):
                    continue  # a mention of an entry point (no arguments), or a template
                parsed = _verb_and_args(tokens)
                if parsed is not None:
                    found.append((path.relative_to(ROOT).as_posix(), command, *parsed))
    return found


COMMANDS = documented_commands()


def test_the_docs_hold_commands_of_every_driver_verb():
    verbs = {verb for _, _, verb, _ in COMMANDS}
    drivers = {"exp", "tune", "bench", "study", "prepare", "convert", "shapes", "overhead", "loader-bench"}
    assert drivers <= verbs, sorted(drivers - verbs)
    assert {"fit", "test"} <= verbs and len(COMMANDS) >= 60


def test_every_documented_verb_exists():
    unknown = [(where, command) for where, command, verb, _ in COMMANDS if verb not in VERBS]
    assert not unknown


@pytest.mark.parametrize("verb", sorted({verb for _, _, verb, _ in COMMANDS} - set(LIGHTNING_VERBS)))
def test_every_documented_command_parses_and_help_lists_its_flags(verb, capsys):
    command = resolve(verb)
    with pytest.raises(SystemExit) as stop:
        command.parse(["--help"])
    assert stop.value.code == 0
    help_text = capsys.readouterr().out
    options = command.options()
    for where, written, _, args in (c for c in COMMANDS if c[2] == verb):
        try:
            command.parse(args)
        except SystemExit as stop:  # --help exits 0
            if stop.code != 0:
                pytest.fail(f"{where}: `{written}` no longer parses: {capsys.readouterr().err}")
        for token in args:
            name = token.split("=")[0]
            if name in options:
                assert re.search(rf"(?<![\w-]){re.escape(options[name][0])}(?![\w-])", help_text), (
                    where,
                    name,
                )
