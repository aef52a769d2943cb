"""``make tune``: choose a reducer schedule for a trained model on your hardware, training-free.

    python -m pumer_lightning.tune [NAME | -c base.yaml -c exp.yaml] [--ckpt FILE] [--max-drop 1.0] [overrides]
    make tune ARGS="--device cuda --batch-size 32"

It loads the experiment's model with the checkpoint's weights (default: the best checkpoint of the latest
``runs/<exp_name>/version_N`` that ``make exp`` wrote), samples reducer schedules from a search space, times each
on your device at your batch size, scores them on the validation split by successive halving (a prefix of the
split first, longer prefixes for the survivors, the whole split for the finalists), and writes the Pareto front
of accuracy against speed, a recommended schedule for an accuracy budget as a YAML fragment the CLI composes,
and a check of that recommendation on the test split (`pumer_lightning.tune.tuner`). Every figure is cached in
``<run dir>/tune/cache.jsonl``, so a re-run measures only what it lacks. docs/tune.md has the details.
"""

from __future__ import annotations

import pumer_lightning.env  # noqa: F401  (first: passive OpenMP threads and offline hubs, before torch loads)

# isort: split
from .driver import run
from .search import on_front, pareto_ranks, recommend, rung_batches, survivors
from .space import SearchSpace, SpaceError, build_space, schedule_key

__all__ = [
    "SearchSpace",
    "SpaceError",
    "build_space",
    "on_front",
    "pareto_ranks",
    "recommend",
    "run",
    "rung_batches",
    "schedule_key",
    "survivors",
]
