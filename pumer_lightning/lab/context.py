"""The experiment context: which device, which precision, and the experiment's model and data as the CLI builds
them.

* `resolve_device`: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` -> a device, or an error naming the flag.
* The one precision map: `autocast` and `weight_dtype` for every precision name a driver takes (Lightning's
  ``32-true`` / ``16-mixed`` / ``bf16-mixed`` / ``16-true`` / ``bf16-true`` and the bench's ``fp32`` / ``fp16`` /
  ``bf16`` / ``fp16-true`` / ``bf16-true``); `train_precision`: what the drivers train with on a device.
* `experiment_files` and `build_cli`: an experiment's YAML files composed into `PumerCLI` (model, data module,
  trainer), with the arguments passed explicitly: ``sys.argv`` is never touched.
* `to_device`: a batch on a device (eager forwards for FLOP counting and scoring are the task's own
  ``eager_forwards``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

#: Precisions whose forward runs under autocast over float32 weights, and the autocast dtype.
AUTOCAST_DTYPES: dict[str, torch.dtype] = {
    "16-mixed": torch.float16,
    "16": torch.float16,
    "bf16-mixed": torch.bfloat16,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
#: Precisions whose weights (and floating inputs) are cast to half once, with no autocast.
WEIGHT_DTYPES: dict[str, torch.dtype] = {
    "16-true": torch.float16,
    "fp16-true": torch.float16,
    "bf16-true": torch.bfloat16,
}


def resolve_device(text: str, flag: str = "--device") -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; a clear error naming ``flag``
    otherwise (an unknown name, no CUDA here, a device index out of range)."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    expected = f"error: {flag} {text!r}: expected auto, cpu, cuda or cuda:N"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise SystemExit(expected) from None
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(expected)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: {flag} {text}: no CUDA device is available here (use {flag} cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SystemExit(f"error: {flag} {text}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The autocast ``precision`` runs the forward under on ``device`` (`AUTOCAST_DTYPES`); a disabled one for
    full precision and the half-weight precisions."""
    dtype = AUTOCAST_DTYPES.get(str(precision))
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def weight_dtype(precision: str) -> torch.dtype:
    """The dtype of the weights (and floating inputs) under ``precision``: half for the ``*-true`` halves."""
    return WEIGHT_DTYPES.get(str(precision), torch.float32)


def train_precision(device: torch.device) -> str:
    """The Lightning precision the drivers train with: bf16 autocast on CUDA, float32 elsewhere."""
    return "bf16-mixed" if device.type == "cuda" else "32-true"


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with its tensors on ``device`` (everything else as it is)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------- configurations
def relative(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (for commands printed in reports)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def experiment_files(name: str, directory: Path | None = None) -> list[str]:
    """``[base.yaml, <name>.yaml]`` of the experiments directory (a path to a YAML file works too), relative to
    the working directory where they lie below it; an unknown name lists the experiments there."""
    from pumer_lightning.cli import EXPERIMENTS_DIR

    directory = directory or EXPERIMENTS_DIR
    path = Path(name) if name.endswith((".yaml", ".yml")) else directory / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in directory.glob("*.yaml") if p.stem != "base")
        raise SystemExit(
            f"error: unknown experiment {name!r}: {path} does not exist. Available: {', '.join(names)}"
        )
    return [relative(directory / "base.yaml"), relative(path)]


def build_cli(files: Sequence[str], overrides: Sequence[str] = ()) -> Any:
    """The `PumerCLI` of configuration ``files`` (``-c`` each, in order) and dotted ``overrides``, instantiated but
    not run: its ``model``, ``datamodule`` and ``trainer`` as ``python -m pumer_lightning`` builds them (the
    shapes demo generates its data here if it is missing)."""
    from pumer_lightning.cli import PumerCLI

    args = [a for f in files for a in ("-c", str(f))] + list(overrides)
    with warnings.catch_warnings():
        # the arguments are passed explicitly; LightningCLI warns when the process has a command line of its own
        warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
        return PumerCLI(args=args, run=False)
