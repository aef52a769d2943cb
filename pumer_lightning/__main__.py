"""``pumer <verb> ...`` (the console script) and ``python -m pumer_lightning <verb> ...``: one map for every verb.

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI (`pumer_lightning.cli`); every other verb is a
`pumer_lightning.command.Command`, its flags generated from its typed config by jsonargparse, and keeps its own
entry point too (``pumer study`` = ``python -m pumer_lightning.study``). ``pumer <verb> --help`` lists a verb's
flags; ``pumer --help`` lists the verbs.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from pathlib import Path
from typing import Any

LIGHTNING_VERBS = ("fit", "validate", "test", "predict")

# verb -> ("module:attribute" of what runs it, one line of help); imported only when its verb runs
VERBS: dict[str, tuple[str, str]] = {
    "fit": (
        "pumer_lightning.cli:main",
        "train a task module (LightningCLI; -c experiments/base.yaml -c ...)",
    ),
    "validate": ("pumer_lightning.cli:main", "evaluate on the validation split (LightningCLI)"),
    "test": ("pumer_lightning.cli:main", "evaluate on the test split (LightningCLI)"),
    "predict": ("pumer_lightning.cli:main", "write the benchmark's prediction file (LightningCLI)"),
    "exp": ("pumer_lightning.exp:COMMAND", "fit, test the best checkpoint and print a summary (make exp)"),
    "tune": (
        "pumer_lightning.tune.driver:COMMAND",
        "choose a reducer schedule for a trained model (make tune)",
    ),
    "bench": (
        "pumer_lightning.bench.__main__:COMMAND",
        "throughput, memory and FLOPs at full size (make bench)",
    ),
    "bench-table": (
        "pumer_lightning.bench.table:COMMAND",
        "one combined results table from bench JSON files",
    ),
    "gpu-summary": ("pumer_lightning.bench.gpu_check:COMMAND", "summarise a scripts/gpu_check.sh directory"),
    "study": (
        "pumer_lightning.study.run:COMMAND",
        "does PuMer keep accuracy? the shapes-world study (make study)",
    ),
    "prepare": ("pumer_lightning.data.prepare.cli:COMMAND", "official dataset files -> shards (make data)"),
    "convert": ("pumer_lightning.models.convert:COMMAND", "original METER / ViLT checkpoint -> our weights"),
    "shapes": (
        "pumer_lightning.data.shapes.generate:COMMAND",
        "generate the synthetic shapes world (make shapes)",
    ),
    "overhead": ("pumer_lightning.models.overhead:COMMAND", "one reduction step against one ViLT-B layer"),
    "loader-bench": ("pumer_lightning.data.throughput:COMMAND", "data loader throughput per worker"),
}


def resolve(verb: str) -> Any:
    """What runs ``verb``: `pumer_lightning.cli.main` for the LightningCLI verbs, else the verb's `Command`."""
    module, attribute = VERBS[verb][0].split(":")
    return getattr(importlib.import_module(module), attribute)


def verbs_help(prog: str) -> str:
    width = max(map(len, VERBS))
    lines = [f"usage: {prog} <verb> [options]", "", "verbs:"]
    lines += [f"  {verb:<{width}}  {text}" for verb, (_, text) in VERBS.items()]
    return "\n".join([*lines, "", f"{prog} <verb> --help lists the verb's options."])


def _prog() -> str:
    return "pumer" if Path(sys.argv[0]).name == "pumer" else "python -m pumer_lightning"


def main(argv: list[str] | None = None) -> int:
    """The console script: run the verb; the exit status is the status a verb returns (a converter's 2), else 0."""
    result = run(argv)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def run(argv: list[str] | None = None) -> Any:
    """Run the verb ``argv[0]`` (default: ``sys.argv[1:]``) with the rest of ``argv``; returns what it returns."""
    given = argv is not None
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = _prog()
    if not argv or argv[0] in ("-h", "--help"):
        print(verbs_help(prog), file=sys.stdout if argv else sys.stderr)
        raise SystemExit(0 if argv else 2)
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        close = difflib.get_close_matches(verb, VERBS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"{prog}: error: unknown verb {verb!r}{hint}; the verbs: {', '.join(VERBS)}", file=sys.stderr)
        raise SystemExit(2)
    target = resolve(verb)
    if verb in LIGHTNING_VERBS:  # LightningCLI parses the verb itself (from sys.argv when called from it)
        return target(argv if given else None)
    return target.main(rest, prog=f"{prog} {verb}")


if __name__ == "__main__":
    sys.exit(main())
