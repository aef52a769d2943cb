"""`make bench`: throughput, peak memory and FLOPs of PuMer settings against the unreduced model.

    python -m pumer_lightning.bench vilt_nlvr2 meter_nlvr2            # full size, batch 8, every setting
    python -m pumer_lightning.bench vilt_vqa2 --quick                 # baseline vs released only
    python -m pumer_lightning.bench tiny_meter_vqa2 --rounds 3        # tiny preset (seconds)
    python -m pumer_lightning.bench.table results/bench/*_b8.json    # one combined table

See `runner` for the protocol (its stages in `stages`, the forwards they run in `forwards`, the JSON in
`results`), `options` for the options and the command line generated from them, `measure` for how FLOPs,
memory and reducer time are measured, `experiments` for the input shapes and settings, and `report` for the
outputs.
"""

from .experiments import (
    EXPERIMENTS,
    Experiment,
    Setting,
    build_task,
    get_experiment,
    make_batch,
    make_settings,
)
from .report import REQUIRED_FIELDS, readme_table
from .runner import Options, run_bench

__all__ = [
    "EXPERIMENTS",
    "REQUIRED_FIELDS",
    "Experiment",
    "Options",
    "Setting",
    "build_task",
    "get_experiment",
    "make_batch",
    "make_settings",
    "readme_table",
    "run_bench",
]
